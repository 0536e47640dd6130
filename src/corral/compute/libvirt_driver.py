"""The libvirt ComputeDriver: one lazily opened connection per driver.

Every ``libvirt.libvirtError`` is translated here, and only here, into one of Corral's
errors with a one-sentence message. ``Any`` stays inside this module: libvirt-python
has no type stubs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import termios
import threading
import time
import tty
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import libvirt

from corral.compute.base import (
    CONSOLE,
    KERNEL_BOOT,
    LIVE_MIGRATION,
    SNAPSHOTS,
    ComputeDriver,
    DomainSummary,
    LiveMigration,
    PoolSpace,
)
from corral.errors import Conflict, CorralError, HypervisorError, HypervisorUnavailable, NotFound
from corral.formats.domain_xml import (
    ParsedDomain,
    build_domain_xml,
    parse_domain_xml,
    relocate_domain_xml,
    safe_fromstring,
)
from corral.formats.snapshot_xml import ParsedSnapshot, build_snapshot_xml, parse_snapshot_xml
from corral.model import DomainPlan, HostFacts, PowerState

log = logging.getLogger(__name__)

POWER_STATES: Mapping[int, PowerState] = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUT_OFF,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}
"""Every ``virDomainState`` libvirt defines, each to its own PowerState."""

DETACH = 0x1D
"""Ctrl-], the byte that ends a console session (as in virsh and telnet)."""

# Undefine leaves managed-save images, snapshot and checkpoint metadata, and NVRAM
# files behind rather than refusing; Corral never deletes files through libvirt.
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
)
_UNDEFINE_FLAGS_BASIC = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)

_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN: "machine",
    libvirt.VIR_ERR_NO_NETWORK: "network",
    libvirt.VIR_ERR_NO_STORAGE_POOL: "storage pool",
}
_UNSUPPORTED = {libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED}
_AUTH = {
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_CANCELLED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
}
# libvirt's generic lead-ins say nothing the sentence around them does not.
_LEAD_INS = re.compile(
    r"^(Requested operation is not valid|internal error|operation failed|"
    r"unsupported configuration|invalid argument|Operation not supported|"
    r"this function is not supported by the connection driver): ",
    re.IGNORECASE,
)


# -- process-wide set-up ---------------------------------------------------------------

_setup_lock = threading.Lock()
_event_thread: threading.Thread | None = None


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            log.exception("libvirt event loop iteration failed")
            time.sleep(0.1)


def _prepare_libvirt() -> None:
    """Once per process, before any connection opens.

    Silences libvirt's own printing to stderr (its errors reach users as Corral errors),
    and registers and runs libvirt's default event loop in a daemon thread, as virsh
    does. The loop must be registered before a connection opens, or that connection's
    streams (the console) never get callbacks; once registered it must also run, or the
    daemon's keepalive probes go unanswered and it drops the connection.
    """
    global _event_thread
    with _setup_lock:
        if _event_thread is not None:
            return
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()
        _event_thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        _event_thread.start()


# -- error translation ----------------------------------------------------------------


def _code(exc: libvirt.libvirtError) -> int:
    return int(exc.get_error_code() or 0)


def _detail(exc: libvirt.libvirtError) -> str:
    """libvirt's message as a clause: first line, generic lead-in and final stop removed."""
    lines = (exc.get_error_message() or str(exc) or "unknown error").strip().splitlines()
    return _LEAD_INS.sub("", lines[0] if lines else "unknown error").rstrip(". ")


def _unreachable(uri: str, exc: libvirt.libvirtError) -> HypervisorUnavailable:
    detail = _detail(exc)
    if _code(exc) == libvirt.VIR_ERR_NO_CONNECT:
        return HypervisorUnavailable(
            f"No libvirt driver can open the URI '{uri}'.",
            hint=f"The local host is qemu:///system; libvirt said: {detail}.",
        )
    if _code(exc) in _AUTH or "Permission denied" in detail:
        return HypervisorUnavailable(
            f"libvirtd at {uri} refused the connection.",
            hint=f"Run Corral as root or in the libvirt group; libvirt said: {detail}.",
        )
    return HypervisorUnavailable(
        f"Cannot reach libvirtd at {uri}: is it running?",
        hint=f"Start it as root with 'libvirtd -d' and 'virtlogd -d'; libvirt said: {detail}.",
    )


