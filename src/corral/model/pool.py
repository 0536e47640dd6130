"""Storage pools: where machine disks live, each of a type a ``corral.storage`` plugin
provides (``qcow2``, ``btrfs``, ``reflink``…)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class StoragePool:
    name: str
    type: str
    """The ``corral.storage`` entry point that manages it."""
    host: str
    """The host whose filesystem holds it: only that host's machines can use it."""
    path: str
    """Its top directory on that host."""
    created_at: datetime | None = None
    """``None`` for a host's own pool, which was not added but enrolled with the host."""
