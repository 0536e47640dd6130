"""`vm create NEW --from-snapshot MACHINE@SNAP` with real guests: the copy boots with an
identity of its own and the disk as it was at the snapshot, while a running source goes
on undisturbed; the copy of a linked clone is an overlay of the same base holding only
the snapshot's own clusters; bad requests, failures and kills leave nothing."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from corral.images.appliance import ApplianceArtifacts
from tests.guest_shell import marker, run_in_guest, uptime_and_boot, write_marker
from tests.integration.conftest import CorralEnv, libvirt_domain_names
from tests.libvirt_cleanup import remove_prefixed
from tests.multihost import TestHost, start_hosts, stop_hosts
from tests.serving import import_appliance

pytestmark = pytest.mark.guest

URI = "qemu:///system"






def guest_hostname(name: str) -> str:
    return run_in_guest(URI, name, "echo H=$(hostname)", r"H=([\w-]+)")


def qemu_img_json(*args: str) -> Any:
    return json.loads(subprocess.run(["qemu-img", *args, "--output=json"], check=True,
                                     capture_output=True, text=True).stdout)


def own_data_bytes(disk: str) -> int:
    """Bytes the image holds itself (depth 0 of its chain), by qemu-img map."""
    extents = qemu_img_json("map", "-U", "-f", "qcow2", disk)
    return sum(e["length"] for e in extents if e["depth"] == 0 and e["data"])


def leftovers(env: CorralEnv) -> dict[str, Any]:
    pool = env.root / "state" / "pool"
    return {
        "domains": libvirt_domain_names(env.prefix),
        "pool files": sorted(p.name for p in pool.iterdir()) if pool.exists() else [],
        "records": sorted(m["name"] for m in env.json("vm", "list")),
    }


def one_sentence(result: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert result.returncode == code, result.stderr
    # Rich may wrap the sentence where the terminal would end: compare words.
    assert says in " ".join(result.stderr.split()), result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_a_live_snapshot_becomes_a_machine_of_its_own_and_the_source_goes_on(
        with_appliance: CorralEnv) -> None:
    env = with_appliance
    src, copy = env.name("src"), env.name("copy")
    try:
        env.run("vm", "create", src, "--image", "appliance", "--wait", timeout=600)
        write_marker(src, "one")
        _, boot = uptime_and_boot(URI, src)
        assert env.json("vm", "snapshot", "create", src, "live")["memory"] is True
        write_marker(src, "two")

        made = env.json("vm", "create", copy, "--from-snapshot", f"{src}@live", "--wait")
        (row,) = made
        source = env.json("vm", "show", src)
        assert row["name"] == copy and row["state"] == "running"
        for key in ("uuid", "mac", "hostname", "instance_id", "disk_path", "seed_path"):
            assert row[key] != source[key], key
        assert (row["image"], row["clone"], row["cpus"], row["memory_bytes"]) == (
            source["image"], "linked", source["cpus"], source["memory_bytes"])

        # the copy: its own name inside, the disk as it was at the snapshot
        assert guest_hostname(copy) == copy
        assert marker(copy) == "one"
        # the source: never paused nor reverted, same boot, what it wrote since
        assert source["state"] == "running"
        assert marker(src) == "two"
        assert uptime_and_boot(URI, src)[1] == boot
        assert {s["name"] for s in env.json("vm", "snapshot", "list", src)} == {"live"}
        assert env.json("vm", "snapshot", "list", copy) == []

        # an overlay of the same base, holding only the snapshot's own clusters
        disk, src_disk = row["disk_path"], source["disk_path"]
        info = qemu_img_json("info", "-U", "-f", "qcow2", disk)
        src_info = qemu_img_json("info", "-U", "-f", "qcow2", src_disk)
        assert info["backing-filename"] == src_info["backing-filename"]
        assert info["cluster-size"] == 128 << 10
        assert info["format-specific"]["data"]["extended-l2"] is True
        assert "snapshots" not in info
        check = subprocess.run(["qemu-img", "check", "-U", disk], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        flat = env.root / "flat.qcow2"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-l",
                        "snapshot.name=live", "-O", "qcow2", src_disk, str(flat)], check=True)
        own, whole = own_data_bytes(disk), own_data_bytes(str(flat))
        on_disk, flat_on_disk = Path(disk).stat().st_blocks * 512, flat.stat().st_blocks * 512
        print(f"copy holds {own} B of data ({on_disk} B on disk); a flattened copy "
              f"{whole} B ({flat_on_disk} B on disk): {whole / max(own, 1):.1f}x")
        assert 0 < own < whole
        assert on_disk < flat_on_disk
    finally:
        env.run("vm", "delete", "--force", copy, check=False)
        env.run("vm", "delete", "--force", src, check=False)


def test_a_stopped_source_gives_a_stopped_copy_linked_or_standalone(
        with_appliance: CorralEnv) -> None:
    env = with_appliance
    src, linked, full = env.name("cold"), env.name("linked"), env.name("full")
    try:
        env.run("vm", "create", src, "--image", "appliance", "--wait", timeout=600)
        write_marker(src, "one")
        env.run("vm", "stop", src, timeout=300)
        assert env.json("vm", "snapshot", "create", src, "cold")["memory"] is False
        env.run("vm", "start", src)
        write_marker(src, "two")
        env.run("vm", "stop", src, timeout=300)
        before = env.json("vm", "show", src)

        (row,) = env.json("vm", "create", linked, "--from-snapshot", f"{src}@cold",
                          "--no-start")
        assert row["state"] == "shut-off" and row["clone"] == "linked"
        (standalone,) = env.json("vm", "create", full, "--from-snapshot", f"{src}@cold",
                                 "--no-start", "--clone", "full")
        assert standalone["clone"] == "full"
        info = qemu_img_json("info", "-f", "qcow2", standalone["disk_path"])
        assert "backing-filename" not in info and "snapshots" not in info
        assert env.json("vm", "show", src) == before  # the source is as it was

        env.run("vm", "start", linked)
        env.run("vm", "start", full)
        assert marker(linked) == "one" and guest_hostname(linked) == linked
        assert marker(full) == "one" and guest_hostname(full) == full
    finally:
        for name in (full, linked, src):
            env.run("vm", "delete", "--force", name, check=False)


@pytest.fixture
def source(with_appliance: CorralEnv) -> tuple[CorralEnv, str]:
    """A stopped machine with a snapshot 'snap' (of its disk)."""
    env = with_appliance
    src = env.name("orig")
    env.run("vm", "create", src, "--image", "appliance", "--no-start")
    env.run("vm", "snapshot", "create", src, "snap")
    return env, src


def test_bad_requests_say_one_sentence_and_leave_nothing(source: tuple[CorralEnv, str]) -> None:
    env, src = source
    new = env.name("new")
    before = leftovers(env)
    cases = [
        (["--from-snapshot", src], 2, "is not MACHINE@SNAPSHOT"),
        (["--from-snapshot", f"{src}@"], 2, "is not MACHINE@SNAPSHOT"),
        (["--from-snapshot", f"{src}@a@b"], 2, "is not MACHINE@SNAPSHOT"),
        (["--from-snapshot", f"{env.prefix}-ghost@snap"], 3, "No machine named"),
        (["--from-snapshot", f"{src}@nope"], 3, f"No snapshot named '{src}@nope'"),
        (["--from-snapshot", f"{src}@snap", "--image", "appliance"], 2,
         "Give exactly one of --image and --from-snapshot"),
        ([], 2, "Give exactly one of --image and --from-snapshot"),
        (["--from-snapshot", f"{src}@snap", "--count", "2"], 2,
         "--count cannot be given with --from-snapshot"),
        (["--from-snapshot", f"{src}@snap", "--cpus", "2", "--pool", "p"], 2,
         "--cpus and --pool cannot be given with --from-snapshot"),
        (["--from-snapshot", f"{src}@snap", "--wait", "--no-start"], 2, "contradict"),
    ]
    for args, code, says in cases:
        result = env.run("vm", "create", new, *args, check=False)
        one_sentence(result, code, says)
    taken = env.run("vm", "create", src, "--from-snapshot", f"{src}@snap", check=False)
    one_sentence(taken, 4, "already exists")
    assert leftovers(env) == before


COPY_STEPS = ["machine.record", "disk.from-snapshot", "seed.write", "domain.define",
              "machine.ready"]


def test_a_kill_at_any_step_leaves_nothing_after_the_next_command(
        source: tuple[CorralEnv, str]) -> None:
    env, src = source
    new = env.name("killed")
    before = leftovers(env)
    shown = env.json("vm", "show", src)
    points = [f"{s}:after" for s in COPY_STEPS] + ["disk.from-snapshot:before"]
    for point in points:
        died = env.run("vm", "create", new, "--from-snapshot", f"{src}@snap", "--no-start",
                       check=False, env={"CORRAL_FAILPOINT": point})
        assert died.returncode == -signal.SIGKILL, (point, died.stderr)
        listed = env.run("vm", "list", "-o", "json")
        assert "Recovered interrupted snapshot-clone job" in listed.stderr, point
        assert leftovers(env) == before, point
        job = env.json("job", "list")[0]
        assert (job["kind"], job["state"]) == ("snapshot-clone", "rolled-back"), point
    assert env.json("vm", "show", src) == shown
    # and the name is free again
    env.run("vm", "create", new, "--from-snapshot", f"{src}@snap", "--no-start")
    env.run("vm", "delete", new)
    assert leftovers(env) == before


@pytest.fixture
def small_pool(with_appliance: CorralEnv) -> Any:
    """The env's pool on a 160 MiB tmpfs: room to claim a full copy of the appliance."""
    pool = with_appliance.root / "state" / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160m,mode=0755", "tmpfs", str(pool)], check=True
    )
    yield with_appliance
    subprocess.run(["umount", "-l", str(pool)], check=False)