def _with_flags(call: Callable[[int], Any], flags: int, fallback: int) -> Any:
    """``call(flags)``, or ``call(fallback)`` where the driver rejects those flags.

    libvirt's test driver, for one, knows neither AUTODESTROY nor KEEP_NVRAM.
    """
    try:
        return call(flags)
    except libvirt.libvirtError as exc:
        if _code(exc) != libvirt.VIR_ERR_INVALID_ARG or "unsupported flags" not in _detail(exc):
            raise
        return call(fallback)


def _cleanup(what: str, action: Callable[[], object]) -> None:
    """Undo a partial change; log a failure and carry on, so the original error shows."""
    try:
        action()
    except Exception:
        log.warning("cleanup failed: could not %s", what, exc_info=True)


def _is_active(dom: Any) -> bool:
    """False also for a domain that vanished (a transient domain that stopped)."""
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise


def power_state(code: int) -> PowerState:
    state = POWER_STATES.get(code)
    if state is None:
        # A state newer than this table: say so in the log, claim nothing about it.
        log.warning("libvirt reported unknown domain state %d", code)
        return PowerState.NOSTATE
    return state


# -- small XML documents for networks and pools ----------------------------------------


def bridge_name(network: str) -> str:
    """The Linux bridge of ``network``: stable, at most 15 characters (IFNAMSIZ - 1)."""
    clean = re.sub(r"[^A-Za-z0-9_-]", "", network)
    if clean == network and len(clean) <= 12:
        return f"cr-{clean}"
    digest = hashlib.sha256(network.encode()).hexdigest()[:4]  # keeps truncated names apart
    return f"cr-{clean[:7]}-{digest}"


def _network_xml(name: str) -> str:
    # No <forward>: nothing leaves the host. No <ip>: no address, hence no dnsmasq.
    network = ET.Element("network")
    ET.SubElement(network, "name").text = name
    ET.SubElement(network, "bridge", name=bridge_name(name), stp="on", delay="0")
    return ET.tostring(network, encoding="unicode")


def _pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = path
    return ET.tostring(pool, encoding="unicode")


# -- the driver -------------------------------------------------------------------------


