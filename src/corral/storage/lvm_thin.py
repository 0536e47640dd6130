"""Volumes as LVM thin volumes: a linked clone is a thin snapshot, in constant time.

The pool's directory holds its plain files (console logs, seeds) and a ``pool.json``
naming the volume group and the thin pool in it that hold the volumes::

    {"volume_group": "vg0", "thin_pool": "corral"}

``volume_path("web-1")`` is ``/dev/vg0/web-1``, the thin volume's device: a raw disk
(``corral.storage.block`` says how the domain and the file verbs treat it).

* A linked clone (and a copy) is ``lvcreate --snapshot`` of the base's thin volume,
  activated with ``lvchange --activate y --ignoreactivationskip`` (LVM marks thin
  snapshots to be skipped at activation), then grown with ``lvextend`` if asked. A thin
  snapshot is an independent thin volume sharing blocks in the pool, so deleting a base
  with clones is safe: they keep their blocks.
* A full clone is a new thin volume that ``qemu-img convert`` writes the base onto as raw.
* A volume snapshot ``s1`` of ``web-1`` is the read-only thin snapshot ``web-1+s1``
  (``+`` is in no volume or snapshot name Corral accepts), tagged with the time it was
  taken so that listing orders them exactly. A revert snapshots it again as
  ``web-1++revert``, renames the volume aside and that one into its place, and removes the
  old one: constant time, though not one atomic step (a crash between the two renames
  leaves the volume as ``web-1++old``; the next revert of ``web-1`` puts it back first).
  Deleting a volume removes its snapshots.
* Usage comes from ``lvs``: a thin volume's mapped blocks (``data_percent``). LVM does not
  report which of them a snapshot still shares with its origin, so a clone's shared bytes
  are estimated as its origin's mapped bytes (at most its own), the rest counted owned.
  Sizes are rounded up to the volume group's extent size (4 MiB by default).

Needs the ``lvm2`` tools, device-mapper with ``dm-thin-pool``, and root.
"""

from __future__ import annotations

import json
import time
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

_TAKEN = "corral-taken-"
"""The tag prefix recording, in nanoseconds, when a snapshot was taken."""
_REVERT, _OLD = "++revert", "++old"


@dataclass(frozen=True, slots=True)
class ThinVolume:
    """One logical volume of the volume group, as ``lvs`` reports it."""

    name: str
    size: int
    """Virtual size in bytes."""
    mapped: int
    """Bytes of the thin pool mapped to it (shared with snapshots and origin included)."""
    origin: str | None
    tags: tuple[str, ...]


def parse_lvs(text: str) -> dict[str, ThinVolume]:
    """``lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,data_percent,
    origin,lv_tags`` output, by volume name. Pure. StorageError if it is not that."""
    try:
        rows: list[Mapping[str, Any]] = [
            lv for report in json.loads(text)["report"] for lv in report.get("lv", [])
        ]
        out: dict[str, ThinVolume] = {}
        for lv in rows:
            size = int(str(lv["lv_size"]).rstrip("B") or 0)
            percent = float(lv.get("data_percent") or 0)
            tags = tuple(t for t in str(lv.get("lv_tags") or "").split(",") if t)
            out[str(lv["lv_name"])] = ThinVolume(
                name=str(lv["lv_name"]),
                size=size,
                mapped=int(size * percent / 100),
                origin=str(lv.get("origin") or "") or None,
                tags=tags,
            )
        return out
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError("lvs printed a report Corral cannot read.") from exc


def taken_at(volume: ThinVolume) -> int:
    """When the snapshot ``volume`` was taken (ns), from its tag; 0 if untagged."""
    for tag in volume.tags:
        if tag.startswith(_TAKEN) and tag[len(_TAKEN):].isdigit():
            return int(tag[len(_TAKEN):])
    return 0


