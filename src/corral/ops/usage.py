"""Space accounting: what each pool, machine and image uses, as the hosts report it.

For a machine, *owned* bytes are allocated to its own files (a linked clone's overlay)
and *shared* bytes to the bases it reads through: ZFS would call owned + shared
REFER and owned USED. A pool's figures are its host's, read fresh. The fill guard
(``pool_fill_limit``) refuses new volumes in a pool filled past the limit, before any
byte is written.

Disk quotas count owned bytes too (at least each disk's claim, see the store's usage):
the figures are measured again, for the project's machines, before each quota check,
and whenever ``pool usage`` reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from corral.compute.base import PoolSpace
from corral.errors import CorralError, NoSpace
from corral.model import Image, Machine, StoragePool, Usage
from corral.model.units import format_size
from corral.ops import accounts
from corral.ops.context import Context, HostHandle
from corral.ops.distribute import image_on
from corral.ops.pools import base_path, get_pool
from corral.storage.base import StorageBackend
from corral.store.repository import MachineFilter


@dataclass(frozen=True, slots=True)
class MachineSpace:
    name: str
    virtual_size: int
    owned_bytes: int
    shared_bytes: int
    base: str | None
    """The library image it shares, if any."""


@dataclass(frozen=True, slots=True)
class ImageSpace:
    name: str
    virtual_size: int
    allocated_bytes: int


@dataclass(frozen=True, slots=True)
class PoolUsage:
    host: str
    pool: str
    path: str
    capacity_bytes: int
    used_bytes: int
    """Allocated in the pool's filesystem, whoever allocated it."""
    available_bytes: int
    fill: float
    """used / (used + available), as ``df`` counts it."""
    machines: list[MachineSpace]
    images: list[ImageSpace]
    unreadable: list[str]
    """Machines or images whose files could not be read (named, never guessed)."""

    @property
    def owned_bytes(self) -> int:
        return sum(m.owned_bytes for m in self.machines)

    @property
    def base_bytes(self) -> int:
        return sum(i.allocated_bytes for i in self.images)


def pool_usage(ctx: Context, host: str | None = None) -> list[PoolUsage]:
    """Every host's own pool and every added pool (or only ``host``'s), with the
    machines and the images in each."""
    loads = {load.host.name: load for load in ctx.store.pool_snapshot()}
    if host is not None:
        ctx.store.get_host(host)  # NotFound, with its hint
    names = [host] if host is not None else sorted(loads)
    own = [_own(ctx, ctx.on(name), loads[name].images) for name in names]
    added = [_added(ctx, pool) for pool in ctx.store.list_storage_pools(host)]
    pools = own + added
    ctx.store.record_owned_bytes({m.name: m.owned_bytes for p in pools for m in p.machines})
    return pools


def _own(ctx: Context, handle: HostHandle, present: frozenset[str]) -> PoolUsage:
    h = handle.host
    library = ctx.store.list_images()
    bases = [(i, image_on(handle, i).base)
             for i in (library if handle.local else [i for i in library if i.name in present])]
    machines = [m for m in ctx.store.list_machines(h.name) if m.storage_pool is None]
    return _tally(handle.storage, _space(handle, fresh=True), h.name, h.pool_name,
                  h.pool_path, machines, bases)


def _added(ctx: Context, pool: StoragePool) -> PoolUsage:
    storage = ctx.pool_storage(pool)
    bases = [(i, base_path(ctx, pool, i)) for i in ctx.store.list_images()]
    machines = [m for m in ctx.store.list_machines(pool.host) if m.storage_pool == pool.name]
    return _tally(storage, _statvfs(pool.path), pool.host, pool.name, pool.path, machines,
                  [(i, str(path)) for i, path in bases if storage.exists(path)])


def _tally(storage: StorageBackend, space: PoolSpace, host: str, pool: str, path: str,
           machines: list[Machine], bases: list[tuple[Image, str]]) -> PoolUsage:
    spaces, images, unreadable = [], [], []
    for m in machines:
        try:
            use = storage.usage(Path(m.disk_path))
        except CorralError:
            unreadable.append(m.name)
            continue
        spaces.append(MachineSpace(m.name, use.virtual_size, use.owned_bytes,
                                   use.shared_bytes, m.image if use.shared_bytes else None))
    for image, base in bases:
        try:
            use = storage.usage(Path(base))
        except CorralError:
            unreadable.append(image.name)
            continue
        images.append(ImageSpace(image.name, use.virtual_size, use.owned_bytes))
    return PoolUsage(host, pool, path, space.capacity, space.allocation, space.available,
                     space.fill, spaces, images, unreadable)


def require_quota(ctx: Context, project: str, asked: Usage) -> None:
    """Refuse up front what ``project``'s quota has no room for, with its disks' owned
    bytes measured now. A machine whose disk cannot be read counts as last measured."""
    if ctx.store.get_project(project).quota.unlimited:
        return
    owned = {}
    for m in ctx.store.list_machines(where=MachineFilter(projects=[project])):
        try:
            owned[m.name] = ctx.disk_storage(m.host, m.storage_pool).usage(
                Path(m.disk_path)).owned_bytes
        except CorralError:
            continue
    ctx.store.record_owned_bytes(owned)
    accounts.require_room(ctx.store, project, asked)


def require_room(ctx: Context, handle: HostHandle, what: str, *,
                 pool: str | None = None, needed: int = 0) -> None:
    """Refuse to add ``what`` to a pool filled past ``pool_fill_limit``, by the host's
    running count (libvirt keeps it as volumes come and go; no rescan of the pool), or
    to one with less than ``needed`` bytes free (then counted afresh).

    ``pool`` names an added pool of that host; ``None`` is the host's own. ``needed`` is
    for a file of known size sent to another host: refused here, it never meets a full
    disk half-way through a libvirt upload stream, which can hang rather than fail.
    """
    if pool is None:
        space = _space(handle, fresh=needed > 0)
        name = f"The pool of host '{handle.host.name}'"
    else:
        space, name = _statvfs(get_pool(ctx, pool).path), f"Storage pool '{pool}'"
    if needed > space.available:
        raise NoSpace(
            f"{name} has only {format_size(space.available)} of free space, and {what} "
            f"needs {format_size(needed)}, so it was not written there.",
            hint="Free space in the pool (corral pool usage), or choose another host.",
        )
    limit = ctx.settings.pool_fill_limit
    if limit < 1 and space.fill >= limit:
        raise NoSpace(
            f"{name} is {100 * space.fill:.0f} % full "
            f"({format_size(space.available)} free), past the {100 * limit:g} % limit, so "
            f"{what} was not written there.",
            hint="Free space in the pool (corral pool usage), or raise pool_fill_limit.",
        )


def _space(handle: HostHandle, *, fresh: bool) -> PoolSpace:
    if handle.local:
        # Corral writes the local pool's files itself, behind libvirt's counts; the
        # filesystem's own figures are exact and cost one system call.
        return _statvfs(handle.host.pool_path)
    return handle.driver.pool_space(handle.host.pool_name, fresh=fresh)


def _statvfs(path: str) -> PoolSpace:
    st = os.statvfs(path)
    return PoolSpace(capacity=st.f_blocks * st.f_frsize,
                     allocation=(st.f_blocks - st.f_bfree) * st.f_frsize,
                     available=st.f_bavail * st.f_frsize)