class LibvirtDriver(ComputeDriver):
    """A libvirt host: ``qemu:///system``, ``qemu+ssh://host/system``, ``test:///default``."""

    capabilities: ClassVar[frozenset[str]] = frozenset(
        {CONSOLE, KERNEL_BOOT, LIVE_MIGRATION, SNAPSHOTS}
    )

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._conn: Any = None

    # -- connection ---------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None:
            _prepare_libvirt()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise _unreachable(self.uri, exc) from exc
            if conn is None:  # very old bindings returned None instead of raising
                raise HypervisorUnavailable(f"Cannot reach libvirtd at {self.uri}: is it running?")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _lost(self) -> bool:
        conn = self._conn
        if conn is None:
            return True
        try:
            return not conn.isAlive()
        except libvirt.libvirtError:
            return True

    def _translate(self, exc: libvirt.libvirtError, action: str, name: str) -> CorralError:
        code = _code(exc)
        if code in _NOT_FOUND:
            return NotFound(_NOT_FOUND[code], name)
        transport = exc.get_error_domain() == libvirt.VIR_FROM_RPC
        if (transport or code == libvirt.VIR_ERR_INVALID_CONN) and self._lost():
            self.close()  # the next call reconnects
            return HypervisorUnavailable(
                f"Lost the connection to libvirtd at {self.uri}.",
                hint="Check that libvirtd still runs; the next command reconnects.",
            )
        detail = _detail(exc)
        if code == libvirt.VIR_ERR_OPERATION_INVALID:
            return Conflict(f"Cannot {action}: {detail}.")
        if code == libvirt.VIR_ERR_OPERATION_FAILED and "already" in detail:
            return Conflict(f"Cannot {action}: {detail}.")
        if code in _UNSUPPORTED:
            return HypervisorError(f"This host cannot {action}: {detail}.")
        return HypervisorError(f"Could not {action}: {detail}.")

    @contextlib.contextmanager
    def _translated(self, action: str, name: str = "") -> Iterator[None]:
        """Turn libvirt errors raised inside into Corral errors about ``action``."""
        try:
            yield
        except libvirt.libvirtError as exc:
            raise self._translate(exc, action, name) from exc

    def _find(self, name_or_uuid: str) -> Any:
        """The domain by UUID or name, or None."""
        conn = self._connection()
        lookups: list[Callable[[str], Any]] = [conn.lookupByName]
        with contextlib.suppress(ValueError):
            uuid.UUID(name_or_uuid)
            lookups.insert(0, conn.lookupByUUIDString)
        for lookup in lookups:
            try:
                return lookup(name_or_uuid)
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return None

    # -- the host -----------------------------------------------------------------------

    def facts(self) -> HostFacts:
        conn = self._connection()
        with self._translated("read the host's facts"):
            # getInfo: [arch, memory MiB, active CPUs, MHz, NUMA nodes, sockets, cores, threads]
            info = conn.getInfo()
            caps = safe_fromstring(conn.getCapabilities(), what="host capabilities XML")
            hostname = conn.getHostname()
            hypervisor = conn.getType()
            version = conn.getVersion()
            lib_version = conn.getLibVersion()
        return HostFacts(
            hostname=hostname,
            arch=caps.findtext("host/cpu/arch") or str(info[0]),
            cpu_model=caps.findtext("host/cpu/model") or "unknown",
            cpus=int(info[2]),
            memory_bytes=int(info[1]) << 20,
            hypervisor=hypervisor,
            hypervisor_version=f"{_version(version)} (libvirt {_version(lib_version)})",
            sockets=int(info[5]),
            cores=int(info[6]),
            threads=int(info[7]),
        )

    def connection(self) -> Any:
        """The open libvirt connection, for the storage backend of the same host."""
        return self._connection()

    def pool_capacity(self, name: str) -> tuple[int, int]:
        conn = self._connection()
        with self._translated(f"read storage pool '{name}'", name):
            pool = conn.storagePoolLookupByName(name)
            # No refresh: libvirt refuses one while an upload runs, and a started pool's
            # capacity is known without it.
            _state, capacity, _allocation, available = pool.info()
        return int(capacity), int(available)

    def pool_space(self, name: str, *, fresh: bool = False) -> PoolSpace:
        conn = self._connection()
        with self._translated(f"read storage pool '{name}'", name):
            pool = conn.storagePoolLookupByName(name)
            try:
                if fresh:  # a refresh reads every volume's header: not on a hot path
                    pool.refresh(0)
            except libvirt.libvirtError as exc:
                # libvirt refuses a refresh while an upload or a build runs in the pool
                log.debug("pool %s not refreshed: %s", name, _detail(exc))
            _state, capacity, allocation, available = pool.info()
        return PoolSpace(int(capacity), int(allocation), int(available))

    def kvm_device_present(self) -> bool:
        conn = self._connection()
        with self._translated("read the host's capabilities"):
            caps = safe_fromstring(conn.getCapabilities(), what="host capabilities XML")
        arch = caps.findtext("host/cpu/arch")
        return any(
            guest.find("arch/domain[@type='kvm']") is not None
            for guest in caps.findall("guest")
            if arch is None or _attr(guest.find("arch"), "name") == arch
        )

    def ensure_network(self, name: str) -> None:
        conn = self._connection()
        with self._translated(f"set up network '{name}'", name):
            net, defined_here = _lookup_or_define(
                lambda: conn.networkLookupByName(name),
                lambda: conn.networkDefineXML(_network_xml(name)),
                libvirt.VIR_ERR_NO_NETWORK,
            )
            if safe_fromstring(net.XMLDesc(0), what="network XML").find("forward") is not None:
                # Never start it: libvirt's 'default' NAT network, for one, reaches outside.
                raise Conflict(
                    f"Network '{name}' forwards traffic off this host, so Corral will not use it.",
                    hint="Choose another network name; Corral creates isolated networks.",
                )
            try:
                if not net.autostart():
                    net.setAutostart(1)
                _start(net)
            except libvirt.libvirtError:
                if defined_here:
                    _cleanup(f"undefine network {name}", net.undefine)
                raise

    def ensure_pool(self, name: str, path: str) -> None:
        conn = self._connection()
        with self._translated(f"set up storage pool '{name}'", name):
            pool, defined_here = _lookup_or_define(
                lambda: conn.storagePoolLookupByName(name),
                lambda: conn.storagePoolDefineXML(_pool_xml(name, path), 0),
                libvirt.VIR_ERR_NO_STORAGE_POOL,
            )
            root = safe_fromstring(pool.XMLDesc(0), what="storage pool XML")
            kind, where = root.get("type"), root.findtext("target/path") or ""
            if kind != "dir" or posixpath.normpath(where) != posixpath.normpath(path):
                raise Conflict(
                    f"Storage pool '{name}' already exists as a {kind} pool at {where}.",
                    hint=f"Choose another pool name, or point Corral at {where}.",
                )
            try:
                if not pool.autostart():
                    pool.setAutostart(1)
                if not pool.isActive():
                    pool.build(0)  # a dir pool's build is mkdir; an existing dir is kept
                    _start(pool)
            except libvirt.libvirtError:
                if defined_here:
                    _cleanup(f"undefine storage pool {name}", pool.undefine)
                raise

    # -- domains ------------------------------------------------------------------------

    def define(self, plan: DomainPlan) -> None:
        xml = build_domain_xml(plan)
        conn = self._connection()
        with self._translated(f"define machine '{plan.name}'", plan.name):
            existing = self._find_uuid(plan.identity.uuid)
            if existing is not None:
                other = existing.name()
                if other != plan.name:
                    raise Conflict(
                        f"UUID {plan.identity.uuid} already belongs to machine '{other}'."
                    )
                if existing.isPersistent():
                    return  # defined before a crash: done
            try:
                # No VALIDATE flag: the schema check costs ~6 ms per define, most of the
                # clone budget. The XML comes from typed objects, and a contract test
                # validates every shape build_domain_xml makes against libvirt's schema.
                conn.defineXML(xml)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_OPERATION_FAILED and "already" in _detail(exc):
                    raise Conflict(f"A machine named '{plan.name}' already exists.") from exc
                raise

    def run_transient(self, plan: DomainPlan) -> None:
        xml = build_domain_xml(plan)
        conn = self._connection()
        with self._translated(f"start machine '{plan.name}'", plan.name):
            existing = self._find_uuid(plan.identity.uuid)
            if existing is not None and existing.name() == plan.name and _is_active(existing):
                return
            # AUTODESTROY: the probe dies with this connection, so a crash leaves none.
            _with_flags(
                lambda flags: conn.createXML(xml, flags), libvirt.VIR_DOMAIN_START_AUTODESTROY, 0
            )

    def start(self, name: str) -> None:
        with self._translated(f"start machine '{name}'", name):
            dom = self._connection().lookupByName(name)
            if dom.isActive():
                return
            try:
                dom.create()
            except libvirt.libvirtError:
                if _is_active(dom):
                    return  # started by someone else meanwhile
                raise

    def shutdown(self, name: str) -> None:
        with self._translated(f"shut down machine '{name}'", name):
            dom = self._connection().lookupByName(name)
            if not dom.isActive():
                return
            try:
                # Flags 0: QEMU presses the ACPI power button (no guest agent configured).
                dom.shutdown()
            except libvirt.libvirtError:
                if not _is_active(dom):
                    return
                raise

    def reboot(self, name: str) -> None:
        with self._translated(f"reboot machine '{name}'", name):
            dom = self._connection().lookupByName(name)
            if not dom.isActive():
                raise Conflict(f"Machine '{name}' is not running.", hint="Start it instead.")
            dom.reboot(0)

    def destroy(self, name: str) -> None:
        with self._translated(f"power off machine '{name}'", name):
            dom = self._find(name)
            if dom is None or not _is_active(dom):
                return
            try:
                dom.destroy()
            except libvirt.libvirtError:
                if not _is_active(dom):
                    return  # it stopped on its own meanwhile
                raise

    def undefine(self, name_or_uuid: str, *, force: bool = False) -> None:
        with self._translated(f"undefine machine '{name_or_uuid}'", name_or_uuid):
            dom = self._find(name_or_uuid)
            if dom is None:
                return
            name, persistent = dom.name(), dom.isPersistent()
            if _is_active(dom):
                if not force:
                    state = power_state(dom.state()[0])
                    raise Conflict(
                        f"Machine '{name}' is {state}.",
                        hint="Stop it first, or force the removal.",
                    )
                self.destroy(name)
            if not persistent:
                return  # a transient domain is gone once it stops
            try:
                _with_flags(dom.undefineFlags, _UNDEFINE_FLAGS, _UNDEFINE_FLAGS_BASIC)
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                    raise

    def state(self, name: str) -> PowerState:
        with self._translated(f"read the state of machine '{name}'", name):
            code, _reason = self._connection().lookupByName(name).state()
        return power_state(code)

    def power_states(self) -> dict[str, PowerState]:
        # One RPC for every domain, where listAllDomains plus state() costs one per domain.
        with self._translated("read the state of the machines"):
            stats = self._connection().getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
        return {dom.name(): power_state(values["state.state"]) for dom, values in stats}

    def domain_names(self) -> frozenset[str]:
        with self._translated("list the machines"):
            return frozenset(d.name() for d in self._connection().listAllDomains(0))

    def list_domains(self) -> list[DomainSummary]:
        summaries = []
        with self._translated("list the machines"):
            for dom in self._connection().listAllDomains(0):
                try:
                    state, _reason = dom.state()
                    xml = dom.XMLDesc(0)
                except libvirt.libvirtError as exc:
                    if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # a transient domain stopped while we listed
                    raise
                parsed = parse_domain_xml(xml)
                summaries.append(
                    DomainSummary(parsed.name, parsed.uuid, power_state(state), parsed)
                )
        return sorted(summaries, key=lambda s: s.name)

    def domain_xml(self, name: str) -> ParsedDomain:
        with self._translated(f"read the definition of machine '{name}'", name):
            xml = self._connection().lookupByName(name).XMLDesc(0)
        return parse_domain_xml(xml)

    def attach_console(self, name: str, stdin_fd: int, stdout_fd: int) -> None:
        conn = self._connection()
        with self._translated(f"open the console of machine '{name}'", name):
            dom = conn.lookupByName(name)
            if not dom.isActive():
                raise Conflict(f"Machine '{name}' is not running.", hint="Start it first.")
            stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            try:
                dom.openConsole(None, stream, 0)
            except libvirt.libvirtError as exc:
                _cleanup("abort the console stream", stream.abort)
                if "Active console session" in _detail(exc):
                    raise Conflict(
                        f"Another session holds the console of machine '{name}'."
                    ) from exc
                raise
            with _raw_tty(stdin_fd):
                _ConsoleSession(stream, stdin_fd, stdout_fd).run()

    def migrate_live(
        self, name: str, move: LiveMigration, on_progress: Callable[[float], None]
    ) -> None:
        conn = self._connection()
        with self._translated(f"move machine '{name}' to {move.dest_uri}", name):
            dom = conn.lookupByName(name)
            if not dom.isActive():
                raise Conflict(f"Machine '{name}' is not running.",
                               hint="Move a stopped machine without --live.")
            live = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
            persistent = dom.XMLDesc(
                libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE
            )
            params: dict[str, Any] = {
                libvirt.VIR_MIGRATE_PARAM_URI: _tcp_uri(move.data_address),
                libvirt.VIR_MIGRATE_PARAM_DEST_XML:
                    relocate_domain_xml(live, move.paths, move.network),
                libvirt.VIR_MIGRATE_PARAM_PERSIST_XML:
                    relocate_domain_xml(persistent, move.paths, move.network),
            }
            # Peer to peer: the source daemon drives the whole move, so it completes or
            # aborts as one even if Corral dies half-way. Auto-converge throttles a guest
            # that dirties memory faster than the link drains it.
            flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                     | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                     | libvirt.VIR_MIGRATE_AUTO_CONVERGE | libvirt.VIR_MIGRATE_ABORT_ON_ERROR)
            if move.bandwidth_mib:
                params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = move.bandwidth_mib
            if move.copy_disks:
                params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(move.copy_disks)
                params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = _tcp_uri(move.data_address)
                flags |= (libvirt.VIR_MIGRATE_NON_SHARED_INC if move.incremental
                          else libvirt.VIR_MIGRATE_NON_SHARED_DISK)
            else:
                # libvirt calls a migration without storage copy unsafe unless it can tell
                # the filesystem is a cluster one; the caller checked the target reads
                # the very same files.
                flags |= libvirt.VIR_MIGRATE_UNSAFE
            watcher = _MigrationWatcher(dom, on_progress)
            watcher.start()
            try:
                dom.migrateToURI3(move.dest_uri, params, flags)
            finally:
                watcher.stop()
            on_progress(1.0)

    # -- snapshots ----------------------------------------------------------------------

    def snapshot_create(self, name: str, snapshot: str, *,
                        description: str | None = None) -> ParsedSnapshot:
        with self._translated(f"snapshot machine '{name}'", name):
            dom = self._connection().lookupByName(name)
            if snapshot in dom.snapshotListNames(0):
                raise Conflict(f"Machine '{name}' already has a snapshot named '{snapshot}'.",
                               hint="Pick another name, or delete that snapshot first.")
            state = power_state(dom.state()[0])
            if state is PowerState.PAUSED:
                raise Conflict(f"Machine '{name}' is paused.",
                               hint="Resume or stop it, then take the snapshot.")
            xml = build_snapshot_xml(
                snapshot, with_memory=bool(dom.isActive()), description=description,
                disks=parse_domain_xml(dom.XMLDesc(0)).disks,
            )
            made = dom.snapshotCreateXML(xml, 0)
            return parse_snapshot_xml(made.getXMLDesc(0))

    def snapshots(self, name: str) -> list[ParsedSnapshot]:
        with self._translated(f"list the snapshots of machine '{name}'", name):
            dom = self._connection().lookupByName(name)
            found = [parse_snapshot_xml(s.getXMLDesc(0)) for s in dom.listAllSnapshots(0)]
        return sorted(found, key=lambda s: (s.created_at, s.name))

    def snapshot_current(self, name: str) -> str | None:
        with self._translated(f"read the current snapshot of machine '{name}'", name):
            dom = self._connection().lookupByName(name)
            if not dom.hasCurrentSnapshot(0):
                return None
            return str(dom.snapshotCurrent(0).getName())

    def snapshot_revert(self, name: str, snapshot: str) -> None:
        with self._translated(f"revert machine '{name}' to snapshot '{snapshot}'", name):
            snap = self._snapshot(name, snapshot)
            snap.getDomain().revertToSnapshot(snap, 0)

    def snapshot_delete(self, name: str, snapshot: str) -> None:
        with self._translated(f"delete snapshot '{snapshot}' of machine '{name}'", name):
            self._snapshot(name, snapshot).delete(0)

    # -- helpers ------------------------------------------------------------------------

    def _snapshot(self, name: str, snapshot: str) -> Any:
        dom = self._connection().lookupByName(name)
        try:
            return dom.snapshotLookupByName(snapshot, 0)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                raise NotFound("snapshot", f"{name}@{snapshot}",
                               hint=f"'corral vm snapshot list {name}' shows them.") from exc
            raise

    def _find_uuid(self, machine_uuid: str) -> Any:
        try:
            return self._connection().lookupByUUIDString(machine_uuid)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise


