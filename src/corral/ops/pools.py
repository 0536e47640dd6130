"""Storage pools by type: ``corral pool add NAME --type TYPE --path DIR`` and friends.

Every host has its own directory pool (named like its libvirt pool, ``corral``),
enrolled with the host and used when no pool is named. An added
pool is a directory on the host Corral runs on, managed by the ``corral.storage``
plugin of its type: ``btrfs`` clones a disk by snapshotting its subvolume, ``reflink``
by FICLONE, ``qcow2`` by an overlay. A machine created with ``--pool NAME`` gets its
disk there, cloned from a copy of its image that the pool keeps (``base-IMAGE-SHA``,
copied once and verified), because a native clone works only within one filesystem.

Only the local host's pools can be added: the typed backends act on the filesystem
(ioctls, reflinks), which Corral reaches only where it runs; remote hosts are reached
through libvirt alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import Conflict, CorralError, InvalidInput, NotFound, StorageError
from corral.identity.names import check_name
from corral.model import Host, Image, Machine, StoragePool
from corral.ops.context import Context
from corral.ops.hosts import local_host
from corral.storage.base import (
    available_storage_backends,
    load_storage_backend,
)

_LOCK = ".corral-pool.lock"
_RESERVED = frozenset({"usage"})
"""Names the API's routes under /pools take."""
_FILESYSTEMS = {"btrfs": ("btrfs",), "reflink": ("xfs", "btrfs")}
"""The filesystems each built-in type needs (``stat -f`` names); others take any."""


@dataclass(frozen=True, slots=True)
class PoolView:
    """A pool as ``pool list`` and ``pool show`` present it."""

    pool: StoragePool
    capabilities: frozenset[str]
    machines: list[str]
    """Machines whose disks it holds."""
    images: list[str]
    """Library images it holds a copy of (the bases its clones come from); for a host's
    own pool, see ``corral pool usage``."""
    capacity_bytes: int | None
    """The filesystem's size; for a host's own pool, as its last probe measured it."""
    claimed_bytes: int
    """What the disks of its machines reserve."""

    @property
    def added(self) -> bool:
        return self.pool.created_at is not None

    def to_dict(self) -> dict[str, Any]:
        """The keys of the API's PoolOut, which the CLI shows alike from either side."""
        p, capacity = self.pool, self.capacity_bytes
        return {
            "name": p.name, "host": p.host, "type": p.type, "path": p.path,
            "added": self.added, "capabilities": sorted(self.capabilities),
            "capacity_bytes": capacity, "claimed_bytes": self.claimed_bytes,
            "free_bytes": None if capacity is None else max(0, capacity - self.claimed_bytes),
            "machines": self.machines, "images": self.images,
        }


def add_pool(ctx: Context, name: str, type_: str, path: Path) -> StoragePool:
    """Register the directory ``path`` on the local host as a pool of ``type_``.

    Refused, with nothing written, for a taken or reserved name, an unknown type, a
    directory that is missing, shared with Corral's own, or on a filesystem the type
    cannot clone on (a reflink is tried, not assumed).
    """
    check_name(name, what="pool name")
    if name in _RESERVED or name in {h.pool_name for h in ctx.store.list_hosts()}:
        raise InvalidInput(f"'{name}' names a host's own pool or an API route; "
                           "choose another name.")
    if ctx.store.find_storage_pool(name) is not None:
        raise Conflict(f"A storage pool named '{name}' already exists.",
                       hint="'corral pool list' shows the pools.")
    host, _said = local_host(ctx)
    if type_ not in available_storage_backends():
        raise InvalidInput(
            f"No storage type named '{type_}' (available: "
            f"{', '.join(available_storage_backends())})."
        )
    directory = _checked_directory(ctx, host, path)
    _probe(type_, directory)
    pool = StoragePool(name=name, type=type_, host=host.name, path=str(directory))
    # The plugin loads and accepts the directory; not kept, in case recording fails.
    load_storage_backend(type_, directory, ctx.limits)
    directory.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the disks
    ctx.store.add_storage_pool(pool)
    return ctx.store.find_storage_pool(name) or pool


def list_pools(ctx: Context) -> list[PoolView]:
    """Each host's own pool (no connection made), then the added ones, by name."""
    from corral.storage.libvirt_pool import LibvirtPoolBackend
    from corral.storage.qcow2_dir import Qcow2DirBackend

    machines = ctx.store.list_machines()
    views = []
    for h in ctx.store.list_hosts():
        local = h.name == ctx.settings.host_name
        backend_type = Qcow2DirBackend if local else LibvirtPoolBackend
        held = [m for m in machines if m.host == h.name and m.storage_pool is None]
        views.append(PoolView(StoragePool(h.pool_name, "qcow2", h.name, h.pool_path),
                              backend_type.capabilities, sorted(m.name for m in held), [],
                              h.disk_bytes or None, sum(m.disk_claim for m in held)))
    for pool in ctx.store.list_storage_pools():
        views.append(_view(ctx, pool, machines))
    return views


def show_pool(ctx: Context, name: str) -> PoolView:
    return _view(ctx, get_pool(ctx, name), ctx.store.list_machines())


