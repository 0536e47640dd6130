"""The ComputeDriver contract: what Corral asks of a hypervisor host.

A driver is bound to one host URI when it is made, opens its connection lazily, and
translates every error of its hypervisor library into Corral's errors (``NotFound``,
``Conflict``, ``HypervisorUnavailable``, ``HypervisorError``) before it leaves the
driver: nobody above ``compute/`` sees a libvirt exception.

Domains are named by their unique name; ``undefine`` also takes a UUID. Unless a
method says otherwise, an unknown name raises ``NotFound('machine', name)``.

Optional features are declared in ``capabilities`` and checked by ``ops`` before
calling the methods that need them.

Drivers are entry points in the ``corral.compute`` group, built-ins included; see
``load_compute_driver``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import TracebackType
from typing import ClassVar, Self

from corral.errors import CorralError, DriverNotFound
from corral.formats.domain_xml import ParsedDomain
from corral.formats.snapshot_xml import ParsedSnapshot
from corral.model import DomainPlan, HostFacts, PowerState

ENTRY_POINT_GROUP = "corral.compute"

CONSOLE = "console"
"""``attach_console`` works: the driver can attach a terminal to a guest's serial port."""
KERNEL_BOOT = "kernel-boot"
"""Plans with ``kernel_boot`` are honoured (QEMU loads the kernel, not the disk's loader)."""
SNAPSHOTS = "snapshots"
"""``snapshot_*`` work: internal snapshots of a domain's disk, with memory when it runs."""
LIVE_MIGRATION = "live-migration"
"""``migrate_live`` works: a running domain moves to another host of the same driver."""


@dataclass(frozen=True, slots=True)
class PoolSpace:
    capacity: int
    allocation: int
    """Bytes in use in the pool's filesystem, whoever uses them."""
    available: int
    """Bytes that can still be written (less than capacity − allocation where the
    filesystem reserves some)."""

    @property
    def fill(self) -> float:
        """Used / (used + available): what ``df`` calls Use%."""
        usable = self.allocation + self.available
        return self.allocation / usable if usable else 0.0


@dataclass(frozen=True, slots=True)
class LiveMigration:
    """Where and how a running domain moves (see ``ComputeDriver.migrate_live``)."""

    dest_uri: str
    """The target host's URI, as the source host reaches it (the source drives the move)."""
    data_address: str
    """The target's address for the migration stream (memory, and disks when copied)."""
    paths: Mapping[str, str]
    """Every file the domain names -> its name on the target; absent: the same name."""
    network: str | None
    """The network the domain's interfaces join on the target."""
    copy_disks: tuple[str, ...] = ()
    """Guest disks (``vda``…) whose contents travel with the memory; empty when the
    target reads the very same files (shared storage)."""
    incremental: bool = True
    """For copied disks: the target already holds their backing files, so only each
    disk's top layer travels. The target files must exist, empty, before the move."""
    bandwidth_mib: int = 0
    """MiB/s the move may use; 0: no limit."""


@dataclass(frozen=True, slots=True)
class DomainSummary:
    """One defined domain as the host reports it."""

    name: str
    uuid: str
    state: PowerState
    domain: ParsedDomain
    """Its current XML, parsed (``domain.corral_managed`` tells Corral's own apart)."""


