"""Storage pools by type, with real guests: ``pool add`` checks the filesystem, a machine
created with ``--pool`` gets its disk there by the type's native clone, boots, and
snapshots and reverts like any other; the pool is accounted for and removed cleanly.

btrfs and XFS (reflink=1) are loop-mounted for the test (tests.loopfs)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest_shell import counter, marker, start_counter, write_marker
from tests.integration.conftest import CorralEnv
from tests.loopfs import loop_mounted

URI = "qemu:///system"
SUBVOLUME_ROOT_INODE = 256


FILESYSTEM = {"btrfs": "btrfs", "reflink": "xfs"}


@pytest.fixture(params=["btrfs", "reflink", "qcow2"])
def typed_pool(request: pytest.FixtureRequest, with_appliance: CorralEnv) -> Iterator[
        tuple[CorralEnv, str, Path]]:
    """``(env, pool name, its directory)``: an added pool of the type on a filesystem it
    needs (a qcow2 pool takes any directory)."""
    kind = request.param
    env = with_appliance
    fs_top = env.root / "fs"
    fs_top.mkdir(mode=0o755)
    with contextlib.ExitStack() as stack:
        if kind in FILESYSTEM:
            mnt = stack.enter_context(loop_mounted(FILESYSTEM[kind], fs_top))
        else:
            mnt = fs_top / "plain"
            mnt.mkdir(mode=0o755)
        name = f"{kind}-pool"
        env.run("pool", "add", name, "--type", kind, "--path", str(mnt))
        try:
            yield env, name, mnt
        finally:
            # Whatever a failed test left: machines first (their disks are in the pool).
            for m in env.json("vm", "list"):
                env.run("vm", "delete", m["name"], "--force", check=False, timeout=300)
            env.run("pool", "remove", name, check=False)








def backing_of(disk: str) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", disk],
                                     check=True, capture_output=True, text=True).stdout)
    return info.get("backing-filename")


@pytest.mark.guest
def test_a_guest_on_a_typed_pool_boots_snapshots_and_reverts(
        typed_pool: tuple[CorralEnv, str, Path]) -> None:
    env, pool, mnt = typed_pool
    name = env.name("typed")
    env.run("vm", "create", name, "--image", "appliance", "--pool", pool, "--wait",
            timeout=600)
    machine = env.json("vm", "show", name)
    disk = Path(machine["disk_path"])
    assert disk.is_relative_to(mnt)
    copy = mnt / next(p.name for p in mnt.iterdir() if p.name.startswith("base-appliance"))
    if pool.startswith("qcow2"):
        # an overlay of the pool's own copy of the image, not of the library's
        assert backing_of(str(disk)) == str(copy)
    else:
        # a native clone stands alone: no qcow2 backing chain at all
        assert backing_of(str(disk)) is None
    if pool.startswith("btrfs"):
        assert disk.parent.stat().st_ino == SUBVOLUME_ROOT_INODE  # a subvolume of its own
        assert copy.stat().st_ino == SUBVOLUME_ROOT_INODE  # the image's copy: another

    if not pool.startswith("qcow2"):
        # The native clones' disks snapshot as any qcow2 does (test_snapshots covers a
        # stopped machine's and the tree): a live snapshot holds memory, so a counter in
        # /run (tmpfs) resumes where it stood, and the disk comes back as it was.
        start_counter(name)
        time.sleep(2)
        write_marker(name, "one")
        at_snapshot = counter(name)
        env.run("vm", "snapshot", "create", name, "live")
        write_marker(name, "two")
        time.sleep(3)
        later = counter(name)
        env.run("vm", "snapshot", "revert", name, "live")
        assert marker(name) == "one"
        assert at_snapshot <= counter(name) < later

    # the pool's figures: the machine's disk is accounted for there, not in the host's own
    usage = {p["pool"]: p for p in env.json("pool", "usage")}
    ours = {m["name"]: m for m in usage[pool]["machines"]}
    assert name in ours and ours[name]["virtual_size"] > 0
    assert name not in {m["name"] for m in usage[env.prefix]["machines"]}
    st = os.statvfs(mnt)
    assert usage[pool]["capacity_bytes"] == st.f_blocks * st.f_frsize

    shown = env.json("pool", "show", pool)
    assert shown["machines"] == [name] and shown["images"] == ["appliance"]
    refused = env.run("pool", "remove", pool, check=False)
    assert refused.returncode != 0 and name in refused.stderr
    assert "Traceback" not in refused.stderr

    env.run("vm", "delete", name, "--force", timeout=300)
    assert not disk.exists()
    if pool.startswith("btrfs"):
        assert not disk.parent.exists()  # its subvolume went with it
    env.run("pool", "remove", pool)
    # Corral's copy of the image went with the pool; the directory stays
    assert mnt.is_dir() and [p.name for p in mnt.iterdir() if not p.name.startswith(".")] == []
    assert pool not in {p["name"] for p in env.json("pool", "list")}


def test_pool_add_refuses_what_cannot_serve_and_records_nothing(
        with_appliance: CorralEnv) -> None:
    env = with_appliance
    fs_top = env.root / "fs"
    fs_top.mkdir(mode=0o755)
    with loop_mounted("xfs", fs_top) as xfs:
        elsewhere = env.root / "plain"
        elsewhere.mkdir()
        cases = {
            ("bad", "--type", "btrfs", "--path", str(xfs)): "is on xfs",
            ("bad", "--type", "nope", "--path", str(xfs)): "No storage type named 'nope'",
            ("bad", "--type", "qcow2", "--path", str(env.root / "missing")): "does not exist",
            ("bad", "--type", "qcow2", "--path", str(env.root / "state")): "overlaps",
            ("usage", "--type", "qcow2", "--path", str(elsewhere)): "choose another name",
            (env.prefix, "--type", "qcow2", "--path", str(elsewhere)): "host's own pool",
            ("Bad_Name", "--type", "qcow2", "--path", str(elsewhere)): "not a valid pool name",
        }
        for args, said in cases.items():
            result = env.run("pool", "add", *args, check=False)
            assert result.returncode != 0, args
            assert said in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr
        assert [p["name"] for p in env.json("pool", "list")] == [env.prefix]

        env.run("pool", "add", "x", "--type", "reflink", "--path", str(xfs))
        again = env.run("pool", "add", "x", "--type", "reflink", "--path", str(elsewhere),
                        check=False)
        assert again.returncode != 0 and "already exists" in again.stderr
        unknown = env.run("vm", "create", "v", "--image", "appliance", "--pool", "nowhere",
                          check=False)
        assert unknown.returncode != 0 and "No storage pool named 'nowhere'" in unknown.stderr
        env.run("pool", "remove", "x")
