"""Volumes on a filesystem with reflinks (XFS with ``reflink=1``, btrfs): a linked clone
is a whole-file reflink (FICLONE), so it stands alone: no backing chain, no overlay.

A reflink shares the base's extents and copies none of its data, but its time grows with
the base's extent count (about 40,000 extents take visibly longer than one); btrfs
subvolume snapshots (``corral.storage.btrfs``) do not. Deleting a base is safe: a clone
holds its own references to the shared extents, so it keeps reading the same bytes.

A snapshot is a reflink of the volume's file too, kept read-only beside it as
``.snapshots/<file>@<snapshot>`` in the volume's directory; a revert reflinks it back
to a temporary name and renames that over the volume (atomic). Deleting the volume
deletes its snapshots first.

Everything that is about files (put_file, fetch, read_range…) is the directory backend's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import tempfile
from pathlib import Path
from typing import ClassVar

from corral.errors import Conflict, NoSpace, NotFound, StorageError
from corral.formats.qcow2 import read_qcow2_header
from corral.model import DiskUsage
from corral.storage import qemu_img
from corral.storage.base import (
    FULL_CLONE,
    LINKED_CLONE,
    SNAPSHOT,
    THIN_PROVISIONING,
    check_snapshot_name,
)
from corral.storage.qcow2_dir import Qcow2DirBackend

_FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_FIEMAP_FLAG_SYNC = 0x1
_EXTENT_LAST = 0x1
_EXTENT_SHARED = 0x2000
_FIEMAP = struct.Struct("=QQIIII")  # fm_start, fm_length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 rsvd
_BATCH = 512
_QCOW2_MAGIC = b"QFI\xfb"
WRITABLE = 0o644
"""A clone's mode: QEMU writes it (as the owner libvirt gives it); bases are 0444."""
SNAPSHOT_DIR = ".snapshots"
"""The directory, beside a pool's volumes, that holds their snapshots."""


