"""Snapshot and volume names, the contract's capability rule, and pool.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest

from corral.errors import Conflict, InvalidInput, StorageError
from corral.storage.base import (
    SNAPSHOT,
    StorageBackend,
    check_snapshot_name,
    check_volume_name,
    snapshots_of,
)
from corral.storage.btrfs import BtrfsBackend
from corral.storage.libvirt_pool import LibvirtPoolBackend
from corral.storage.qemu_img import QemuImgLimits
from corral.storage.tools import read_pool_config, tool_error

LIMITS = QemuImgLimits(cpu_seconds=10, address_space=1 << 30)


@pytest.mark.parametrize("name", ["s1", "before-upgrade", "S_3", "a.b", "x" * 63, "9"])
def test_good_names_pass(name: str) -> None:
    assert check_snapshot_name(name) == name
    assert check_volume_name(name) == name


@pytest.mark.parametrize("name", [
    "", " ", "a b", "-rf", ".hidden", "..", "a/b", "../x", "a@b", "a+b", "a:b", "x" * 64,
    "caf\u00e9", "a\nb", "a\x00b", "$(id)", "a;b",
])
def test_bad_names_are_one_sentence(name: str) -> None:
    for check, word in ((check_snapshot_name, "snapshot"), (check_volume_name, "volume")):
        with pytest.raises(InvalidInput) as err:
            check(name)
        text = err.value.message
        assert text.startswith(f"The {word} name ") and text.endswith(".")
        assert text.count(". ") == 0 and "\n" not in text.replace(name, "")


def test_snapshot_capability_and_verbs_go_together() -> None:
    with pytest.raises(TypeError):
        class Liar(StorageBackend):  # declares SNAPSHOT without the verbs
            capabilities: ClassVar[frozenset[str]] = frozenset({SNAPSHOT})
    assert SNAPSHOT in BtrfsBackend.capabilities
    assert snapshots_of(BtrfsBackend(Path("/nonexistent"), LIMITS)) is not None
    pool = LibvirtPoolBackend(lambda: None, "p", "/x")
    assert SNAPSHOT not in pool.capabilities
    assert not hasattr(pool, "snapshot_create")  # no verb that would only raise
    with pytest.raises(Conflict) as err:
        snapshots_of(pool)
    assert err.value.message == "The LibvirtPoolBackend storage cannot snapshot volumes."


def test_pool_json(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as err:
        read_pool_config(tmp_path, "lvm-thin", ["volume_group"])
    assert err.value.message == (
        f"The lvm-thin pool at {tmp_path} has no pool.json naming its volume_group.")
    (tmp_path / "pool.json").write_text("[1]")
    with pytest.raises(StorageError, match="is not a JSON object"):
        read_pool_config(tmp_path, "zfs", ["dataset"])
    (tmp_path / "pool.json").write_text("{nope")
    with pytest.raises(StorageError, match="is not valid JSON"):
        read_pool_config(tmp_path, "zfs", ["dataset"])
    (tmp_path / "pool.json").write_text(json.dumps({"rbd_pool": "rbd", "client": "c",
                                                    "other": 1}))
    assert read_pool_config(tmp_path, "rbd", ["rbd_pool"], ["namespace", "client"]) == {
        "rbd_pool": "rbd", "client": "c"}
    with pytest.raises(StorageError, match="does not name the pool's dataset"):
        read_pool_config(tmp_path, "zfs", ["dataset"])


def test_tool_errors_are_one_sentence() -> None:
    err = tool_error("  Volume group \"vg0\" has insufficient free space (10 extents).\n",
                     5, "create the thin volume web-1")
    assert type(err).__name__ == "NoSpace"
    err = tool_error("cannot create 'tank/corral/web-1': dataset already exists\n", 1,
                     "create web-1", {"dataset already exists": Conflict})
    assert isinstance(err, Conflict)
    assert err.message == "Could not create web-1: create 'tank/corral/web-1': dataset " \
                          "already exists."
    err = tool_error("", 3, "map web-1")
    assert err.message == "Could not map web-1: exit status 3."
