"""zfs without ZFS: the argument lists built and the `zfs list -Hp` output read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.errors import InvalidInput, StorageError
from corral.storage import zfs
from corral.storage.qemu_img import QemuImgLimits
from corral.storage.zfs import Dataset, ZfsBackend, parse_zfs_list

LIMITS = QemuImgLimits(cpu_seconds=10, address_space=1 << 30)

# `zfs list -Hp -o name,used,referenced,usedbydataset,origin,createtxg -s createtxg
# -t filesystem -r tank/corral`: tab-separated, exact bytes, "-" for no origin.
LIST = (
    "tank/corral\t9437184\t98304\t98304\t-\t12\n"
    "tank/corral/base-debian\t8519680\t8495104\t8495104\t-\t40\n"
    "tank/corral/web-1\t2228224\t10616832\t2195456\ttank/corral/base-debian@clone:web-1\t57\n"
)
SNAPSHOTS = (
    "tank/corral/web-1@s1\t0\t10616832\t-\t-\t60\n"
    "tank/corral/web-1@clone:web-2\t0\t10616832\t-\t-\t61\n"
    "tank/corral/web-1@s2\t32768\t10649600\t-\t-\t75\n"
)


def test_zfs_list_is_read() -> None:
    listed = parse_zfs_list(LIST)
    assert listed[2] == Dataset("tank/corral/web-1", 2228224, 10616832, 2195456,
                                "tank/corral/base-debian@clone:web-1", 57)
    assert listed[0].origin is None
    snaps = parse_zfs_list(SNAPSHOTS)
    assert [s.name.split("@")[1] for s in snaps] == ["s1", "clone:web-2", "s2"]
    assert snaps[0].used_by_dataset == 0  # "-" for a snapshot
    with pytest.raises(StorageError):
        parse_zfs_list("tank\t1\t2\n")
    with pytest.raises(StorageError):
        parse_zfs_list("tank\tx\t2\t3\t-\t4\n")


def test_argument_lists() -> None:
    assert zfs.zfs_create("tank/corral/web-1", Path("/pool/web-1")) == [
        "zfs", "create", "-o", "mountpoint=/pool/web-1", "tank/corral/web-1"]
    assert zfs.zfs_snapshot("tank/corral/base", "clone:web-1") == [
        "zfs", "snapshot", "tank/corral/base@clone:web-1"]
    assert zfs.zfs_clone("tank/corral/base@clone:web-1", "tank/corral/web-1",
                         Path("/pool/web-1")) == [
        "zfs", "clone", "-o", "mountpoint=/pool/web-1", "tank/corral/base@clone:web-1",
        "tank/corral/web-1"]
    assert zfs.zfs_destroy("tank/corral/web-1", recursive=True) == [
        "zfs", "destroy", "-r", "tank/corral/web-1"]
    assert zfs.zfs_rollback("tank/corral/web-1", "s1") == [
        "zfs", "rollback", "tank/corral/web-1@s1"]
    assert zfs.zfs_list("tank/corral/web-1", snapshots=True, depth=1) == [
        "zfs", "list", "-Hp", "-o", "name,used,referenced,usedbydataset,origin,createtxg",
        "-s", "createtxg", "-t", "snapshot", "-d", "1", "tank/corral/web-1"]
    assert zfs.zfs_list("tank/corral")[-2:] == ["-r", "tank/corral"]


def test_volumes_are_files_in_a_dataset_each(tmp_path: Path) -> None:
    (tmp_path / "pool.json").write_text(json.dumps({"dataset": "tank/corral"}))
    b = ZfsBackend(tmp_path, LIMITS)
    assert b.volume_path("web-1") == tmp_path / "web-1" / "web-1.qcow2"
    assert b.dataset == "tank/corral"
    with pytest.raises(InvalidInput):
        b.volume_path("a@b")
    (tmp_path / "pool.json").write_text(json.dumps({"dataset": "tank/../x"}))
    with pytest.raises(InvalidInput):
        _ = ZfsBackend(tmp_path, LIMITS).dataset
