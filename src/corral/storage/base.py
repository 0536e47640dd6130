"""The StorageBackend contract: where machine disks live and how they are cloned.

Optional features are declared in ``capabilities`` and checked by ``ops`` before
calling; a backend never has a method that only raises NotImplementedError.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from corral.model import DiskUsage

Progress = Callable[[float], None]

LINKED_CLONE = "linked-clone"
"""The backend can make a copy-on-write clone in constant time."""
FULL_CLONE = "full-clone"
"""The backend can make an independent copy."""


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
    def upload_range(self, source: Path, dest: Path, start: int, end: int) -> None:
        """Write bytes ``[start, end)`` of the local ``source`` at the same offsets of ``dest``.

        Pre: ``dest`` exists and is at most ``end`` bytes long. Post: its bytes before
        ``start`` are unchanged, bytes ``[start, end)`` are ``source``'s, whatever ``dest``
        held there before, and it is ``end`` bytes long. Holes in the range stay holes
        where the backend can keep them. Not atomic: a failure leaves any prefix written.
        """

    @abc.abstractmethod
    def sha256(self, path: Path) -> tuple[str, int]:
        """The sha256 hex digest and the length of the file at ``path``, read back.

        Holes hash as the zeros they read as. Raises NotFound if missing.
        """