def thin_usage(volumes: Mapping[str, ThinVolume], name: str) -> DiskUsage:
    """The usage of ``name`` as this module estimates it (see the module's doc). Pure."""
    lv = volumes[name]
    origin = volumes.get(lv.origin) if lv.origin else None
    shared = min(lv.mapped, origin.mapped) if origin is not None else 0
    return usage_of(lv.size, lv.mapped - shared, shared)


# -- the commands, as argument lists (pure, so they are unit tested) -------------------


def lvcreate_thin(vg: str, pool: str, name: str, size: int) -> list[str]:
    return ["lvcreate", "--yes", "--type", "thin", "--virtualsize", f"{size}b",
            "--thinpool", f"{vg}/{pool}", "--name", name]


def lvcreate_snapshot(vg: str, origin: str, name: str, *, readonly: bool = False,
                      tags: tuple[str, ...] = ()) -> list[str]:
    argv = ["lvcreate", "--yes", "--snapshot", "--name", name,
            "--permission", "r" if readonly else "rw"]
    for tag in tags:
        argv += ["--addtag", tag]
    return [*argv, f"{vg}/{origin}"]


def lvchange_activate(vg: str, name: str) -> list[str]:
    return ["lvchange", "--activate", "y", "--ignoreactivationskip", f"{vg}/{name}"]


def lvextend(vg: str, name: str, size: int) -> list[str]:
    return ["lvextend", "--yes", "--size", f"{size}b", f"{vg}/{name}"]


def lvremove(vg: str, names: list[str]) -> list[str]:
    return ["lvremove", "--yes", *(f"{vg}/{n}" for n in names)]


def lvrename(vg: str, old: str, new: str) -> list[str]:
    return ["lvrename", vg, old, new]


def lvs(vg: str) -> list[str]:
    return ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
            "-o", "lv_name,lv_size,data_percent,origin,lv_tags", vg]


_ERRORS = {
    "already exists": Conflict,
    "failed to find logical volume": StorageError,
}


