"""Volumes as Ceph RBD images: a linked clone is RBD layering (snapshot, protect, clone).

The pool's directory holds its plain files (console logs, seeds) and a ``pool.json``
naming the Ceph pool, and optionally an RBD namespace within it and the Ceph client
(``--id``) to act as; the cluster is the one ``/etc/ceph/ceph.conf`` describes::

    {"rbd_pool": "rbd", "namespace": "corral", "client": "corral"}

``volume_path("web-1")`` is ``/dev/rbd/rbd/corral/web-1`` (``/dev/rbd/rbd/web-1`` without a
namespace): the kernel RBD device udev names when the image is mapped (``rbd device
map``), a raw disk (``corral.storage.block`` says how the domain and the file verbs
treat it). Every image the backend makes is mapped on this host at once.

* A linked clone snapshots the base as ``<base>@clone:<dest>``, protects that snapshot
  and clones it (``rbd clone``): constant time, copy-on-write from the parent. A clone
  reads through its parent snapshot, so deleting a base with clones is refused
  (Conflict naming one); deleting a clone also removes its origin snapshot.
* A full clone is a new image that ``qemu-img convert`` writes the base onto as raw; a
  copy of a volume is a linked clone of it.
* A volume snapshot ``s1`` is ``rbd snap create <volume>@s1`` (``:`` is in no name Corral
  accepts, so the clones' origins never look like one); a revert is ``rbd snap
  rollback``, which keeps the other snapshots but rewrites the image: its time grows
  with the image's size, unlike the other backends'. Deleting a volume purges its
  snapshots.
* Usage comes from ``rbd du``: the image's own used bytes are owned; its parent
  snapshot's used bytes are counted as shared (an estimate: the parts the clone
  overwrote are counted in both).

Not SHARED_BETWEEN_HOSTS, though every host of the cluster sees the images: the pool's
plain files (seeds, console logs) stay on each host, and moving a machine must still
copy them.

Needs the ``rbd`` command, a reachable cluster, the kernel's ``rbd`` module and root.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from corral.errors import Conflict, CorralError, NotFound, StorageError
from corral.model import DiskUsage
from corral.storage.base import (
    FULL_CLONE,
    LINKED_CLONE,
    SNAPSHOT,
    THIN_PROVISIONING,
    Snapshots,
    check_snapshot_name,
    check_volume_name,
)
from corral.storage.block import BlockVolumeBackend, usage_of
from corral.storage.tools import run_tool

_CLONE_ORIGIN = "clone:"


@dataclass(frozen=True, slots=True)
class ImageUsage:
    """One line of ``rbd du --format json``: an image, or one of its snapshots."""

    name: str
    snapshot: str | None
    provisioned: int
    used: int


def parse_du(text: str) -> list[ImageUsage]:
    """``rbd du --format json`` output. Pure. StorageError if it is not that."""
    try:
        return [
            ImageUsage(
                name=str(row["name"]),
                snapshot=str(row["snapshot"]) if row.get("snapshot") else None,
                provisioned=int(row["provisioned_size"]),
                used=int(row["used_size"]),
            )
            for row in json.loads(text)["images"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError("rbd du printed a report Corral cannot read.") from exc


@dataclass(frozen=True, slots=True)
class RbdSnapshot:
    id: int
    name: str
    protected: bool


def parse_snap_ls(text: str) -> list[RbdSnapshot]:
    """``rbd snap ls --format json`` output, oldest (lowest id) first. Pure."""
    try:
        rows: list[Mapping[str, Any]] = json.loads(text)
        snaps = [RbdSnapshot(int(r["id"]), str(r["name"]),
                             str(r.get("protected", "false")).lower() == "true") for r in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError("rbd snap ls printed a list Corral cannot read.") from exc
    return sorted(snaps, key=lambda s: s.id)


def parse_parent(text: str) -> str | None:
    """The parent snapshot (``pool[/ns]/image@snap``) from ``rbd info --format json``,
    None for an image without one. Pure."""
    try:
        parent = json.loads(text).get("parent")
    except (ValueError, AttributeError) as exc:
        raise StorageError("rbd info printed a description Corral cannot read.") from exc
    if not isinstance(parent, Mapping):
        return None
    pool, ns = parent.get("pool"), parent.get("pool_namespace")
    image, snap = parent.get("image"), parent.get("snapshot")
    if not (pool and image and snap):
        return None
    return f"{pool}/{ns}/{image}@{snap}" if ns else f"{pool}/{image}@{snap}"


_ERRORS = {
    "already exists": Conflict,
    "has snapshots": Conflict,
    "still has watchers": Conflict,
    "device or resource busy": Conflict,
}


class RbdBackend(BlockVolumeBackend, Snapshots):
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {LINKED_CLONE, FULL_CLONE, THIN_PROVISIONING, SNAPSHOT}
    )

    config_name = "rbd"
    config_keys = ("rbd_pool",)
    config_optional = ("namespace", "client")

    @property
    def device_dir(self) -> Path:
        """Where udev puts the pool's mapped images."""
        cfg = self._config()
        top = Path("/dev/rbd") / cfg["rbd_pool"]
        return top / cfg["namespace"] if "namespace" in cfg else top

    def spec(self, name: str) -> str:
        """``pool[/namespace]/image`` of the volume ``name``."""
        cfg = self._config()
        ns = f"{cfg['namespace']}/" if "namespace" in cfg else ""
        return f"{cfg['rbd_pool']}/{ns}{check_volume_name(name)}"

    def rbd(self, *args: str) -> list[str]:
        """An ``rbd`` command line acting as the pool's client. Pure after config."""
        client = self._config().get("client")
        return ["rbd", *(["--id", client] if client else []), *args]

    def volume_path(self, name: str) -> Path:
        return self.device_dir / check_volume_name(name)

    def volume_name(self, path: Path) -> str | None:
        if path.parent != self.device_dir:
            return None
        try:
            return check_volume_name(path.name)
        except CorralError:
            return None

    # -- clones ---------------------------------------------------------------------------

    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        parent, name = self._image(base), self._require_volume(dest)
        if self._exists(name):
            raise Conflict(f"Cannot clone onto {dest}: the image already exists.")
        snap = f"{self.spec(parent)}@{_CLONE_ORIGIN}{name}"
        self._rbd(self.rbd("snap", "create", snap), f"snapshot {parent}")
        try:
            self._rbd(self.rbd("snap", "protect", snap), f"protect {snap}")
            self._rbd(self.rbd("clone", snap, self.spec(name)), f"clone {parent} as {name}")
        except BaseException:
            self._drop_origin(snap)
            raise
        try:
            if virtual_size > self._provisioned(name):
                self._rbd(self.rbd("resize", "--size", f"{virtual_size}B", self.spec(name)),
                          f"grow {name}")
            self._map(name)
        except BaseException:
            self._remove(name)
            raise

    def copy(self, source: Path, dest: Path) -> None:
        """A volume's copy is a linked clone of it (constant time); files are copied."""
        if self.volume_name(source) is None:
            self.files.copy(source, dest)
            return
        self.linked_clone(source, dest, 0)

    def usage(self, path: Path) -> DiskUsage:
        name = self._require_volume(path)
        mine = next((u for u in self._du(self.spec(name)) if u.snapshot is None), None)
        if mine is None:
            raise StorageError(f"Volume {path} is missing.")
        parent = parse_parent(self._rbd(self.rbd("info", "--format", "json", self.spec(name)),
                                        f"describe {name}"))
        shared = 0
        if parent is not None:
            shared = sum(u.used for u in self._du(parent))
        return usage_of(mine.provisioned, mine.used, shared)

    # -- snapshots --------------------------------------------------------------------------

    def snapshot_create(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        if snapshot in self.snapshots(volume):
            raise Conflict(f"Volume {volume.name} already has a snapshot named '{snapshot}'.")
        name = self._require_volume(volume)
        self._rbd(self.rbd("snap", "create", f"{self.spec(name)}@{snapshot}"),
                  f"snapshot {name} as {snapshot}")

    def snapshots(self, volume: Path) -> list[str]:
        return [s.name for s in self._snaps(self._image(volume))
                if _CLONE_ORIGIN not in s.name]

    def snapshot_revert(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        if snapshot not in self.snapshots(volume):
            raise NotFound(f"snapshot of {volume.name}", snapshot)
        name = self._require_volume(volume)
        self._rbd(self.rbd("snap", "rollback", "--no-progress",
                           f"{self.spec(name)}@{snapshot}"), f"revert {name} to {snapshot}")

    def snapshot_delete(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        name = self._require_volume(volume)
        if not self._exists(name) or snapshot not in self.snapshots(volume):
            return
        self._rbd(self.rbd("snap", "rm", "--no-progress", f"{self.spec(name)}@{snapshot}"),
                  f"delete snapshot {snapshot} of {name}")

    # -- BlockVolumeBackend -------------------------------------------------------------------

    def _create(self, name: str, size: int) -> None:
        self._rbd(self.rbd("create", "--size", f"{max(size, 512)}B", self.spec(name)),
                  f"create the image {name}")
        try:
            self._map(name)
        except BaseException:
            self._rbd(self.rbd("rm", "--no-progress", self.spec(name)), f"remove {name}")
            raise

    def _remove(self, name: str) -> None:
        if not self._exists(name):
            return
        children = self._rbd(self.rbd("children", "--format", "json", self.spec(name)),
                             f"list the clones of {name}")
        try:
            kids = [str(c.get("image", c)) if isinstance(c, Mapping) else str(c)
                    for c in json.loads(children or "[]")]
        except ValueError as exc:
            raise StorageError("rbd children printed a list Corral cannot read.") from exc
        if kids:
            raise Conflict(f"Cannot delete {name}: the volume {kids[0]} is a clone of it.")
        parent = parse_parent(self._rbd(self.rbd("info", "--format", "json", self.spec(name)),
                                        f"describe {name}"))
        if self.volume_path(name).exists():
            self._rbd(self.rbd("device", "unmap", self.spec(name)), f"unmap {name}")
        for snap in self._snaps(name):
            if snap.protected:
                self._rbd(self.rbd("snap", "unprotect", f"{self.spec(name)}@{snap.name}"),
                          f"unprotect {snap.name}")
        self._rbd(self.rbd("snap", "purge", "--no-progress", self.spec(name)),
                  f"delete the snapshots of {name}")
        self._rbd(self.rbd("rm", "--no-progress", self.spec(name)), f"delete the image {name}")
        if parent is not None and f"@{_CLONE_ORIGIN}" in parent:
            self._drop_origin(parent)

    def _exists(self, name: str) -> bool:
        cfg = self._config()
        argv = self.rbd("ls", "--format", "json", cfg["rbd_pool"])
        if "namespace" in cfg:
            argv[-1:-1] = ["--namespace", cfg["namespace"]]
        try:
            return name in json.loads(self._rbd(argv, f"list the images of {cfg['rbd_pool']}"))
        except (ValueError, TypeError) as exc:
            raise StorageError("rbd ls printed a list Corral cannot read.") from exc

    # -- helpers -----------------------------------------------------------------------------

    def _image(self, path: Path) -> str:
        name = self.volume_name(path)
        if name is None:
            raise StorageError(
                f"The path {path} is not an image of the pool; bring it in with full_clone."
            )
        if not self._exists(name):
            raise NotFound("volume", str(path), called="at")
        return name

    def _snaps(self, name: str) -> list[RbdSnapshot]:
        return parse_snap_ls(self._rbd(self.rbd("snap", "ls", "--format", "json",
                                                self.spec(name)), f"list snapshots of {name}"))

    def _du(self, spec: str) -> list[ImageUsage]:
        return parse_du(self._rbd(self.rbd("du", "--format", "json", spec), f"measure {spec}"))

    def _provisioned(self, name: str) -> int:
        return next((u.provisioned for u in self._du(self.spec(name)) if u.snapshot is None), 0)

    def _map(self, name: str) -> None:
        if not self.volume_path(name).exists():
            self._rbd(self.rbd("device", "map", self.spec(name)), f"map {name}")

    def _drop_origin(self, snap: str) -> None:
        """Unprotect and remove a clone's origin snapshot once no clone uses it."""
        try:
            self._rbd(self.rbd("snap", "unprotect", snap), f"unprotect {snap}")
        except StorageError as exc:
            if "not protected" not in exc.message:  # a clone cut short before protect
                raise
        self._rbd(self.rbd("snap", "rm", "--no-progress", snap), f"remove {snap}")

    def _rbd(self, argv: list[str], action: str) -> str:
        return run_tool(argv, action, errors=_ERRORS)
