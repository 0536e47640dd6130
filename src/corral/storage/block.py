"""What the block-device backends (lvm-thin, rbd) share: volumes are raw block devices,
and everything else a pool holds (console logs, cloud-init seeds, transfer markers) is
a plain file in the pool's directory, handled as the directory backend handles it.

A volume is a raw disk: a full clone converts its base to raw, a linked clone and a
copy are the backend's own constant-time snapshots, and the domain sees a block device
(``formats.domain_xml`` makes a ``<disk type='block'>`` of any path under ``/dev``).
``put_file`` onto a volume writes the bytes as they are, so it must be given a raw
disk. A volume's size is the device's, which the backend may round up (LVM to its
extent size, 4 MiB by default), so bytes read back end in zeros up to that size.

Reading a volume reports each all-zero piece as a Hole (a device cannot say where its
holes are; a thin one reads zeros where nothing was written), and writing a Hole to a
volume punches it (``fallocate(PUNCH_HOLE)``: a discard that reads back as zeros), so
thin volumes stay thin both ways.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import os
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import ClassVar

from corral.errors import Conflict, NoSpace, NotFound, StorageError
from corral.model import DiskUsage
from corral.storage import qemu_img
from corral.storage.base import (
    PIECE_BYTES,
    Hole,
    Piece,
    Progress,
    StorageBackend,
    check_volume_name,
)
from corral.storage.qcow2_dir import Qcow2DirBackend
from corral.storage.sparse import file_pieces
from corral.storage.tools import read_pool_config

_QCOW2_MAGIC = b"QFI\xfb"
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_PIECE = bytes(PIECE_BYTES)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


class BlockVolumeBackend(StorageBackend):
    """Volumes as block devices; files in ``directory``. Subclasses say which paths are
    volumes and how a volume is made, removed, cloned and measured."""

    config_name: ClassVar[str]
    """The backend's name in errors about its ``pool.json``."""
    config_keys: ClassVar[tuple[str, ...]]
    """What the pool's ``pool.json`` must name (volume group, RBD pool…)."""
    config_optional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, directory: Path, limits: qemu_img.QemuImgLimits) -> None:
        self.directory = directory
        self.limits = limits
        self.files = Qcow2DirBackend(directory, limits)
        """The pool's plain files (logs, seeds, markers), as a directory pool keeps them."""
        self._names: dict[str, str] | None = None

    def _config(self) -> dict[str, str]:
        """The names in the pool's ``pool.json``, each checked as a volume name; read
        once."""
        if self._names is None:
            names = read_pool_config(self.directory, self.config_name, self.config_keys,
                                     optional=self.config_optional)
            for value in names.values():
                check_volume_name(value)
            self._names = names
        return self._names

    # -- what a subclass provides ------------------------------------------------------

    @abc.abstractmethod
    def volume_name(self, path: Path) -> str | None:
        """The name of the pool's volume at ``path``, None if ``path`` is no volume path
        of this pool (a file in the directory). Pure."""

    @abc.abstractmethod
    def _create(self, name: str, size: int) -> None:
        """Create the empty (zero-reading), thin volume ``name`` of at least ``size``
        bytes, its device ready at ``volume_path(name)``. Conflict if it exists."""

    @abc.abstractmethod
    def _remove(self, name: str) -> None:
        """Remove the volume ``name`` and its snapshots. Idempotent."""

    @abc.abstractmethod
    def _exists(self, name: str) -> bool:
        """Whether the volume ``name`` exists (its device may still need activating)."""

    # -- the contract, for volumes and files ---------------------------------------------

    def full_clone(
        self, base: Path, dest: Path, virtual_size: int, progress: Progress | None = None
    ) -> None:
        """``base`` (a raw or qcow2 disk: a volume or a library file) converted to raw in
        a new thin volume of at least ``virtual_size``; zeros stay unwritten."""
        name = self._require_volume(dest)
        fmt = _disk_format(base)
        source_size = qemu_img.info(base, fmt, self.limits).virtual_size
        self._create(name, max(source_size, virtual_size))
        try:
            qemu_img.convert_onto(base, fmt, dest, self.limits, progress)
        except BaseException:
            self._remove(name)
            raise

    def delete(self, path: Path) -> None:
        name = self.volume_name(path)
        if name is None:
            self.files.delete(path)
        else:
            self._remove(name)

    def put_file(self, source: Path, dest: Path) -> None:
        name = self.volume_name(dest)
        if name is None:
            self.files.put_file(source, dest)
            return
        if self._exists(name):
            raise Conflict(f"Cannot place {source.name} at {dest}: the volume already exists.")
        try:
            f = source.open("rb")
        except OSError as exc:
            raise StorageError(f"Could not read {source}: {exc.strerror}.") from exc
        with f:
            size = os.fstat(f.fileno()).st_size
            self._create(name, size)
            try:
                # A new thin volume reads as zeros: the source's holes need no writing.
                write_device(dest, 0, file_pieces(f.fileno(), 0, size), punch=False)
            except BaseException:
                self._remove(name)
                raise

    def fetch(self, path: Path, local_dest: Path) -> None:
        if self.volume_name(path) is None:
            self.files.fetch(path, local_dest)
            return
        size = self.size(path)
        with local_dest.open("xb") as out:
            try:
                for piece in self.read_range(path, 0, size):
                    if isinstance(piece, Hole):
                        out.seek(piece.length, os.SEEK_CUR)
                    else:
                        out.write(piece)
                out.truncate()
            except BaseException:
                local_dest.unlink(missing_ok=True)
                raise

    def read_tail(self, path: Path, max_bytes: int) -> bytes:
        if self.volume_name(path) is None:
            return self.files.read_tail(path, max_bytes)
        size = self.size(path)
        start = max(0, size - max_bytes)
        pieces = self.read_range(path, start, size)
        return b"".join(bytes(p.length) if isinstance(p, Hole) else p for p in pieces)

    def exists(self, path: Path) -> bool:
        name = self.volume_name(path)
        return self.files.exists(path) if name is None else self._exists(name)

    def create_empty(self, dest: Path) -> None:
        if self.volume_name(dest) is not None:
            raise StorageError(
                f"Cannot create {dest} empty: a block volume has a size; put a raw disk "
                "there with put_file or full_clone."
            )
        self.files.create_empty(dest)

    def size(self, path: Path) -> int:
        if self.volume_name(path) is None:
            return self.files.size(path)
        return device_size(path)

    def read_range(self, path: Path, start: int, end: int) -> Generator[Piece, None, None]:
        if self.volume_name(path) is None:
            yield from self.files.read_range(path, start, end)
            return
        yield from device_pieces(path, start, end)

    def write_range(self, dest: Path, start: int, end: int, pieces: Iterable[Piece]) -> None:
        """On a volume: as the contract says, except that the device keeps its size (it
        is never cut to ``end``); holes are punched, so they read as zeros."""
        if self.volume_name(dest) is None:
            self.files.write_range(dest, start, end, pieces)
            return
        if end > device_size(dest):
            raise StorageError(f"Cannot write up to byte {end} of {dest}: the volume is "
                               "smaller.")
        written = write_device(dest, start, pieces, punch=True)
        if written != end - start:
            raise StorageError(
                f"The bytes to write to {dest} came to {written}, not the {end - start} "
                "announced."
            )

    def _require_volume(self, path: Path) -> str:
        name = self.volume_name(path)
        if name is None:
            raise StorageError(f"The path {path} is not a volume of the pool at {self.directory}.")
        return name