def test_a_full_pool_during_the_copy_rolls_back(small_pool: CorralEnv) -> None:
    env = small_pool
    pool = env.root / "state" / "pool"
    src = env.name("orig")
    env.run("vm", "create", src, "--image", "appliance", "--no-start")
    env.run("vm", "snapshot", "create", src, "snap")
    before = leftovers(env)
    # room for the record and the job, not for the appliance's ~3.5 MiB flattened; with
    # the fill guard off, qemu-img itself runs out of space half-way
    free = int(subprocess.run(["df", "--output=avail", "-B1", str(pool)], check=True,
                              capture_output=True, text=True).stdout.split()[-1])
    subprocess.run(["fallocate", "-l", str(free - (1 << 20)), str(pool / "ballast")],
                   check=True)
    try:
        result = env.run("vm", "create", env.name("big"), "--from-snapshot", f"{src}@snap",
                         "--clone", "full", "--no-start", check=False,
                         env={"CORRAL_POOL_FILL_LIMIT": "1"})
    finally:
        (pool / "ballast").unlink()
    one_sentence(result, 6, "full")
    assert leftovers(env) == before
    job = env.json("job", "list")[0]
    assert (job["kind"], job["state"]) == ("snapshot-clone", "rolled-back")


REMOTE_ADDRESS = 42  # 127.0.0.42: apart from the other multi-host tests