class ReflinkBackend(Qcow2DirBackend):
    """A directory on a reflink-capable filesystem. Volumes are qcow2 or raw files."""

    capabilities: ClassVar[frozenset[str]] = frozenset(
        {LINKED_CLONE, FULL_CLONE, THIN_PROVISIONING, SNAPSHOT}
    )

    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        """A reflink of ``base`` at ``dest``, grown to ``virtual_size`` (qcow2: its header
        by ``qemu-img resize``; raw: a sparse extension). Raises Conflict if ``dest``
        exists, NotFound if ``base`` is missing; on failure ``dest`` does not exist."""
        reflink(base, dest, self.directory)
        try:
            dest.chmod(WRITABLE)  # a clone is the machine's own disk, whatever the base's mode
            grow(dest, virtual_size, self.limits)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def usage(self, path: Path) -> DiskUsage:
        """Owned bytes are the file's extents no other file shares; shared bytes are the
        ones it shares (with its base, its clones or their snapshots), as FIEMAP reports
        them. Shared extents are counted whole for every file that shares them."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StorageError(f"Volume {path} is missing.") from None
        except OSError as exc:
            raise StorageError(f"Could not read {path}: {exc.strerror}.") from exc
        try:
            owned, shared = extents(fd)
            return DiskUsage(virtual_size=virtual_size(fd), owned_bytes=owned,
                             shared_bytes=shared)
        except OSError as exc:
            raise StorageError(f"Could not read the extents of {path}: {exc.strerror}.") from exc
        finally:
            os.close(fd)

    def delete(self, path: Path) -> None:
        """Remove the volume and, first, its snapshots (so none outlives it). Idempotent."""
        for snap in _snapshot_files(path):
            snap.unlink(missing_ok=True)
        super().delete(path)

    # -- snapshots: reflinks of the file ------------------------------------------------

    def snapshot_create(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        if not volume.is_file():
            raise NotFound("volume", str(volume), called="at")
        target = snapshot_file(volume, snapshot)
        target.parent.mkdir(exist_ok=True)
        try:
            reflink(volume, target, self.directory)
        except Conflict:
            raise Conflict(
                f"Volume {volume.name} already has a snapshot named '{snapshot}'."
            ) from None
        target.chmod(0o444)

    def snapshots(self, volume: Path) -> list[str]:
        if not volume.is_file():
            raise NotFound("volume", str(volume), called="at")
        return [p.name.split("@", 1)[1] for p in _snapshot_files(volume)]

    def snapshot_revert(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        if not volume.is_file():
            raise NotFound("volume", str(volume), called="at")
        source = snapshot_file(volume, snapshot)
        if not source.is_file():
            raise NotFound(f"snapshot of {volume.name}", snapshot)
        # A fresh name in the volume's directory, so the rename replaces it atomically.
        fd, name = tempfile.mkstemp(prefix=f".{volume.name}.", suffix=".revert",
                                    dir=volume.parent)
        os.close(fd)
        temp = Path(name)
        temp.unlink()
        try:
            reflink(source, temp, self.directory)
            temp.chmod(0o644)
            temp.replace(volume)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def snapshot_delete(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        snapshot_file(volume, snapshot).unlink(missing_ok=True)


def snapshot_file(volume: Path, snapshot: str) -> Path:
    """Where the reflink snapshot ``snapshot`` of ``volume`` lives. Pure."""
    return volume.parent / SNAPSHOT_DIR / f"{volume.name}@{snapshot}"


def _snapshot_files(volume: Path) -> list[Path]:
    """The volume's snapshot files, oldest first: a reflink's mtime is when it was made,
    and of two made within one clock tick the later has the higher inode number on btrfs
    (XFS makes no such promise, so there two snapshots taken in the same few ms may be
    listed in either order)."""
    folder = volume.parent / SNAPSHOT_DIR
    try:
        found = [p for p in folder.iterdir() if p.name.startswith(f"{volume.name}@")]
    except FileNotFoundError:
        return []
    stamped = []
    for p in found:
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            stamped.append((st.st_mtime_ns, st.st_ino, p))
    return [p for _, _, p in sorted(stamped)]


def reflink(source: Path, dest: Path, pool: Path) -> None:
    """Make the new file ``dest`` share all of ``source``'s extents (FICLONE): no data is
    copied. Raises Conflict if ``dest`` exists; on failure ``dest`` does not exist."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("volume", str(source), called="at") from None
    except OSError as exc:
        raise StorageError(f"Could not read {source}: {exc.strerror}.") from exc
    try:
        try:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise Conflict(f"Cannot clone onto {dest}: the volume already exists.") from None
        except OSError as exc:
            raise StorageError(f"Could not create {dest}: {exc.strerror}.") from exc
        try:
            fcntl.ioctl(out, _FICLONE, src)
        except OSError as exc:
            os.close(out)
            dest.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise NoSpace(f"The pool at {pool} is full; free space and retry.") from exc
            if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL):
                raise StorageError(
                    f"The filesystem of {pool} cannot reflink {source.name} to {dest.name}."
                ) from exc
            raise StorageError(f"Could not reflink {source.name}: {exc.strerror}.") from exc
        os.close(out)
    finally:
        os.close(src)


def grow(path: Path, size: int, limits: qemu_img.QemuImgLimits) -> None:
    """Grow the disk at ``path`` (qcow2 or raw) to ``size`` bytes; never shrinks it."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.pread(fd, 4, 0) != _QCOW2_MAGIC:
            if size > os.fstat(fd).st_size:
                os.ftruncate(fd, size)
            return
        current = virtual_size(fd)
    finally:
        os.close(fd)
    if size > current:
        qemu_img.resize(path, "qcow2", size, limits)


def virtual_size(fd: int) -> int:
    """The guest-visible size of the disk open at ``fd``: a qcow2 header's, or a raw
    file's length."""
    head = os.pread(fd, 64 << 10, 0)
    if head[:4] == _QCOW2_MAGIC:
        return read_qcow2_header(head).size
    return os.fstat(fd).st_size


def extents(fd: int) -> tuple[int, int]:
    """(exclusive, shared) bytes of the file open at ``fd``, from FIEMAP, its dirty pages
    written first so that delayed allocation is counted."""
    exclusive = shared = 0
    start, flags = 0, _FIEMAP_FLAG_SYNC
    while True:
        buf = bytearray(_FIEMAP.size + _BATCH * _EXTENT.size)
        _FIEMAP.pack_into(buf, 0, start, (1 << 64) - 1 - start, flags, 0, _BATCH, 0)
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf, True)
        mapped = _FIEMAP.unpack_from(buf, 0)[3]
        if mapped == 0:
            return exclusive, shared
        for i in range(mapped):
            logical, _, length, _, _, eflags, *_ = _EXTENT.unpack_from(
                buf, _FIEMAP.size + i * _EXTENT.size
            )
            if eflags & _EXTENT_SHARED:
                shared += length
            else:
                exclusive += length
            if eflags & _EXTENT_LAST:
                return exclusive, shared
            start = logical + length
        flags = 0
