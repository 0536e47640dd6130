"""qcow2 volumes in a directory: a linked clone is an overlay naming its base explicitly.

A volume's snapshots are qcow2 internal snapshots (``qemu-img snapshot``), kept inside
the volume's own file: deleting the volume deletes them, a copy of it carries them. They
share the file's snapshot table with the machine snapshots libvirt takes of a stopped
machine, so both see the same names.

Deleting a base that an overlay still reads through is refused (Conflict naming the
overlay): an overlay without its base is lost. The backend keeps no index of who reads
through whom, because overlays also arrive behind its back (a transfer writes one byte
range by byte range, ``qemu-img rebase`` repoints one) and an index would be wrong then.
Instead ``delete`` of a qcow2 file looks at the headers of the other files in the pool's
directory (and the file's own, if elsewhere): one ``pread`` of 4 KiB per file, about
20 ms per thousand files (measured, warm cache), paid only when a qcow2 volume is
deleted; console logs, seeds and transfer markers delete without it. Corral's overlays
always name a qcow2 base, so deleting a raw file never looks. An overlay in another
directory (another pool) naming this base is not seen: such overlays are not Corral's.
"""

from __future__ import annotations

import abc
import errno
import os
import struct
import subprocess
from collections.abc import Generator, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar

from corral.errors import Conflict, NoSpace, NotFound, StorageError
from corral.formats.qcow2 import Qcow2Header, read_qcow2_header, write_overlay
from corral.model import DiskUsage
from corral.storage import qemu_img
from corral.storage.base import (
    FULL_CLONE,
    LINKED_CLONE,
    SNAPSHOT,
    Hole,
    Piece,
    Progress,
    Snapshots,
    StorageBackend,
    check_snapshot_name,
)
from corral.storage.sparse import file_pieces

_HEADER_BYTES = 64 << 10
_QCOW2_MAGIC = b"QFI\xfb"
_PROBE_BYTES = 4096
_BACKING_FIELDS = struct.Struct(">4sIQI")  # magic, version, backing name offset and size
_MAX_BACKING_NAME = 1023  # qemu refuses longer backing file names