def test_a_source_on_a_remote_host_is_refused_in_one_sentence(
        appliance: ApplianceArtifacts) -> None:
    prefix = f"sr{secrets.token_hex(3)}"
    root = Path("/var/tmp") / f"corral-test-{prefix}"
    root.mkdir(mode=0o755)
    env = CorralEnv(root=root, prefix=prefix)
    env.env = {f"CORRAL_{k.upper()}": str(v) for k, v in env.settings_kwargs.items()}
    env.env["CORRAL_CONFIG"] = str(root / "none.toml")
    hosts: list[TestHost] = []
    try:
        hosts = start_hosts(root, 1, first_address=REMOTE_ADDRESS)
        (h,) = hosts
        import_appliance(env.settings(), appliance)
        env.run("host", "add", h.name, h.uri, "--pool-path", str(root / "remote-pool"),
                "--network", f"{prefix}-{h.name}", "--accelerator", "tcg")
        src = env.name("far")
        env.run("vm", "create", src, "--image", "appliance", "--host", h.name, "--no-start",
                timeout=600)
        env.run("vm", "snapshot", "create", src, "snap")
        before = sorted(m["name"] for m in env.json("vm", "list"))
        result = env.run("vm", "create", env.name("near"), "--from-snapshot", f"{src}@snap",
                         check=False)
        one_sentence(result, 4, f"Machine '{src}' is on host '{h.name}', and Corral can copy "
                                "a snapshot only from a machine on its own host.")
        assert sorted(m["name"] for m in env.json("vm", "list")) == before
        assert libvirt_domain_names(prefix) == set()
        env.run("vm", "delete", src)
    finally:
        for h in hosts:
            if h.running:
                remove_prefixed(h.uri, prefix)
        stop_hosts(hosts)
        remove_prefixed("qemu:///system", prefix)
        shutil.rmtree(root, ignore_errors=True)
