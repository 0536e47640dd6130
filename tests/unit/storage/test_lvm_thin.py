"""lvm-thin without LVM: the argument lists built and the lvs report read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.errors import InvalidInput, StorageError
from corral.storage import lvm_thin
from corral.storage.lvm_thin import LvmThinBackend, ThinVolume, parse_lvs, taken_at, thin_usage
from corral.storage.qemu_img import QemuImgLimits

LIMITS = QemuImgLimits(cpu_seconds=10, address_space=1 << 30)

# `lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,data_percent,origin,lv_tags
# vg0` as lvm2 2.03 prints it (thin pool, a base, a clone of it, a snapshot of the clone).
LVS = """\
  {
      "report": [
          {
              "lv": [
                  {"lv_name":"corral", "lv_size":"1073741824", "data_percent":"12.31",
                   "origin":"", "lv_tags":""},
                  {"lv_name":"base-debian", "lv_size":"67108864", "data_percent":"50.00",
                   "origin":"", "lv_tags":""},
                  {"lv_name":"web-1", "lv_size":"134217728", "data_percent":"31.25",
                   "origin":"base-debian", "lv_tags":""},
                  {"lv_name":"web-1+s1", "lv_size":"134217728", "data_percent":"31.25",
                   "origin":"web-1", "lv_tags":"corral-taken-1796143199000000001,x"}
              ]
          }
      ]
  }
"""


def backend(tmp_path: Path) -> LvmThinBackend:
    (tmp_path / "pool.json").write_text(json.dumps({"volume_group": "vg0",
                                                    "thin_pool": "corral"}))
    return LvmThinBackend(tmp_path, LIMITS)


def test_lvs_report_is_read() -> None:
    volumes = parse_lvs(LVS)
    assert volumes["web-1"] == ThinVolume("web-1", 128 << 20, 40 << 20, "base-debian", ())
    assert volumes["base-debian"].mapped == 32 << 20
    assert taken_at(volumes["web-1+s1"]) == 1796143199000000001
    assert taken_at(volumes["web-1"]) == 0
    with pytest.raises(StorageError):
        parse_lvs("not json")
    with pytest.raises(StorageError):
        parse_lvs('{"report": [{"lv": [{"lv_size": "1"}]}]}')


def test_usage_counts_the_origins_blocks_as_shared() -> None:
    volumes = parse_lvs(LVS)
    usage = thin_usage(volumes, "web-1")
    assert (usage.virtual_size, usage.owned_bytes, usage.shared_bytes) == (
        128 << 20, 8 << 20, 32 << 20)
    base = thin_usage(volumes, "base-debian")
    assert (base.owned_bytes, base.shared_bytes) == (32 << 20, 0)


def test_argument_lists() -> None:
    assert lvm_thin.lvcreate_thin("vg0", "corral", "web-1", 1 << 30) == [
        "lvcreate", "--yes", "--type", "thin", "--virtualsize", "1073741824b",
        "--thinpool", "vg0/corral", "--name", "web-1"]
    assert lvm_thin.lvcreate_snapshot("vg0", "base", "web-1") == [
        "lvcreate", "--yes", "--snapshot", "--name", "web-1", "--permission", "rw", "vg0/base"]
    assert lvm_thin.lvcreate_snapshot("vg0", "web-1", "web-1+s1", readonly=True,
                                      tags=("corral-taken-5",)) == [
        "lvcreate", "--yes", "--snapshot", "--name", "web-1+s1", "--permission", "r",
        "--addtag", "corral-taken-5", "vg0/web-1"]
    assert lvm_thin.lvchange_activate("vg0", "web-1") == [
        "lvchange", "--activate", "y", "--ignoreactivationskip", "vg0/web-1"]
    assert lvm_thin.lvextend("vg0", "web-1", 4096) == [
        "lvextend", "--yes", "--size", "4096b", "vg0/web-1"]
    assert lvm_thin.lvremove("vg0", ["a+s", "a"]) == ["lvremove", "--yes", "vg0/a+s", "vg0/a"]
    assert lvm_thin.lvrename("vg0", "a", "a++old") == ["lvrename", "vg0", "a", "a++old"]
    assert lvm_thin.lvs("vg0")[-1] == "vg0"


def test_volume_paths_are_the_devices(tmp_path: Path) -> None:
    b = backend(tmp_path)
    assert b.volume_path("web-1") == Path("/dev/vg0/web-1")
    assert b.volume_name(Path("/dev/vg0/web-1")) == "web-1"
    assert b.volume_name(tmp_path / "web-1.log") is None  # a file of the directory
    assert b.volume_name(Path("/dev/vg0/web-1+s1")) is None  # a snapshot is no volume
    assert b.volume_name(Path("/dev/vg1/web-1")) is None
    with pytest.raises(InvalidInput):
        b.volume_path("../etc")
    with pytest.raises(InvalidInput):
        b.volume_path("-x")


def test_pool_names_are_checked_too(tmp_path: Path) -> None:
    (tmp_path / "pool.json").write_text(json.dumps({"volume_group": "--all",
                                                    "thin_pool": "p"}))
    with pytest.raises(InvalidInput):
        LvmThinBackend(tmp_path, LIMITS).volume_path("web-1")


def test_constructing_touches_nothing() -> None:
    LvmThinBackend(Path("/nonexistent"), LIMITS)  # no pool.json read yet
