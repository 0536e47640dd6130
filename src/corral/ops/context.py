"""What every operation works with: settings, the store, the host's driver and storage.

Opening a context recovers the jobs a dead process left behind, so after a crash the
next ``corral`` command finishes or rolls back what was interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cached_property
from types import TracebackType

from corral.compute.base import ComputeDriver, load_compute_driver
from corral.config import Settings
from corral.errors import HypervisorUnavailable
from corral.model import Job
from corral.storage.qcow2_dir import Qcow2DirBackend
from corral.storage.qemu_img import QemuImgLimits
from corral.store import Store

log = logging.getLogger(__name__)


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

    def close(self) -> None:
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
