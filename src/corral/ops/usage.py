"""Space accounting: what each pool, machine and image uses, as the hosts report it.

For a machine, *owned* bytes are allocated to its own files (a linked clone's overlay)
and *shared* bytes to the bases it reads through: ZFS would call owned + shared
REFER and owned USED. A pool's figures are its host's, read fresh. The fill guard
(``pool_fill_limit``) refuses new volumes in a pool filled past the limit, before any
byte is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from corral.compute.base import PoolSpace
from corral.errors import CorralError, NoSpace
from corral.model.units import format_size
from corral.ops.context import Context, HostHandle
from corral.ops.distribute import image_on


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
    """Every host's pool (or ``host``'s), with its machines and the images on it."""
    loads = {load.host.name: load for load in ctx.store.pool_snapshot()}
    if host is not None:
        ctx.store.get_host(host)  # NotFound, with its hint
    names = [host] if host is not None else sorted(loads)
    return [_one(ctx, ctx.on(name), loads[name].images) for name in names]


def _one(ctx: Context, handle: HostHandle, present: frozenset[str]) -> PoolUsage:
    h = handle.host
    space = _space(handle, fresh=True)
    machines, images, unreadable = [], [], []
    for m in ctx.store.list_machines(h.name):
        try:
            use = handle.storage.usage(Path(m.disk_path))
        except CorralError:
            unreadable.append(m.name)
            continue
        machines.append(MachineSpace(m.name, use.virtual_size, use.owned_bytes,
                                     use.shared_bytes, m.image if use.shared_bytes else None))
    library = ctx.store.list_images()
    for image in library if handle.local else [i for i in library if i.name in present]:
        try:
            use = handle.storage.usage(Path(image_on(handle, image).base))
        except CorralError:
            unreadable.append(image.name)
            continue
        images.append(ImageSpace(image.name, use.virtual_size, use.owned_bytes))
    return PoolUsage(h.name, h.pool_name, h.pool_path, space.capacity, space.allocation,
                     space.available, space.fill, machines, images, unreadable)


def require_room(ctx: Context, handle: HostHandle, what: str) -> None:
    """Refuse to add ``what`` to a pool filled past ``pool_fill_limit``, by the host's
    running count (libvirt keeps it as volumes come and go; no rescan of the pool)."""
    limit = ctx.settings.pool_fill_limit
    if limit >= 1:
        return
    space = _space(handle, fresh=False)
    if space.fill >= limit:
        raise NoSpace(
            f"The pool of host '{handle.host.name}' is {100 * space.fill:.0f} % full "
            f"({format_size(space.available)} free), past the {100 * limit:g} % limit, so "
            f"{what} was not written there.",
            hint="Free space in the pool (corral pool usage), or raise pool_fill_limit.",
        )


def _space(handle: HostHandle, *, fresh: bool) -> PoolSpace:
    if handle.local:
        # Corral writes the local pool's files itself, behind libvirt's counts; the
        # filesystem's own figures are exact and cost one system call.
        st = os.statvfs(handle.host.pool_path)
        return PoolSpace(capacity=st.f_blocks * st.f_frsize,
                         allocation=(st.f_blocks - st.f_bfree) * st.f_frsize,
                         available=st.f_bavail * st.f_frsize)
    return handle.driver.pool_space(handle.host.pool_name, fresh=fresh)