def _tcp_uri(address: str) -> str:
    return f"tcp://[{address}]" if ":" in address else f"tcp://{address}"


class _MigrationWatcher:
    """Reports a migration's progress from libvirt's job statistics, twice a second."""

    INTERVAL = 0.5

    def __init__(self, dom: Any, on_progress: Callable[[float], None]) -> None:
        self._dom = dom
        self._on_progress = on_progress
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migration-progress",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.INTERVAL):
            try:
                stats = self._dom.jobStats()
            except libvirt.libvirtError:
                continue  # between phases there may be no job to read
            total = stats.get("data_total", 0) + stats.get("disk_total", 0)
            sent = stats.get("data_processed", 0) + stats.get("disk_processed", 0)
            if total > 0:
                try:
                    self._on_progress(min(sent / total, 1.0))
                except Exception:
                    log.exception("migration progress callback failed")


def _version(number: int) -> str:
    """libvirt's packed version (major * 1,000,000 + minor * 1,000 + release) as text."""
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


def _attr(el: ET.Element | None, name: str) -> str | None:
    return None if el is None else el.get(name)


def _start(obj: Any) -> None:
    """Start a network or pool unless it runs; another process may start it first."""
    if obj.isActive():
        return
    try:
        obj.create()
    except libvirt.libvirtError:
        if not obj.isActive():
            raise


