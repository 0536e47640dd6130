"""Volumes on btrfs, one subvolume per volume: a linked clone is a subvolume snapshot.

``volume_path("web-1")`` is ``<pool>/web-1/web-1.qcow2``, where ``<pool>/web-1`` is a
subvolume holding that one file. Cloning a volume that is alone in its subvolume
snapshots the subvolume: constant time whatever the disk's size, format (raw too) or
extent count. Otherwise (a base that shares its directory with other files) the clone
is a reflink of the file (``corral.storage.reflink``), whose time grows with the base's
extent count.

A clone stands alone: it shares extents with its base but does not read through it.
So deleting a base whose clones still exist is safe, not refused: the clones keep
their data, and the space the base held stays in use until the last clone is gone.
Usage comes from FIEMAP's shared flag, the numbers ``btrfs filesystem du`` shows.

A snapshot of a volume in its own subvolume is a read-only snapshot of that subvolume,
kept outside it as ``<pool>/.snapshots/<volume>@<snapshot>``: constant time, like a
clone. A revert makes a writable snapshot of it beside the volume's subvolume and swaps
the two in one atomic ``renameat2(RENAME_EXCHANGE)``, then deletes the old one: constant
time too, and at no instant is the volume missing. Everything in the volume's subvolume
is snapshotted and reverted with it. Deleting the volume deletes its snapshots first.
A volume that is not alone in a subvolume of its own is snapshotted as the reflink
backend does (reflinked files).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from corral.errors import Conflict, NoSpace, NotFound, StorageError
from corral.storage.base import (
    FULL_CLONE,
    LINKED_CLONE,
    SNAPSHOT,
    THIN_PROVISIONING,
    check_snapshot_name,
)
from corral.storage.qcow2_dir import VolumesInHomes
from corral.storage.reflink import SNAPSHOT_DIR, WRITABLE, ReflinkBackend, grow

_SUBVOLUME_ROOT_INODE = 256  # the inode number of every btrfs subvolume's top directory
_BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417  # _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2)
_VOL_ARGS_V2 = struct.Struct("=qQQ32s4040s")  # fd, transid, flags, (size, qgroups), name
_SUBVOL_RDONLY = 1 << 1
_BTRFS_IOC_INO_LOOKUP = 0xD0009412  # _IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args)
_INO_LOOKUP_ARGS = struct.Struct("=QQ4080s")  # treeid, objectid, name
_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1


class BtrfsBackend(VolumesInHomes, ReflinkBackend):
    """A directory on btrfs (the pool's top, which may itself be a subvolume)."""

    capabilities: ClassVar[frozenset[str]] = frozenset(
        {LINKED_CLONE, FULL_CLONE, THIN_PROVISIONING, SNAPSHOT}
    )

    def volume_path(self, name: str) -> Path:
        return self.directory / name / f"{name}.qcow2"

    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        """A snapshot of ``base``'s subvolume when ``base`` is alone in one and ``dest``
        gets one of its own (a ``volume_path``); else a reflink. Then grown to
        ``virtual_size``. Raises Conflict if ``dest`` or its subvolume exists; on
        failure neither does."""
        home = self._home(dest)
        if home is None or not _alone_in_subvolume(base):
            with self._new_home(dest):
                super().linked_clone(base, dest, virtual_size)
            return
        if home.exists():
            raise Conflict(f"Cannot clone onto {dest}: {home} already exists.")
        _snapshot(base.parent, home)
        try:
            if base.name != dest.name:
                (home / base.name).rename(dest)
            dest.chmod(WRITABLE)  # the snapshot kept the read-only base's mode
            grow(dest, virtual_size, self.limits)
        except BaseException:
            _delete_subvolume(home)
            raise

    def delete(self, path: Path) -> None:
        """Remove the volume's snapshots, then the volume; its subvolume too when it holds
        nothing else. Idempotent."""
        home = self._home(path)
        if home is not None:
            snaps = self._subvolume_snapshots(home)
            if snaps:
                _btrfs("delete", *snaps)
        if home is not None and _is_subvolume(home):
            try:
                rest = {p.name for p in home.iterdir()} - {path.name}
            except FileNotFoundError:
                return
            if not rest:
                _delete_subvolume(home)
                return
        super().delete(path)

    # -- snapshots: read-only subvolume snapshots ---------------------------------------

    def snapshot_create(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        home = self._own_subvolume(volume)
        if home is None:
            super().snapshot_create(volume, snapshot)
            return
        target = self._snapshot_home(home, snapshot)
        target.parent.mkdir(exist_ok=True)
        try:
            _snapshot(home, target, readonly=True)
        except Conflict:
            raise Conflict(
                f"Volume {volume.name} already has a snapshot named '{snapshot}'."
            ) from None

    def snapshots(self, volume: Path) -> list[str]:
        home = self._own_subvolume(volume)
        if home is None:
            return super().snapshots(volume)
        return [p.name.split("@", 1)[1] for p in self._subvolume_snapshots(home)]

    def snapshot_revert(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        home = self._own_subvolume(volume)
        if home is None:
            super().snapshot_revert(volume, snapshot)
            return
        source = self._snapshot_home(home, snapshot)
        if not _is_subvolume(source):
            raise NotFound(f"snapshot of {volume.name}", snapshot)
        spare = home.with_name(f".{home.name}.revert")
        _delete_subvolume(spare)  # left by a revert cut short
        _snapshot(source, spare)
        try:
            _exchange(spare, home)
        except BaseException:
            _delete_subvolume(spare)
            raise
        _delete_subvolume(spare)  # the volume as it was before the revert

    def snapshot_delete(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        home = self._home(volume)
        if home is not None and _is_subvolume(target := self._snapshot_home(home, snapshot)):
            _btrfs("delete", target)
            return
        super().snapshot_delete(volume, snapshot)

    def _own_subvolume(self, volume: Path) -> Path | None:
        """The subvolume of the volume's own, None if it has none; NotFound if missing."""
        if not volume.is_file():
            raise NotFound("volume", str(volume), called="at")
        home = self._home(volume)
        return home if home is not None and _is_subvolume(home) else None

    def _snapshot_home(self, home: Path, snapshot: str) -> Path:
        return self.directory / SNAPSHOT_DIR / f"{home.name}@{snapshot}"

    def _subvolume_snapshots(self, home: Path) -> list[Path]:
        """The snapshots of the subvolume ``home``, oldest first (by subvolume id, which
        btrfs hands out in increasing order)."""
        folder = self.directory / SNAPSHOT_DIR
        try:
            found = [p for p in folder.iterdir() if p.name.startswith(f"{home.name}@")]
        except FileNotFoundError:
            return []
        return sorted(found, key=_subvolume_id)

    # -- where a volume lives ---------------------------------------------------------

    def _home(self, path: Path) -> Path | None:
        """The subvolume of its own that ``path`` lives in (or would), or None when
        ``path`` is anywhere else (a file at the pool's top, a console log…)."""
        return path.parent if path.parent.parent == self.directory else None

    @contextlib.contextmanager
    def _new_home(self, dest: Path) -> Iterator[None]:
        """Create ``dest``'s subvolume if it has none yet; remove it again if the body
        fails, so that a failed create leaves nothing behind."""
        home = self._home(dest)
        if home is None or home.exists():
            yield
            return
        _btrfs("create", home)
        try:
            yield
        except BaseException:
            _delete_subvolume(home)
            raise


def _is_subvolume(path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return st.st_ino == _SUBVOLUME_ROOT_INODE and path.is_dir()


def _alone_in_subvolume(path: Path) -> bool:
    if not _is_subvolume(path.parent):
        return False
    try:
        return [p.name for p in path.parent.iterdir()] == [path.name] and path.is_file()
    except FileNotFoundError:
        return False


def _snapshot(source: Path, dest: Path, *, readonly: bool = False) -> None:
    """Snapshot the subvolume ``source`` as the new subvolume ``dest`` (read-only if
    asked), by the ioctl ``btrfs subvolume snapshot`` makes, without its process start
    (~2 ms)."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("volume", str(source), called="at") from None
    except OSError as exc:
        raise StorageError(f"Could not open the subvolume {source}: {exc.strerror}.") from exc
    try:
        parent = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            flags = _SUBVOL_RDONLY if readonly else 0
            args = bytearray(_VOL_ARGS_V2.pack(src, 0, flags, b"", os.fsencode(dest.name)))
            fcntl.ioctl(parent, _BTRFS_IOC_SNAP_CREATE_V2, args)
        finally:
            os.close(parent)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise Conflict(f"Cannot clone onto {dest}: it already exists.") from None
        if exc.errno == errno.ENOSPC:
            raise NoSpace(f"The btrfs pool holding {dest} is full; free space and retry.") from exc
        raise StorageError(f"Could not snapshot {source} as {dest}: {exc.strerror}.") from exc
    finally:
        os.close(src)


def _subvolume_id(path: Path) -> int:
    """The id of the subvolume at ``path`` (``btrfs inspect-internal rootid``)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        args = bytearray(_INO_LOOKUP_ARGS.pack(0, _SUBVOLUME_ROOT_INODE, b""))
        fcntl.ioctl(fd, _BTRFS_IOC_INO_LOOKUP, args)
        return int(_INO_LOOKUP_ARGS.unpack_from(args)[0])
    except OSError as exc:
        raise StorageError(f"Could not read the subvolume id of {path}: {exc.strerror}.") from exc
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap the names ``a`` and ``b`` in one atomic step (renameat2 RENAME_EXCHANGE)."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                       _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise StorageError(f"Could not swap {a} and {b}: {os.strerror(code)}.")


def _delete_subvolume(path: Path) -> None:
    if path.exists():
        _btrfs("delete", path)


def _btrfs(verb: str, *paths: Path) -> None:
    """``btrfs subvolume VERB PATHS…``, its failure translated to one sentence."""
    try:
        result = subprocess.run(
            ["btrfs", "subvolume", verb, *(str(p) for p in paths)],
            capture_output=True, text=True, check=False,
        )
    except FileNotFoundError:
        raise StorageError("The btrfs command is not installed (btrfs-progs).") from None
    if result.returncode == 0:
        return
    detail = (result.stderr.strip().splitlines() or ["failed"])[-1].removeprefix("ERROR: ")
    if "No space left" in detail:
        raise NoSpace(f"The btrfs pool holding {paths[-1]} is full; free space and retry.")
    raise StorageError(f"Could not {verb} the subvolume {paths[-1]}: {detail.rstrip('.')}.")
