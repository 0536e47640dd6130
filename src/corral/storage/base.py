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