def _lookup_or_define(
    lookup: Callable[[], Any], define: Callable[[], Any], missing: int
) -> tuple[Any, bool]:
    """The object, and whether this call defined it."""
    try:
        return lookup(), False
    except libvirt.libvirtError as exc:
        if _code(exc) != missing:
            raise
    try:
        return define(), True
    except libvirt.libvirtError as exc:
        # Another process may have defined it between our lookup and our define.
        try:
            return lookup(), False
        except libvirt.libvirtError:
            raise exc from None


# -- the serial console -----------------------------------------------------------------


@contextlib.contextmanager
def _raw_tty(fd: int) -> Iterator[None]:
    """Raw mode on a terminal, so Ctrl-C and the like reach the guest; always restored."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


class _ConsoleSession:
    """Copies bytes between a terminal and a console stream, on libvirt's event thread.

    The stream is non-blocking: guest output is written as it arrives; keyboard input is
    queued and sent when the stream can take it. Ctrl-], end of input, or the stream's
    end (the guest stopped) finish the session.
    """

    def __init__(self, stream: Any, stdin_fd: int, stdout_fd: int) -> None:
        self.stream = stream
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.pending = bytearray()
        self.done = threading.Event()

    def run(self) -> None:
        """Copy until the session ends; the stream is closed afterwards, whatever happens."""
        ends = libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        watch: int | None = None
        try:
            self.stream.eventAddCallback(
                libvirt.VIR_STREAM_EVENT_READABLE | ends, self._on_stream, None
            )
            watch = libvirt.virEventAddHandle(
                self.stdin_fd,
                libvirt.VIR_EVENT_HANDLE_READABLE
                | libvirt.VIR_EVENT_HANDLE_ERROR
                | libvirt.VIR_EVENT_HANDLE_HANGUP,
                self._on_stdin,
                None,
            )
            self.done.wait()
        finally:
            if watch is not None:
                _cleanup("stop watching the terminal", lambda: libvirt.virEventRemoveHandle(watch))
            _cleanup("stop watching the console", self.stream.eventRemoveCallback)
            _cleanup("close the console stream", self.stream.abort)

    def _on_stream(self, _stream: Any, events: int, _opaque: object) -> None:
        try:
            if events & libvirt.VIR_STREAM_EVENT_WRITABLE:
                self._flush()
            if events & libvirt.VIR_STREAM_EVENT_READABLE:
                self._copy_out()
            if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
                self.done.set()
        except (libvirt.libvirtError, OSError):
            self.done.set()  # the guest stopped or the terminal went away: session over

    def _on_stdin(self, _watch: int, fd: int, events: int, _opaque: object) -> None:
        try:
            data = os.read(fd, 1024) if events & libvirt.VIR_EVENT_HANDLE_READABLE else b""
            if not data or DETACH in data:
                self.pending += data.partition(bytes([DETACH]))[0]
                self._flush()
                self.done.set()
                return
            self.pending += data
            self._flush()
        except (libvirt.libvirtError, OSError):
            self.done.set()

    def _copy_out(self) -> None:
        while True:
            data = self.stream.recv(4096)
            if data == -2:  # would block: wait for the next readable event
                return
            if not data:
                self.done.set()  # end of stream
                return
            view = memoryview(data)
            while view:
                view = view[os.write(self.stdout_fd, view) :]

    def _flush(self) -> None:
        while self.pending:
            sent = self.stream.send(bytes(self.pending))
            if sent == -2:
                break
            del self.pending[:sent]
        events = libvirt.VIR_STREAM_EVENT_READABLE
        events |= libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        if self.pending:
            events |= libvirt.VIR_STREAM_EVENT_WRITABLE
        self.stream.eventUpdateCallback(events)
