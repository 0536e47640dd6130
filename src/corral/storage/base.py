"""The StorageBackend contract: where machine disks live and how they are cloned.

Optional features are declared in ``capabilities`` and checked by ``ops`` before
calling; a backend never has a method that only raises NotImplementedError.
"""

from __future__ import annotations

import abc
import hashlib
import re
from collections.abc import Callable, Generator, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar, cast

from corral.errors import (
    Conflict,
    CorralError,
    DriverNotFound,
    InvalidInput,
    NotFound,
    StorageError,
)
from corral.model import DiskUsage
from corral.storage.qemu_img import QemuImgLimits
from corral.storage.sparse import PIECE_BYTES, Hole, Piece, file_pieces, hash_piece

__all__ = [
    "ENTRY_POINT_GROUP", "FULL_CLONE", "LINKED_CLONE", "LIVE_SNAPSHOT", "PIECE_BYTES",
    "SHARED_BETWEEN_HOSTS", "SNAPSHOT", "THIN_PROVISIONING", "Hole", "Piece", "Progress",
    "Snapshots", "StorageBackend", "available_storage_backends", "check_snapshot_name",
    "check_volume_name", "load_storage_backend", "snapshots_of",
]

ENTRY_POINT_GROUP = "corral.storage"

Progress = Callable[[float], None]

LINKED_CLONE = "linked-clone"
"""The backend can make a copy-on-write clone in constant time."""
FULL_CLONE = "full-clone"
"""The backend can make an independent copy."""
SNAPSHOT = "snapshot"
"""The backend can snapshot a stopped machine's volume and revert to it: the backend is
a :class:`Snapshots` too (``snapshots_of`` gives that view, or says why not)."""
LIVE_SNAPSHOT = "live-snapshot"
"""As SNAPSHOT, of a running machine's volume, consistent with its memory. Declared by
no backend: a running machine's snapshot needs its memory, which only the compute
driver (libvirt) holds; machine snapshots go through it."""
THIN_PROVISIONING = "thin-provisioning"
"""A volume takes space only as it is written: its virtual size is not reserved."""
SHARED_BETWEEN_HOSTS = "shared-between-hosts"
"""Every host of the pool sees the same volumes (NFS, Ceph…), so a machine moves
without copying its disks."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
"""Safe as a file name, a path component, an LV, a ZFS dataset or snapshot component and
an RBD image or snapshot name: none of ``/``, ``@``, spaces, or a leading ``-`` or ``.``."""


def check_snapshot_name(name: str) -> str:
    """``name`` if it may name a volume snapshot, else InvalidInput in one sentence."""
    if not _NAME.match(name):
        raise InvalidInput(
            f"The snapshot name '{name}' is not valid: use 1 to 63 letters, digits, '.', '_' "
            "and '-', starting with a letter or digit."
        )
    return name


def check_volume_name(name: str) -> str:
    """``name`` if a backend may use it as a volume (LV, dataset, image) name, else
    InvalidInput in one sentence."""
    if not _NAME.match(name):
        raise InvalidInput(
            f"The volume name '{name}' is not valid: use 1 to 63 letters, digits, '.', '_' "
            "and '-', starting with a letter or digit."
        )
    return name


class StorageBackend(abc.ABC):
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: object) -> None:
        # A backend cannot declare SNAPSHOT without the verbs. (It may have them and not
        # declare it, a subclass that cannot keep its parent's promise: snapshots_of
        # then refuses, as ops check the capability.)
        super().__init_subclass__(**kwargs)
        if SNAPSHOT in cls.capabilities and not issubclass(cls, Snapshots):
            raise TypeError(f"{cls.__name__} declares SNAPSHOT but is not a Snapshots.")

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


class Snapshots(abc.ABC):
    """The verbs of SNAPSHOT: named, point-in-time snapshots of a stopped machine's volume.

    A backend declaring SNAPSHOT inherits this class as well as StorageBackend; ops get
    it through :func:`snapshots_of`. ``volume`` is a path ``volume_path`` gave.
    Pre for every verb: nothing writes the volume (its machine is stopped); a backend
    may refuse a volume in use with Conflict but need not detect it. A snapshot's name is
    checked by :func:`check_snapshot_name` (InvalidInput) before anything is touched.
    """

    @abc.abstractmethod
    def snapshot_create(self, volume: Path, snapshot: str) -> None:
        """Record the volume's bytes and virtual size as they are now, as ``snapshot``.

        Raises NotFound if the volume is missing, Conflict if it already has a snapshot
        of that name. Post: the volume is unchanged and writes to it never change the
        snapshot. On failure no snapshot of that name was made.
        """

    @abc.abstractmethod
    def snapshots(self, volume: Path) -> list[str]:
        """The names of the volume's snapshots, oldest first. NotFound if it is missing."""

    @abc.abstractmethod
    def snapshot_revert(self, volume: Path, snapshot: str) -> None:
        """Make the volume read exactly as ``snapshot`` recorded it: the same bytes and
        the same virtual size. What was written since is lost. The snapshot, and the
        volume's other snapshots, stay.

        Raises NotFound for a missing volume or snapshot. A backend whose format cannot
        keep later snapshots across a revert (ZFS) raises Conflict naming them instead.
        Idempotent. On failure the volume reads as before or as ``snapshot``.
        """

    @abc.abstractmethod
    def snapshot_delete(self, volume: Path, snapshot: str) -> None:
        """Remove ``snapshot``; the volume's data and its other snapshots are unchanged.

        Idempotent: a missing snapshot (or volume) is not an error.
        """


def snapshots_of(backend: StorageBackend) -> Snapshots:
    """``backend``'s snapshot verbs, or Conflict in one sentence if it has none."""
    if SNAPSHOT not in backend.capabilities or not isinstance(backend, Snapshots):
        raise Conflict(f"The {type(backend).__name__} storage cannot snapshot volumes.")
    return backend


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