class LvmThinBackend(BlockVolumeBackend, Snapshots):
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {LINKED_CLONE, FULL_CLONE, THIN_PROVISIONING, SNAPSHOT}
    )

    config_name = "lvm-thin"
    config_keys = ("volume_group", "thin_pool")

    @property
    def vg(self) -> str:
        return self._config()["volume_group"]

    @property
    def thin_pool(self) -> str:
        return self._config()["thin_pool"]

    def volume_path(self, name: str) -> Path:
        return Path("/dev") / self.vg / check_volume_name(name)

    def volume_name(self, path: Path) -> str | None:
        if path.parent != Path("/dev") / self.vg:
            return None
        try:
            return check_volume_name(path.name)
        except CorralError:
            return None

    # -- clones ---------------------------------------------------------------------------

    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        origin, name = self._thin_volume(base), self._require_volume(dest)
        self._snapshot_as(origin, name)
        try:
            if virtual_size > self._volumes()[name].size:
                self._lvm(lvextend(self.vg, name, virtual_size), f"grow {name}")
        except BaseException:
            self._remove(name)
            raise

    def copy(self, source: Path, dest: Path) -> None:
        """A volume's copy is a thin snapshot of it (constant time); files are copied."""
        if self.volume_name(source) is None:
            self.files.copy(source, dest)
            return
        self._snapshot_as(self._thin_volume(source), self._require_volume(dest))

    def usage(self, path: Path) -> DiskUsage:
        name = self._require_volume(path)
        volumes = self._volumes()
        if name not in volumes:
            raise StorageError(f"Volume {path} is missing.")
        return thin_usage(volumes, name)

    # -- snapshots --------------------------------------------------------------------------

    def snapshot_create(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        name = self._existing(volume)
        if f"{name}+{snapshot}" in self._volumes():
            raise Conflict(f"Volume {name} already has a snapshot named '{snapshot}'.")
        tag = f"{_TAKEN}{time.time_ns()}"
        self._lvm(lvcreate_snapshot(self.vg, name, f"{name}+{snapshot}", readonly=True,
                                    tags=(tag,)), f"snapshot {name} as {snapshot}")

    def snapshots(self, volume: Path) -> list[str]:
        name = self._existing(volume)
        prefix = f"{name}+"
        mine = [lv for lv in self._volumes().values()
                if lv.name.startswith(prefix) and "+" not in lv.name[len(prefix):]]
        return [lv.name[len(prefix):] for lv in sorted(mine, key=lambda v: (taken_at(v),
                                                                            v.name))]

    def snapshot_revert(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        name = self._existing(volume)
        volumes = self._volumes()
        if f"{name}+{snapshot}" not in volumes:
            raise NotFound(f"snapshot of {name}", snapshot)
        stale = [n for n in (name + _REVERT, name + _OLD) if n in volumes]
        if stale:
            self._lvm(lvremove(self.vg, stale), f"remove what a revert of {name} left")
        self._snapshot_as(f"{name}+{snapshot}", name + _REVERT)
        self._lvm(lvrename(self.vg, name, name + _OLD), f"set {name} aside")
        try:
            self._lvm(lvrename(self.vg, name + _REVERT, name), f"revert {name}")
        except BaseException:
            self._lvm(lvrename(self.vg, name + _OLD, name), f"put {name} back")
            raise
        self._lvm(lvremove(self.vg, [name + _OLD]), f"remove the old {name}")

    def snapshot_delete(self, volume: Path, snapshot: str) -> None:
        check_snapshot_name(snapshot)
        name = self._require_volume(volume)
        if f"{name}+{snapshot}" in self._volumes():
            self._lvm(lvremove(self.vg, [f"{name}+{snapshot}"]), f"delete snapshot {snapshot}")

    # -- BlockVolumeBackend -------------------------------------------------------------------

    def _create(self, name: str, size: int) -> None:
        self._lvm(lvcreate_thin(self.vg, self.thin_pool, name, max(size, 512)),
                  f"create the thin volume {name}")

    def _remove(self, name: str) -> None:
        volumes = self._volumes()
        if name not in volumes and name + _OLD in volumes:  # a revert cut short
            self._lvm(lvrename(self.vg, name + _OLD, name), f"put {name} back")
            volumes = self._volumes()
        doomed = [n for n in volumes if n == name or n.startswith(f"{name}+")]
        if doomed:
            # Snapshots first: a failure then leaves the volume, never orphaned snapshots.
            doomed.sort(key=lambda n: n == name)
            self._lvm(lvremove(self.vg, doomed), f"delete the volume {name}")

    def _exists(self, name: str) -> bool:
        return name in self._volumes()

    # -- helpers -----------------------------------------------------------------------------

    def _volumes(self) -> dict[str, ThinVolume]:
        return parse_lvs(self._lvm(lvs(self.vg), f"list the volumes of {self.vg}"))

    def _thin_volume(self, path: Path) -> str:
        name = self.volume_name(path)
        if name is None:
            raise StorageError(
                f"The path {path} is not a thin volume of {self.vg}; bring it in with full_clone."
            )
        if name not in self._volumes():
            raise NotFound("volume", str(path), called="at")
        return name

    def _existing(self, volume: Path) -> str:
        name = self._require_volume(volume)
        volumes = self._volumes()
        if name not in volumes:
            if name + _OLD in volumes:  # a revert cut short: the volume is set aside
                self._lvm(lvrename(self.vg, name + _OLD, name), f"put {name} back")
                return name
            raise NotFound("volume", str(volume), called="at")
        return name

    def _snapshot_as(self, origin: str, name: str) -> None:
        if name in self._volumes():
            raise Conflict(f"Cannot clone onto {self.volume_path(name)}: it already exists.")
        self._lvm(lvcreate_snapshot(self.vg, origin, name), f"snapshot {origin} as {name}")
        try:
            self._lvm(lvchange_activate(self.vg, name), f"activate {name}")
        except BaseException:
            self._lvm(lvremove(self.vg, [name]), f"remove {name}")
            raise

    def _lvm(self, argv: list[str], action: str) -> str:
        return run_tool(argv, action, errors=_ERRORS)