def _disk_format(path: Path) -> str:
    """qcow2 or raw, by the first bytes: a block volume has no name to tell by."""
    try:
        with path.open("rb") as f:
            return "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"
    except FileNotFoundError:
        raise NotFound("volume", str(path), called="at") from None
    except OSError as exc:
        raise StorageError(f"Could not read {path}: {exc.strerror}.") from exc


def device_size(path: Path) -> int:
    """The length in bytes of the block device (or file) at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("volume", str(path), called="at") from None
    except OSError as exc:
        raise StorageError(f"Could not open {path}: {exc.strerror}.") from exc
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def device_pieces(path: Path, start: int, end: int) -> Generator[Piece, None, None]:
    """``[start, min(end, size))`` of the device at ``path``: all-zero pieces as Holes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("volume", str(path), called="at") from None
    except OSError as exc:
        raise StorageError(f"Could not open {path}: {exc.strerror}.") from exc
    try:
        end = min(end, os.lseek(fd, 0, os.SEEK_END))
        yield from zero_pieces(fd, start, end)
    except OSError as exc:
        raise StorageError(f"Could not read {path}: {exc.strerror}.") from exc
    finally:
        os.close(fd)


def zero_pieces(fd: int, start: int, end: int) -> Generator[Piece, None, None]:
    """``[start, end)`` of ``fd`` read in pieces of at most PIECE_BYTES, each piece that
    is all zeros given as a Hole (neighbouring holes joined)."""
    pos, hole = start, 0
    while pos < end:
        data = os.pread(fd, min(PIECE_BYTES, end - pos), pos)
        if not data:
            raise StorageError(f"The device being read ended at byte {pos}, before {end}.")
        if data == _ZERO_PIECE[: len(data)]:
            hole += len(data)
        else:
            if hole:
                yield Hole(hole)
                hole = 0
            yield data
        pos += len(data)
    if hole:
        yield Hole(hole)


def write_device(path: Path, start: int, pieces: Iterable[Piece], *, punch: bool) -> int:
    """Write ``pieces`` from ``start`` into the device at ``path``; a Hole is punched if
    ``punch`` (else skipped: the caller knows it reads as zeros). Returns the length."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("volume", str(path), called="at") from None
    except OSError as exc:
        raise StorageError(f"Could not open {path}: {exc.strerror}.") from exc
    pos = start
    try:
        for piece in pieces:
            if isinstance(piece, Hole):
                if punch and piece.length:
                    _punch(fd, pos, piece.length)
                pos += piece.length
                continue
            view = memoryview(piece)
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        os.fsync(fd)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NoSpace(f"The pool holding {path} is full; free space and retry.") from exc
        raise StorageError(f"Could not write to {path}: {exc.strerror}.") from exc
    finally:
        os.close(fd)
    return pos - start


def _punch(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` read as zeros, discarding it where the device
    can (a thin volume frees the space); zeros written where it cannot."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    left, pos = length, offset
    while left:
        n = os.pwrite(fd, _ZERO_PIECE[: min(left, PIECE_BYTES)], pos)
        left, pos = left - n, pos + n


def usage_of(virtual_size: int, owned: int, shared: int) -> DiskUsage:
    """A DiskUsage with the numbers clamped to be sane (tools round)."""
    return DiskUsage(virtual_size=virtual_size, owned_bytes=max(0, owned),
                     shared_bytes=max(0, shared))