class ComputeDriver(abc.ABC):
    """One hypervisor host. Not thread-safe: use one driver per thread."""

    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, uri: str) -> None:
        """Bind the driver to the host at ``uri``; connects on first use, not here."""
        self.uri = uri

    # -- the host ---------------------------------------------------------------------

    @abc.abstractmethod
    def facts(self) -> HostFacts:
        """What the host says about itself: name, architecture, CPUs, memory, versions."""

    @abc.abstractmethod
    def kvm_device_present(self) -> bool:
        """The host claims hardware virtualization (KVM).

        A claim, not proof: a guest may still hang under KVM. ``ops`` boots a probe
        guest before it trusts a True.
        """

    @abc.abstractmethod
    def ensure_network(self, name: str) -> None:
        """An isolated network ``name`` exists, is persistent, autostarts and is active.

        Isolated: no forwarding, no addresses, no DHCP; no traffic leaves the host.
        Idempotent. Raises Conflict if a network of that name exists but is not
        isolated (it is never started then). If this call defined the network and
        starting it fails, the definition is removed again.
        """

    @abc.abstractmethod
    def ensure_pool(self, name: str, path: str) -> None:
        """A directory storage pool ``name`` at ``path`` exists, autostarts and is active.

        ``path`` is created if missing. Idempotent. Raises Conflict if a pool of that
        name exists elsewhere or of another type. If this call defined the pool and
        starting it fails, the definition is removed again.
        """

    @abc.abstractmethod
    def pool_capacity(self, name: str) -> tuple[int, int]:
        """A storage pool's capacity and available bytes."""

    @abc.abstractmethod
    def pool_space(self, name: str, *, fresh: bool = False) -> PoolSpace:
        """A storage pool's space as its host keeps count of it, or with ``fresh`` as it
        finds it after looking at its storage again (unless busy writing there)."""

    # -- domains ----------------------------------------------------------------------

    @abc.abstractmethod
    def define(self, plan: DomainPlan) -> None:
        """Define ``plan`` persistently, shut off.

        Pre: the files the plan names exist. Post: a domain named ``plan.name`` with
        UUID ``plan.identity.uuid`` is defined. Idempotent for crash recovery: if that
        exact name and UUID are already defined, nothing happens. Raises Conflict if
        the name or the UUID belongs to another domain. On failure nothing is defined.
        """

    @abc.abstractmethod
    def run_transient(self, plan: DomainPlan) -> None:
        """Start ``plan`` as a transient domain, for short probes.

        The domain lives until it powers off, is destroyed, or this driver's connection
        closes (so a crashed caller leaves no probe running). Nothing is defined
        persistently. On failure nothing runs.
        """

    @abc.abstractmethod
    def start(self, name: str) -> None:
        """Power on a defined domain. Idempotent: an active (running or paused) one is
        left as it is."""

    @abc.abstractmethod
    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI power button); returns at once.

        The guest may ignore the request: poll ``state`` and ``destroy`` after a
        deadline. Idempotent: a domain that is not active is left as it is.
        """

    @abc.abstractmethod
    def reboot(self, name: str) -> None:
        """Ask the guest to reboot (ACPI); returns at once. Raises Conflict if the
        domain is not active."""

    @abc.abstractmethod
    def destroy(self, name: str) -> None:
        """Power off at once, like pulling the plug; a persistent domain stays defined.

        Idempotent: a domain that is off, or missing (a transient domain vanishes when
        it powers off), is not an error.
        """

    @abc.abstractmethod
    def undefine(self, name_or_uuid: str, *, force: bool = False) -> None:
        """Remove a domain's definition. Its disks are not touched.

        Idempotent: a missing domain is not an error. An active domain raises Conflict,
        unless ``force``, which destroys it first.
        """

    @abc.abstractmethod
    def state(self, name: str) -> PowerState:
        """The domain's power state, one PowerState per hypervisor state."""

    @abc.abstractmethod
    def power_states(self) -> dict[str, PowerState]:
        """Every domain's power state by name, in as few round trips as the hypervisor
        allows: the dashboard sweeps thousands of domains with this."""

    @abc.abstractmethod
    def list_domains(self) -> list[DomainSummary]:
        """Every domain on the host, active and inactive, Corral's or not, by name."""

    @abc.abstractmethod
    def domain_xml(self, name: str) -> ParsedDomain:
        """The domain's current definition, parsed."""

    @abc.abstractmethod
    def attach_console(self, name: str, stdin_fd: int, stdout_fd: int) -> None:
        """Connect a terminal to the domain's serial console until the user detaches.

        Requires CONSOLE. Bytes read from ``stdin_fd`` go to the guest, the guest's
        output goes to ``stdout_fd``; Ctrl-] detaches. A tty on ``stdin_fd`` is put in
        raw mode and always restored. Returns when the user detaches or the domain
        stops. The caller keeps ownership of both descriptors. Raises Conflict if the
        domain is not running or another console session holds it.
        """

    @abc.abstractmethod
    def migrate_live(
        self, name: str, move: LiveMigration, on_progress: Callable[[float], None]
    ) -> None:
        """Move the running domain ``name`` to ``move.dest_uri`` without stopping it.

        Requires LIVE_MIGRATION. On return the domain runs on the target, defined there
        persistently, and is gone from this host. On failure (raised as a Corral error)
        it still runs here, as before, and the target holds no domain of that name.
        ``on_progress`` receives the fraction of the data sent, now and then, from
        another thread. Raises Conflict if the domain is not running.
        """

    @abc.abstractmethod
    def snapshot_create(self, name: str, snapshot: str, *,
                        description: str | None = None) -> ParsedSnapshot:
        """Snapshot domain ``name``: its memory and disk when it runs (a revert resumes
        it there), its disk alone when it is shut off. Requires SNAPSHOTS.

        The new snapshot is the child of the current one and becomes current. Raises
        Conflict if a snapshot of that name exists, or the domain is paused or busy.
        """

    @abc.abstractmethod
    def snapshots(self, name: str) -> list[ParsedSnapshot]:
        """Every snapshot of domain ``name``, oldest first. Requires SNAPSHOTS."""

    @abc.abstractmethod
    def snapshot_current(self, name: str) -> str | None:
        """The snapshot a revert or the last snapshot made current, if any."""

    @abc.abstractmethod
    def snapshot_revert(self, name: str, snapshot: str) -> None:
        """Put domain ``name`` back as it was at ``snapshot``: disk, and for a snapshot
        with memory, the running machine itself. Requires SNAPSHOTS. Raises NotFound
        for an unknown snapshot."""

    @abc.abstractmethod
    def snapshot_delete(self, name: str, snapshot: str) -> None:
        """Delete one snapshot; its children become its parent's. The machine's current
        data never changes. Requires SNAPSHOTS. Raises NotFound for an unknown one."""

    # -- conveniences with a default --------------------------------------------------

    def domain_names(self) -> frozenset[str]:
        """Names of every defined domain; drivers may override with a cheaper query."""
        return frozenset(d.name for d in self.list_domains())

    def close(self) -> None:  # noqa: B027  (a driver without a connection has nothing to close)
        """Release the connection. Idempotent; the next call opens a new one."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def available_compute_drivers() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_compute_driver(name: str, uri: str) -> ComputeDriver:
    """A driver for host ``uri``, by its entry-point name (``libvirt``…). Opens nothing
    yet. Raises DriverNotFound, listing the names there are, for an unknown name."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise DriverNotFound(ENTRY_POINT_GROUP, name, sorted(found))
    driver_class = found[name].load()
    if not (isinstance(driver_class, type) and issubclass(driver_class, ComputeDriver)):
        raise CorralError(f"The {ENTRY_POINT_GROUP} plugin '{name}' is not a ComputeDriver.")
    return driver_class(uri)