class Qcow2DirBackend(StorageBackend, Snapshots):
    capabilities: ClassVar[frozenset[str]] = frozenset({LINKED_CLONE, FULL_CLONE, SNAPSHOT})

    def __init__(self, directory: Path, limits: qemu_img.QemuImgLimits) -> None:
        self.directory = directory
        self.limits = limits

    def volume_path(self, name: str) -> Path:
        return self.directory / f"{name}.qcow2"

    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        # Written in-process rather than by `qemu-img create`: an empty overlay is three
        # small tables, and skipping a process start makes the clone ~0.1 ms, not ~7 ms.
        # write_overlay's defaults (128 KiB clusters with subclusters) make a guest's first
        # 4 KiB writes as fast as on raw, not ~4x slower (bench/first_write).
        try:
            write_overlay(
                dest, backing_file=str(base), backing_format="qcow2", virtual_size=virtual_size
            )
        except OSError as exc:
            dest.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise NoSpace(
                    f"The pool at {self.directory} is full; free space and retry."
                ) from exc
            raise StorageError(
                f"Could not create the linked clone {dest}: {exc.strerror}."
            ) from exc

    def full_clone(
        self, base: Path, dest: Path, virtual_size: int, progress: Progress | None = None
    ) -> None:
        qemu_img.convert(base, "qcow2", dest, "qcow2", self.limits, progress)
        try:
            if virtual_size > qemu_img.info(dest, "qcow2", self.limits).virtual_size:
                qemu_img.resize(dest, "qcow2", virtual_size, self.limits)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def copy(self, source: Path, dest: Path) -> None:
        # reflink where the filesystem can (constant time), else a sparse copy.
        result = subprocess.run(
            ["cp", "--sparse=always", "--reflink=auto", "--", str(source), str(dest)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            dest.unlink(missing_ok=True)
            if "No space left" in result.stderr:
                raise NoSpace(f"The pool at {self.directory} is full; free space and retry.")
            raise StorageError(f"Could not copy {source.name}: {result.stderr.strip()}.")

    def delete(self, path: Path) -> None:
        """Remove the volume (and its internal snapshots). Idempotent. Raises Conflict,
        naming one, while a qcow2 overlay in the pool reads through it."""
        dependant = find_dependant(path, self.directory)
        if dependant is not None:
            raise Conflict(
                f"Cannot delete {path.name}: the volume {dependant} still reads through it "
                "as its base."
            )
        path.unlink(missing_ok=True)

    def usage(self, path: Path) -> DiskUsage:
        try:
            header = _header(path)
            owned = _allocated(path)
            shared = 0
            backing = header.backing_file
            seen = {path.resolve()}
            while backing is not None:
                base = path.parent / backing  # an absolute backing path replaces the parent
                if base.resolve() in seen:  # a loop in a chain is corruption, not a base
                    raise StorageError(f"The backing chain of {path} loops at {base}.")
                seen.add(base.resolve())
                shared += _allocated(base)
                backing = _header(base).backing_file
        except FileNotFoundError as exc:
            raise StorageError(f"Volume {exc.filename} is missing.") from exc
        return DiskUsage(virtual_size=header.size, owned_bytes=owned, shared_bytes=shared)

    def put_file(self, source: Path, dest: Path) -> None:
        if dest.exists():
            raise Conflict(f"Cannot place {source.name} at {dest}: the file already exists.")
        self.copy(source, dest)

    def fetch(self, path: Path, local_dest: Path) -> None:
        if not path.exists():
            raise NotFound("volume", str(path))
        self.copy(path, local_dest)

    def read_tail(self, path: Path, max_bytes: int) -> bytes:
        try:
            with path.open("rb") as f:
                end = f.seek(0, os.SEEK_END)
                f.seek(max(0, end - max_bytes))
                return f.read(max_bytes)
        except FileNotFoundError:
            raise NotFound("file", str(path), called="at") from None
        except OSError as exc:
            raise StorageError(f"Could not read {path}: {exc.strerror}.") from exc

    def exists(self, path: Path) -> bool:
        return path.exists()

    def create_empty(self, dest: Path) -> None:
        try:
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        except FileExistsError:
            raise Conflict(f"Cannot create {dest}: the file already exists.") from None
        except OSError as exc:
            raise _os_error(exc, f"create {dest}", self.directory) from exc

    def size(self, path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise NotFound("file", str(path), called="at") from None
        except OSError as exc:
            raise StorageError(f"Could not read {path}: {exc.strerror}.") from exc

    def read_range(self, path: Path, start: int, end: int) -> Generator[Piece, None, None]:
        try:
            with path.open("rb") as f:
                fd = f.fileno()
                yield from file_pieces(fd, start, min(end, os.fstat(fd).st_size))
        except FileNotFoundError:
            raise NotFound("file", str(path), called="at") from None
        except OSError as exc:
            raise StorageError(f"Could not read {path}: {exc.strerror}.") from exc

    def write_range(self, dest: Path, start: int, end: int, pieces: Iterable[Piece]) -> None:
        # Cutting dest at start drops whatever an earlier attempt left past it, so
        # holes can stay holes: only data is written.
        try:
            with dest.open("r+b") as out:
                fd = out.fileno()
                out.truncate(start)
                pos = start
                for piece in pieces:
                    if isinstance(piece, Hole):
                        pos += piece.length
                    else:
                        view = memoryview(piece)
                        while view and pos < end:
                            n = os.pwrite(fd, view[: end - pos], pos)
                            view, pos = view[n:], pos + n
                        pos += len(view)  # what did not fit: counted, so refused below
                    if pos > end:
                        break
                if pos != end:
                    raise StorageError(
                        f"The bytes to write to {dest} came to {pos - start}, not the "
                        f"{end - start} announced."
                    )
                out.truncate(end)
        except FileNotFoundError as exc:
            raise NotFound("file", str(exc.filename), called="at") from None
        except OSError as exc:
            raise _os_error(exc, f"write to {dest}", self.directory) from exc

    # -- snapshots: qcow2 internal snapshots -------------------------------------------

    def snapshot_create(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        # qemu-img would happily make a second snapshot of the same name.
        if snapshot in self.snapshots(volume):
            raise Conflict(f"Volume {volume.name} already has a snapshot named '{snapshot}'.")
        qemu_img.snapshot("create", volume, snapshot, self.limits)

    def snapshots(self, volume: Path) -> list[str]:
        return qemu_img.snapshot_names(volume, self.limits)

    def snapshot_revert(self, volume: Path, snapshot: str) -> None:
        # qemu restores the virtual size the snapshot recorded along with its clusters.
        check_snapshot_name(snapshot)
        if snapshot not in self.snapshots(volume):
            raise NotFound(f"snapshot of {volume.name}", snapshot)
        qemu_img.snapshot("apply", volume, snapshot, self.limits)

    def snapshot_delete(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        try:
            if snapshot not in self.snapshots(volume):
                return
        except NotFound:
            return
        qemu_img.snapshot("delete", volume, snapshot, self.limits)


def _os_error(exc: OSError, action: str, directory: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return NoSpace(f"The pool at {directory} is full; free space and retry.")
    return StorageError(f"Could not {action}: {exc.strerror}.")


def _header(path: Path) -> Qcow2Header:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return read_qcow2_header(os.pread(fd, _HEADER_BYTES, 0))
    finally:
        os.close(fd)


def find_dependant(base: Path, pool: Path) -> Path | None:
    """A qcow2 file in ``pool`` (or beside ``base``) whose backing file is ``base``, or
    None. Only a qcow2 ``base`` is looked for; a missing one has no dependants."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # missing, or not a file a volume could be: nothing reads through it
        return None
    try:
        if os.pread(fd, 4, 0) != _QCOW2_MAGIC:
            return None
        st = os.fstat(fd)
    finally:
        os.close(fd)
    target = (st.st_dev, st.st_ino)
    known: dict[str, bool] = {}  # backing path -> whether it is base; overlays share bases
    for folder in dict.fromkeys((pool, base.parent)):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:
                continue
            backing = backing_name(Path(entry.path))
            if backing is None:
                continue
            full = os.path.normpath(folder / backing)  # an absolute name replaces folder
            if full not in known:
                try:
                    bst = Path(full).stat()
                    known[full] = (bst.st_dev, bst.st_ino) == target
                except OSError:
                    known[full] = False
            if known[full] and Path(entry.path) != base:
                return Path(entry.path)
    return None


def backing_name(path: Path) -> str | None:
    """The backing file name a qcow2 header at ``path`` records, or None (not qcow2, no
    backing file, unreadable or damaged: such a file reads through nothing we delete)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, _PROBE_BYTES, 0)
        if len(head) < _BACKING_FIELDS.size:
            return None
        magic, _version, offset, size = _BACKING_FIELDS.unpack_from(head)
        if magic != _QCOW2_MAGIC or offset == 0 or not 0 < size <= _MAX_BACKING_NAME:
            return None
        raw = head[offset:offset + size] if offset + size <= len(head) else os.pread(
            fd, size, offset)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) != size:
        return None
    return raw.decode("utf-8", errors="replace")


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


class VolumesInHomes(Qcow2DirBackend):
    """A directory backend that gives each volume a home of its own (a btrfs subvolume,
    a ZFS dataset) so that the home can be snapshotted or cloned whole. Every verb that
    makes a volume makes its home first, through ``_new_home``, which removes a home it
    made when the write fails; the file itself is written by the next class in line."""

    @abc.abstractmethod
    def _new_home(self, dest: Path) -> AbstractContextManager[None]:
        """Make ``dest``'s home if it has none (nothing for a path outside any home);
        remove the home made here if the body fails."""

    def full_clone(
        self, base: Path, dest: Path, virtual_size: int, progress: Progress | None = None
    ) -> None:
        with self._new_home(dest):
            super().full_clone(base, dest, virtual_size, progress)

    def copy(self, source: Path, dest: Path) -> None:
        with self._new_home(dest):
            super().copy(source, dest)

    def put_file(self, source: Path, dest: Path) -> None:
        with self._new_home(dest):
            super().put_file(source, dest)

    def create_empty(self, dest: Path) -> None:
        with self._new_home(dest):
            super().create_empty(dest)
