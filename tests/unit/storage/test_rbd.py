"""rbd without Ceph: the argument lists built and the JSON the rbd command prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.errors import InvalidInput, StorageError
from corral.storage.qemu_img import QemuImgLimits
from corral.storage.rbd import (
    ImageUsage,
    RbdBackend,
    RbdSnapshot,
    parse_du,
    parse_parent,
    parse_snap_ls,
)

LIMITS = QemuImgLimits(cpu_seconds=10, address_space=1 << 30)

# `rbd du --format json rbd/corral/web-1` (Ceph 17): the image's snapshots, then itself.
DU = json.dumps({
    "images": [
        {"name": "web-1", "id": "5e1f", "snapshot": "s1", "snapshot_id": 4,
         "provisioned_size": 67108864, "used_size": 4194304},
        {"name": "web-1", "id": "5e1f", "provisioned_size": 134217728,
         "used_size": 8388608},
    ],
    "total_provisioned_size": 134217728,
    "total_used_size": 12582912,
})
SNAP_LS = json.dumps([
    {"id": 9, "name": "s2", "size": 134217728, "protected": "false",
     "timestamp": "Tue Dec  1 16:41:00 2026"},
    {"id": 4, "name": "s1", "size": 67108864, "protected": "false",
     "timestamp": "Tue Dec  1 16:40:01 2026"},
    {"id": 7, "name": "clone:web-2", "size": 67108864, "protected": "true",
     "timestamp": "Tue Dec  1 16:40:30 2026"},
])
INFO = json.dumps({
    "name": "web-1", "size": 134217728, "objects": 32, "order": 22,
    "parent": {"pool": "rbd", "pool_namespace": "corral", "image": "base-debian",
               "id": "4d2a", "snapshot": "clone:web-1", "trash": False, "overlap": 67108864},
})


def test_du_is_read() -> None:
    assert parse_du(DU) == [ImageUsage("web-1", "s1", 67108864, 4194304),
                            ImageUsage("web-1", None, 134217728, 8388608)]
    with pytest.raises(StorageError):
        parse_du('{"images": [{"name": "x"}]}')


def test_snapshots_are_ordered_by_id() -> None:
    assert parse_snap_ls(SNAP_LS) == [RbdSnapshot(4, "s1", False),
                                      RbdSnapshot(7, "clone:web-2", True),
                                      RbdSnapshot(9, "s2", False)]
    with pytest.raises(StorageError):
        parse_snap_ls("{")


def test_parent_is_read() -> None:
    assert parse_parent(INFO) == "rbd/corral/base-debian@clone:web-1"
    assert parse_parent(json.dumps({"name": "base", "size": 1})) is None
    without_ns = json.dumps({"parent": {"pool": "rbd", "pool_namespace": "",
                                        "image": "b", "snapshot": "s"}})
    assert parse_parent(without_ns) == "rbd/b@s"


def backend(tmp_path: Path, **config: str) -> RbdBackend:
    (tmp_path / "pool.json").write_text(json.dumps({"rbd_pool": "rbd", **config}))
    return RbdBackend(tmp_path, LIMITS)


def test_paths_specs_and_argument_lists(tmp_path: Path) -> None:
    b = backend(tmp_path, namespace="corral", client="corral")
    assert b.volume_path("web-1") == Path("/dev/rbd/rbd/corral/web-1")
    assert b.volume_name(Path("/dev/rbd/rbd/corral/web-1")) == "web-1"
    assert b.volume_name(tmp_path / "seed.iso") is None
    assert b.spec("web-1") == "rbd/corral/web-1"
    assert b.rbd("snap", "create", "rbd/corral/web-1@s1") == [
        "rbd", "--id", "corral", "snap", "create", "rbd/corral/web-1@s1"]
    with pytest.raises(InvalidInput):
        b.spec("a/b")
    (tmp_path / "plain").mkdir()
    plain = backend(tmp_path / "plain")
    assert plain.volume_path("web-1") == Path("/dev/rbd/rbd/web-1")
    assert plain.rbd("ls") == ["rbd", "ls"]
