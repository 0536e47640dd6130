"""The StorageBackend contract: where machine disks live and how they are cloned.

Optional features are declared in ``capabilities`` and checked by ``ops`` before
calling; a backend never has a method that only raises NotImplementedError.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Generator, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar, cast

from corral.errors import CorralError, DriverNotFound, NotFound, StorageError
from corral.model import DiskUsage
from corral.storage.qemu_img import QemuImgLimits
from corral.storage.sparse import PIECE_BYTES, Hole, Piece, file_pieces, hash_piece

__all__ = [
    "ENTRY_POINT_GROUP", "FULL_CLONE", "LINKED_CLONE", "LIVE_SNAPSHOT", "PIECE_BYTES",
    "SHARED_BETWEEN_HOSTS", "SNAPSHOT", "THIN_PROVISIONING", "Hole", "Piece", "Progress",
    "StorageBackend", "available_storage_backends", "load_storage_backend",
]

ENTRY_POINT_GROUP = "corral.storage"

Progress = Callable[[float], None]

LINKED_CLONE = "linked-clone"
"""The backend can make a copy-on-write clone in constant time."""
FULL_CLONE = "full-clone"
"""The backend can make an independent copy."""
SNAPSHOT = "snapshot"
"""The backend can snapshot a stopped machine's volume and revert to it. Declared by no
backend yet: the contract has no snapshot verb (machine snapshots are qcow2-internal,
through the compute driver)."""
LIVE_SNAPSHOT = "live-snapshot"
"""As SNAPSHOT, of a running machine's volume, consistent with its memory. Declared by
no backend yet, for the same reason."""
THIN_PROVISIONING = "thin-provisioning"
"""A volume takes space only as it is written: its virtual size is not reserved."""
SHARED_BETWEEN_HOSTS = "shared-between-hosts"
"""Every host of the pool sees the same volumes (NFS, Ceph…), so a machine moves
without copying its disks."""


class StorageBackend(abc.ABC):
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def volume_path(self, name: str) -> Path:
        """Where a volume named ``name`` lives. Pure: creates nothing."""

    @abc.abstractmethod
    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        """Create ``dest`` as a copy-on-write clone of the read-only ``base``.

        Pre: ``dest`` does not exist. Post: ``dest`` exists, reads as ``base`` and owns no
        data. On failure ``dest`` does not exist. Requires LINKED_CLONE.
        """

    @abc.abstractmethod
    def full_clone(
        self, base: Path, dest: Path, virtual_size: int, progress: Progress | None = None
    ) -> None:
        """Create ``dest`` as an independent copy of ``base``, grown to ``virtual_size``.

        Pre: ``dest`` does not exist. On failure (a full pool included) ``dest`` does not
        exist. Requires FULL_CLONE.
        """

    @abc.abstractmethod
    def copy(self, source: Path, dest: Path) -> None:
        """Copy a volume as it is: its own bytes, its references to bases kept.

        Pre: ``dest`` does not exist. On failure ``dest`` does not exist.
        """

    @abc.abstractmethod
    def delete(self, path: Path) -> None:
        """Remove a volume. Idempotent: a missing volume is not an error."""

    @abc.abstractmethod
    def usage(self, path: Path) -> DiskUsage:
        """Virtual size, bytes the volume owns and bytes it shares with its bases."""

    # -- files a multi-host controller places on, and reads from, a host --------------
    # The controller may not see a remote host's filesystem: these go through the
    # backend, so a libvirt pool backend can do them over the libvirt connection.

    @abc.abstractmethod
    def put_file(self, source: Path, dest: Path) -> None:
        """Copy the local file ``source`` byte for byte to a new volume ``dest``.

        Holes in ``source`` stay holes in ``dest`` where the backend can keep them.
        Pre: ``dest`` does not exist (else Conflict). On failure ``dest`` does not exist.
        """

    @abc.abstractmethod
    def fetch(self, path: Path, local_dest: Path) -> None:
        """Copy the volume or file at ``path`` byte for byte to the new local file
        ``local_dest``, holes kept as holes. Raises NotFound if ``path`` is missing; on
        failure ``local_dest`` does not exist."""

    @abc.abstractmethod
    def read_tail(self, path: Path, max_bytes: int) -> bytes:
        """The last ``max_bytes`` bytes of the file at ``path`` (all of it if shorter).

        Works on a file another process is appending to (a console log): the answer
        ends at wherever the file ended when it was read. Raises NotFound if missing.
        """

    @abc.abstractmethod
    def exists(self, path: Path) -> bool:
        """Whether a volume or file exists at ``path``. Never raises for a missing one."""

    # -- the primitives of a resumable, verified transfer (corral.images.transfer) -------

    @abc.abstractmethod
    def create_empty(self, dest: Path) -> None:
        """Create ``dest`` as an empty raw file (zero bytes long) that grows as written.

        Pre: ``dest`` does not exist (else Conflict).
        """

    @abc.abstractmethod
    def size(self, path: Path) -> int:
        """The length in bytes of the file at ``path`` (its own bytes, not the virtual
        size of the disk it holds). Raises NotFound if missing."""

    @abc.abstractmethod
    def read_range(self, path: Path, start: int, end: int) -> Generator[Piece, None, None]:
        """Bytes ``[start, end)`` of the file at ``path``, in order, as pieces: data (at
        most ``PIECE_BYTES`` each), or a Hole where the backend knows they read as zeros.

        Pre: ``0 <= start <= end``. Post: the pieces' lengths add up to ``min(end, size)
        - start``: reading stops at the file's end. Nothing is read before the first
        piece is asked for; NotFound (a missing file) and other errors are raised from
        the iteration. Exhausting or closing the generator releases what it holds (a
        stream, a file descriptor). Reading is all it does: idempotent.
        """

    @abc.abstractmethod
    def write_range(self, dest: Path, start: int, end: int, pieces: Iterable[Piece]) -> None:
        """Write ``pieces``, consecutive and ``end - start`` bytes long in all, at ``start``.

        Pre: ``dest`` exists and is at most ``end`` bytes long. Post: its bytes before
        ``start`` are unchanged, bytes ``[start, end)`` are the pieces' (a Hole's read as
        zeros) whatever ``dest`` held there before, and it is ``end`` bytes long. A Hole
        stays a hole where the backend can keep one, at least past the end ``dest`` had
        before the call; elsewhere it is written as zeros. Pieces adding up to another
        length raise StorageError. Not atomic: a failure leaves any prefix written; an
        error raised by ``pieces`` itself propagates as it is.
        """

    def upload_range(self, source: Path, dest: Path, start: int, end: int) -> None:
        """Write bytes ``[start, end)`` of the local ``source`` at the same offsets of ``dest``.

        :meth:`write_range` with ``source``'s pieces (its holes found by SEEK_HOLE), so
        the same pre- and post-conditions hold; ``source`` must be at least ``end`` bytes
        long (else StorageError).
        """
        try:
            f = source.open("rb")
        except FileNotFoundError:
            raise NotFound("file", str(source), called="at") from None
        except OSError as exc:
            raise StorageError(f"Could not read {source}: {exc.strerror or exc}.") from exc
        with f:
            self.write_range(dest, start, end, file_pieces(f.fileno(), start, end))

    def sha256(self, path: Path) -> tuple[str, int]:
        """The sha256 hex digest and the length of the file at ``path``, read back
        through :meth:`read_range`.

        Holes hash as the zeros they read as. Raises NotFound if missing.
        """
        digest = hashlib.sha256()
        length = 0
        for piece in self.read_range(path, 0, self.size(path)):
            length += hash_piece(digest, piece)
        return digest.hexdigest(), length



def available_storage_backends() -> list[str]:
    """The names of the ``corral.storage`` entry points installed (``qcow2``, ``btrfs``…)."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_storage_backend(name: str, directory: Path, limits: QemuImgLimits) -> StorageBackend:
    """A backend for the pool mounted at ``directory``, by its entry-point name.

    Every ``corral.storage`` plugin is a StorageBackend class constructed as
    ``cls(directory, limits)``. Touches nothing yet. Raises DriverNotFound, listing the
    names there are, for an unknown name.
    """
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise DriverNotFound(ENTRY_POINT_GROUP, name, sorted(found))
    backend_class = found[name].load()
    if not (isinstance(backend_class, type) and issubclass(backend_class, StorageBackend)):
        raise CorralError(f"The {ENTRY_POINT_GROUP} plugin '{name}' is not a StorageBackend.")
    factory = cast(Callable[[Path, QemuImgLimits], StorageBackend], backend_class)
    return factory(directory, limits)
