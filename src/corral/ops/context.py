"""What every operation works with: settings, the store, the host's driver and storage.

Opening a context recovers the jobs a dead process left behind, so after a crash the
next ``corral`` command finishes or rolls back what was interrupted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType

from corral.compute.base import ComputeDriver, load_compute_driver
from corral.config import Settings
from corral.errors import HypervisorUnavailable, NotFound
from corral.model import Host, Job, Overcommit, StoragePool
from corral.storage.base import StorageBackend, load_storage_backend
from corral.storage.qcow2_dir import Qcow2DirBackend
from corral.storage.qemu_img import QemuImgLimits
from corral.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HostHandle:
    """One enrolled host as operations reach it: its record, hypervisor and storage.

    A remote host is reached only through libvirt (its storage too), never through
    this machine's filesystem.
    """

    host: Host
    driver: ComputeDriver
    storage: StorageBackend
    local: bool
    console_dir: Path

    def console_log(self, machine: str) -> Path:
        """Where the machine's serial console is written, on its host."""
        suffix = ".log" if self.local else ".console.log"
        return self.console_dir / f"{machine}{suffix}"

    def read_console(self, machine: str, max_bytes: int = 1 << 20) -> bytes:
        """The end of the machine's console log (empty before the guest wrote any)."""
        try:
            return self.storage.read_tail(self.console_log(machine), max_bytes)
        except NotFound:
            return b""

    def remove_console(self, machine: str) -> None:
        self.storage.delete(self.console_log(machine))


class Context:
    def __init__(self, settings: Settings, *, recover: bool = True) -> None:
        self.settings = settings
        for path in (settings.state_dir, settings.image_dir, settings.pool_dir):
            path.mkdir(parents=True, exist_ok=True)
            # QEMU runs as libvirt-qemu and must reach disks, bases and kernels.
            path.chmod(0o755)
        self.store = Store(settings.db_url)
        self.recovered: list[Job] = []
        self.on_progress: Callable[[float], None] | None = None
        """Where long steps (copies, conversions) report percent done, if anyone listens."""
        self._handles: dict[str, HostHandle] = {}
        self._handles_lock = threading.Lock()
        self._pools: dict[str, StorageBackend] = {}
        if recover:
            self.recover()

    def recover(self) -> None:
        from corral.ops.jobs import recover_abandoned

        try:
            self.recovered = recover_abandoned(self)
        except HypervisorUnavailable:
            # Compensations need libvirtd; leave the jobs for a later command.
            log.warning("libvirtd is not reachable; interrupted jobs will be recovered later")

    @cached_property
    def owner(self) -> str:
        """The lock file that marks this process's jobs as alive (see ``ops.jobs``)."""
        from corral.ops.jobs import OwnerLock

        self._owner_lock = OwnerLock(self.settings.lock_dir)
        return self._owner_lock.name

    @cached_property
    def driver(self) -> ComputeDriver:
        return load_compute_driver("libvirt", self.settings.host_uri)

    @cached_property
    def limits(self) -> QemuImgLimits:
        return QemuImgLimits(
            cpu_seconds=self.settings.qemu_img_cpu_seconds,
            address_space=self.settings.qemu_img_address_space,
        )

    @cached_property
    def storage(self) -> Qcow2DirBackend:
        return Qcow2DirBackend(self.settings.pool_dir, self.limits)

    @property
    def overcommit(self) -> Overcommit:
        s = self.settings
        return Overcommit(s.cpu_overcommit, s.memory_overcommit, s.disk_overcommit)

    def on(self, host: str | Host) -> HostHandle:
        """The handle of an enrolled host, connected on first use and kept open."""
        name = host if isinstance(host, str) else host.name
        with self._handles_lock:
            handle = self._handles.get(name)
            if handle is None:
                record = host if isinstance(host, Host) else self.store.get_host(name)
                handle = self._connect(record)
                self._handles[name] = handle
            return handle

    def pool_storage(self, pool: StoragePool) -> StorageBackend:
        """The backend of an added storage pool (``ops.pools``), loaded on first use."""
        with self._handles_lock:
            found = self._pools.get(pool.name)
            if found is None:
                found = load_storage_backend(pool.type, Path(pool.path), self.limits)
                self._pools[pool.name] = found
            return found

    def disk_storage(self, host: str, pool: str | None) -> StorageBackend:
        """Where a machine's disk lives: the added pool ``pool``, else its host's own."""
        if pool is None:
            return self.on(host).storage
        with self._handles_lock:
            found = self._pools.get(pool)
        if found is not None:
            return found
        record = self.store.find_storage_pool(pool)
        if record is None:
            raise NotFound("storage pool", pool, hint="'corral pool list' shows the pools.")
        return self.pool_storage(record)

    def forget_pool(self, name: str) -> None:
        with self._handles_lock:
            self._pools.pop(name, None)

    def forget_handle(self, host: str) -> None:
        """Drop a host's connection (it was removed, or its URI changed)."""
        with self._handles_lock:
            handle = self._handles.pop(host, None)
        if handle is not None and not handle.local:
            handle.driver.close()

    def _connect(self, host: Host) -> HostHandle:
        if host.name == self.settings.host_name:
            return HostHandle(host, self.driver, self.storage, True, self.settings.console_dir)
        from corral.compute.libvirt_driver import LibvirtDriver
        from corral.storage.libvirt_pool import LibvirtPoolBackend

        driver = LibvirtDriver(host.uri)
        storage = LibvirtPoolBackend(driver.connection, host.pool_name, host.pool_path)
        # Console logs sit in the host's pool: libvirt reads them back as volumes.
        return HostHandle(host, driver, storage, False, Path(host.pool_path))

    def close(self) -> None:
        for handle in self._handles.values():
            if not handle.local:
                handle.driver.close()
        if "driver" in self.__dict__:
            self.driver.close()
        if "owner" in self.__dict__:
            self._owner_lock.release()
        self.store.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