def remove_pool(ctx: Context, name: str) -> StoragePool:
    """Forget a pool, after deleting the image copies Corral put in it.

    Refused while a machine's disk is in it. The directory and anything else in it stay:
    they are the administrator's.
    """
    pool = get_pool(ctx, name)
    store_pool = ctx.pool_storage(pool)
    held = [m.name for m in ctx.store.list_machines() if m.storage_pool == name]
    if held:
        raise Conflict(f"Storage pool '{name}' still holds the disks of {', '.join(held)}.",
                       hint="Delete those machines first.")
    with pool_lock(pool):
        for image in ctx.store.list_images():
            store_pool.delete(base_path(ctx, pool, image))
    ctx.store.delete_storage_pool(name)
    ctx.forget_pool(name)
    return pool


def get_pool(ctx: Context, name: str) -> StoragePool:
    """An added pool by name; a host's own pool is refused with a hint to name none."""
    pool = ctx.store.find_storage_pool(name)
    if pool is None and name in {h.pool_name for h in ctx.store.list_hosts()}:
        raise InvalidInput(f"'{name}' is a host's own pool, not an added one; name no pool "
                           "to use it.")
    if pool is None:
        raise NotFound("storage pool", name, hint="'corral pool list' shows the pools.")
    return pool


# -- the copies of images a pool clones from -------------------------------------------


def base_path(ctx: Context, pool: StoragePool, image: Image) -> Path:
    """Where ``pool`` keeps its copy of ``image``: a volume of its own (a subvolume on
    btrfs, so that clones are snapshots of it). The checksum is in the name: a
    replaced image is a new copy."""
    return ctx.pool_storage(pool).volume_path(f"base-{image.name}-{image.sha256[:12]}")


def ensure_base(ctx: Context, pool: StoragePool, image: Image) -> Path:
    """Make ``pool``'s copy of ``image`` present and verified, copying it if needed.

    One process copies at a time (a lock file in the pool); a copy cut short by a crash
    is found by its marker and made again.
    """
    store_pool, base = ctx.pool_storage(pool), base_path(ctx, pool, image)
    marker = Path(pool.path) / f".{base.name}.partial"
    with pool_lock(pool):
        if marker.exists():
            store_pool.delete(base)
        elif store_pool.exists(base):
            return base
        marker.touch()
        store_pool.put_file(Path(image.path), base)
        digest, _length = store_pool.sha256(base)
        if digest != image.sha256:
            store_pool.delete(base)
            raise StorageError(
                f"The copy of image '{image.name}' in pool '{pool.name}' does not match "
                "the library's checksum; it was removed. Check the pool's disk and retry."
            )
        marker.unlink()
    return base


@contextlib.contextmanager
def pool_lock(pool: StoragePool) -> Iterator[None]:
    """Held while a process changes the pool's image copies (threads and processes)."""
    fd = os.open(Path(pool.path) / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# -- checks --------------------------------------------------------------------------


def _view(ctx: Context, pool: StoragePool, machines: list[Machine]) -> PoolView:
    store_pool = ctx.pool_storage(pool)
    images = [i.name for i in ctx.store.list_images()
              if store_pool.exists(base_path(ctx, pool, i))]
    held = [m for m in machines if m.storage_pool == pool.name]
    st = os.statvfs(pool.path)
    return PoolView(pool, store_pool.capabilities, sorted(m.name for m in held), images,
                    st.f_blocks * st.f_frsize, sum(m.disk_claim for m in held))


def _checked_directory(ctx: Context, host: Host, path: Path) -> Path:
    if not path.is_absolute():
        raise InvalidInput(f"The pool path {path} is relative; give an absolute path.")
    try:
        directory = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise InvalidInput(f"{path} does not exist; create (and mount) it first.") from None
    if not directory.is_dir():
        raise InvalidInput(f"{path} is not a directory.")
    taken = [Path(host.pool_path), ctx.settings.image_dir, ctx.settings.state_dir]
    taken += [Path(p.path) for p in ctx.store.list_storage_pools()]
    for other in taken:
        other = other.resolve()
        if directory == other or other in directory.parents or directory in other.parents:
            raise InvalidInput(f"{path} overlaps {other}, which Corral already uses; "
                               "give a directory of its own.")
    return directory


def _probe(type_: str, directory: Path) -> None:
    """Refuse a directory the type cannot clone in, before anything is recorded."""
    wanted = _FILESYSTEMS.get(type_)
    if wanted is None:
        return
    found = _filesystem(directory)
    if found not in wanted:
        raise InvalidInput(f"{directory} is on {found}, and a {type_} pool needs "
                           f"{' or '.join(wanted)}.")
    if type_ == "reflink":
        from corral.storage.reflink import reflink

        with tempfile.TemporaryDirectory(dir=directory, prefix=".corral-probe-") as tmp:
            source = Path(tmp) / "a"
            source.write_bytes(b"\0" * 4096)
            try:
                reflink(source, Path(tmp) / "b", directory)
            except CorralError as exc:
                raise InvalidInput(f"{directory} cannot make reflinks ({exc}); XFS needs "
                                   "mkfs.xfs -m reflink=1.") from None


def _filesystem(directory: Path) -> str:
    done = subprocess.run(["stat", "--file-system", "--format=%T", str(directory)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise InvalidInput(f"Cannot tell the filesystem of {directory}: "
                           f"{done.stderr.strip()}.")
    return done.stdout.strip()

