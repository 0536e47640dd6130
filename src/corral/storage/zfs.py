"""Volumes on ZFS, one dataset per volume: a linked clone is ``zfs snapshot`` + ``zfs clone``.

The pool's directory holds a ``pool.json`` naming the dataset under which each volume
gets a dataset of its own::

    {"dataset": "tank/corral"}

``volume_path("web-1")`` is ``<pool>/web-1/web-1.qcow2``: the dataset ``tank/corral/web-1``
is mounted at ``<pool>/web-1`` (its mountpoint set explicitly) and holds that one file,
as btrfs holds one in a subvolume, so the domain still gets a file. Plain files (console
logs, seeds) live in the pool's directory, as the directory backend keeps them.

* A linked clone of a volume alone in its dataset snapshots the base's dataset as
  ``<base>@clone:<dest>`` and clones that into the new dataset: constant time, and the
  file is renamed to the new volume's name. ZFS keeps the origin snapshot while the
  clone lives, so deleting a base with clones is refused (Conflict naming one), and
  deleting a clone destroys its origin snapshot too. A base that is not a volume of its
  own (a file at the pool's top) is cloned as a qcow2 overlay in the new dataset.
* A volume snapshot ``s1`` is ``zfs snapshot <volume>@s1`` (``:`` is in no name Corral
  accepts, so the clones' origins never look like one). ZFS rolls back only to a
  dataset's latest snapshot: a revert to an earlier one raises Conflict naming the later
  ones rather than destroying them (``rollback -r`` would). Deleting a volume destroys
  its snapshots (``destroy -r``).
* Usage: ``usedbydataset`` is what the volume owns, ``referenced`` minus that is what it
  shares with its origin; the virtual size is read from the disk's header.

Needs the ``zfs`` command, the ZFS kernel module and root.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from corral.errors import Conflict, CorralError, NotFound, StorageError
from corral.model import DiskUsage
from corral.storage import qemu_img
from corral.storage.base import (
    FULL_CLONE,
    LINKED_CLONE,
    SNAPSHOT,
    THIN_PROVISIONING,
    check_snapshot_name,
    check_volume_name,
)
from corral.storage.block import usage_of
from corral.storage.qcow2_dir import VolumesInHomes
from corral.storage.reflink import WRITABLE, grow, virtual_size
from corral.storage.tools import read_pool_config, run_tool

_CLONE_ORIGIN = "clone:"


@dataclass(frozen=True, slots=True)
class Dataset:
    """One line of ``zfs list -Hp -o name,used,referenced,usedbydataset,origin,createtxg``."""

    name: str
    used: int
    referenced: int
    used_by_dataset: int
    origin: str | None
    createtxg: int


def parse_zfs_list(text: str) -> list[Dataset]:
    """``zfs list -Hp -o name,used,referenced,usedbydataset,origin,createtxg`` output
    (tab-separated, exact numbers, ``-`` for none), in its order. Pure."""
    out: list[Dataset] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 6:
            raise StorageError("zfs list printed a line Corral cannot read.")
        name, used, referenced, by_dataset, origin, txg = fields

        def number(value: str) -> int:
            return 0 if value in ("-", "") else int(value)

        try:
            out.append(Dataset(name, number(used), number(referenced), number(by_dataset),
                               None if origin in ("-", "") else origin, number(txg)))
        except ValueError as exc:
            raise StorageError("zfs list printed a number Corral cannot read.") from exc
    return out


# -- the commands, as argument lists (pure, so they are unit tested) -------------------

_FIELDS = "name,used,referenced,usedbydataset,origin,createtxg"


def zfs_create(dataset: str, mountpoint: Path) -> list[str]:
    return ["zfs", "create", "-o", f"mountpoint={mountpoint}", dataset]


def zfs_snapshot(dataset: str, snapshot: str) -> list[str]:
    return ["zfs", "snapshot", f"{dataset}@{snapshot}"]


def zfs_clone(origin: str, dataset: str, mountpoint: Path) -> list[str]:
    return ["zfs", "clone", "-o", f"mountpoint={mountpoint}", origin, dataset]


def zfs_destroy(target: str, *, recursive: bool = False) -> list[str]:
    return ["zfs", "destroy", *(["-r"] if recursive else []), target]


def zfs_rollback(dataset: str, snapshot: str) -> list[str]:
    return ["zfs", "rollback", f"{dataset}@{snapshot}"]


def zfs_list(dataset: str, *, snapshots: bool = False, depth: int | None = None) -> list[str]:
    argv = ["zfs", "list", "-Hp", "-o", _FIELDS, "-s", "createtxg",
            "-t", "snapshot" if snapshots else "filesystem"]
    if depth is not None:
        argv += ["-d", str(depth)]
    else:
        argv += ["-r"]
    return [*argv, dataset]


_ERRORS = {
    "dataset already exists": Conflict,
    "has dependent clones": Conflict,
    "dataset is busy": Conflict,
}


class ZfsBackend(VolumesInHomes):
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {LINKED_CLONE, FULL_CLONE, THIN_PROVISIONING, SNAPSHOT}
    )

    def __init__(self, directory: Path, limits: qemu_img.QemuImgLimits) -> None:
        super().__init__(directory, limits)
        self._parent: str | None = None

    @property
    def dataset(self) -> str:
        """The parent dataset of the volumes' datasets, from pool.json."""
        if self._parent is None:
            parent = read_pool_config(self.directory, "zfs", ["dataset"])["dataset"]
            for part in parent.split("/"):
                check_volume_name(part)
            self._parent = parent
        return self._parent

    def volume_path(self, name: str) -> Path:
        check_volume_name(name)
        return self.directory / name / f"{name}.qcow2"

    # -- clones ---------------------------------------------------------------------------

    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        home = self._home(dest)
        origin = self._home(base)
        if home is None or origin is None or not _alone(base):
            if not base.is_file():  # the overlay writer would not look
                raise NotFound("volume", str(base), called="at")
            with self._new_home(dest):
                super().linked_clone(base, dest, virtual_size)
            return
        if self._lookup(home) is not None:
            raise Conflict(f"Cannot clone onto {dest}: its dataset already exists.")
        snap = f"{self._ds(origin)}@{_CLONE_ORIGIN}{home}"
        self._zfs(zfs_snapshot(self._ds(origin), f"{_CLONE_ORIGIN}{home}"),
                  f"snapshot {origin}")
        try:
            self._zfs(zfs_clone(snap, self._ds(home), self.directory / home),
                      f"clone {origin} as {home}")
        except BaseException:
            self._zfs(zfs_destroy(snap), f"destroy {snap}")
            raise
        try:
            if base.name != dest.name:
                (dest.parent / base.name).rename(dest)
            dest.chmod(WRITABLE)  # the clone kept the read-only base's mode
            grow(dest, virtual_size, self.limits)
        except BaseException:
            self._destroy_volume(home)
            raise

    def delete(self, path: Path) -> None:
        """Destroy the volume's dataset with its snapshots (and a clone's origin
        snapshot). Idempotent. Conflict naming a clone while one depends on it."""
        home = self._home(path)
        if home is None or self._lookup(home) is None:
            super().delete(path)
            return
        self._destroy_volume(home)

    def usage(self, path: Path) -> DiskUsage:
        home = self._home(path)
        found = self._lookup(home) if home is not None else None
        if found is None:
            return super().usage(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"Volume {path} is missing.") from exc
        try:
            size = virtual_size(fd)
        finally:
            os.close(fd)
        owned = found.used_by_dataset
        return usage_of(size, owned, found.referenced - owned)

    # -- snapshots --------------------------------------------------------------------------

    def snapshot_create(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        home = self._volume_home(volume)
        if snapshot in self.snapshots(volume):
            raise Conflict(f"Volume {volume.name} already has a snapshot named '{snapshot}'.")
        self._zfs(zfs_snapshot(self._ds(home), snapshot), f"snapshot {home}")

    def snapshots(self, volume: Path) -> list[str]:
        home = self._volume_home(volume)
        return [s for s in self._snapshot_names(home) if _CLONE_ORIGIN not in s]

    def snapshot_revert(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        home = self._volume_home(volume)
        names = self._snapshot_names(home)
        if snapshot not in names:
            raise NotFound(f"snapshot of {volume.name}", snapshot)
        later = names[names.index(snapshot) + 1:]
        if later:
            described = ", ".join(
                f"the origin of clone {n.removeprefix(_CLONE_ORIGIN)}"
                if n.startswith(_CLONE_ORIGIN) else n for n in later)
            raise Conflict(
                f"Cannot revert {volume.name} to '{snapshot}': ZFS would destroy the later "
                f"snapshots ({described}); delete them first."
            )
        self._zfs(zfs_rollback(self._ds(home), snapshot), f"revert {home} to {snapshot}")

    def snapshot_delete(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        home = self._home(volume)
        if home is None or snapshot not in self._snapshot_names(home):
            return
        self._zfs(zfs_destroy(f"{self._ds(home)}@{snapshot}"), f"delete snapshot {snapshot}")

    # -- datasets ---------------------------------------------------------------------------

    def _home(self, path: Path) -> str | None:
        """The name of the volume dataset ``path`` lives (or would live) in, or None."""
        if path.parent.parent != self.directory:
            return None
        try:
            return check_volume_name(path.parent.name)
        except CorralError:
            return None

    def _ds(self, home: str) -> str:
        return f"{self.dataset}/{home}"

    def _lookup(self, home: str) -> Dataset | None:
        listed = self._datasets()
        return next((d for d in listed if d.name == self._ds(home)), None)

    def _datasets(self) -> list[Dataset]:
        return parse_zfs_list(self._zfs(zfs_list(self.dataset), f"list {self.dataset}"))

    def _snapshot_names(self, home: str) -> list[str]:
        """Every snapshot of the volume's dataset, the clones' origins too, oldest first."""
        text = self._zfs(zfs_list(self._ds(home), snapshots=True, depth=1),
                         f"list the snapshots of {home}")
        return [d.name.split("@", 1)[1] for d in parse_zfs_list(text)]

    def _volume_home(self, volume: Path) -> str:
        home = self._home(volume)
        if home is None or not volume.is_file() or self._lookup(home) is None:
            raise NotFound("volume", str(volume), called="at")
        return home

    def _destroy_volume(self, home: str) -> None:
        datasets = self._datasets()
        mine = self._ds(home)
        child = next((d.name for d in datasets
                      if d.origin is not None and d.origin.startswith(f"{mine}@")), None)
        if child is not None:
            raise Conflict(
                f"Cannot delete {home}: the volume {child.rsplit('/', 1)[-1]} is a clone of "
                "it, and ZFS keeps a clone's origin."
            )
        origin = next((d.origin for d in datasets if d.name == mine), None)
        self._zfs(zfs_destroy(mine, recursive=True), f"delete the volume {home}")
        if origin is not None and f"@{_CLONE_ORIGIN}" in origin:
            self._zfs(zfs_destroy(origin), f"destroy {origin}")
        with contextlib.suppress(OSError):
            (self.directory / home).rmdir()  # the empty mountpoint ZFS may leave

    @contextlib.contextmanager
    def _new_home(self, dest: Path) -> Iterator[None]:
        """Create ``dest``'s dataset if it has none; destroy it if the body fails."""
        home = self._home(dest)
        if home is None or self._lookup(home) is not None:
            yield
            return
        self._zfs(zfs_create(self._ds(home), self.directory / home), f"create {home}")
        try:
            yield
        except BaseException:
            self._zfs(zfs_destroy(self._ds(home), recursive=True), f"destroy {home}")
            raise

    def _zfs(self, argv: list[str], action: str) -> str:
        return run_tool(argv, action, errors=_ERRORS)


def _alone(path: Path) -> bool:
    try:
        return [p.name for p in path.parent.iterdir()] == [path.name] and path.is_file()
    except FileNotFoundError:
        return False
