"""Moving real guests between real hosts (tests/multihost.py): live with and without
shared storage, cold, evacuation and rebalancing, and the faults that must leave every
machine whole in exactly one place.

Hosts: h13 with its own pool; h14 and h15 share one pool directory (shared storage);
the local host is in maintenance.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt
import pytest

from corral.images.appliance import ApplianceArtifacts
from tests.guest_shell import run_in_guest, uptime_and_boot
from tests.integration.conftest import CORRAL, CorralEnv
from tests.libvirt_cleanup import remove_prefixed
from tests.multihost import TestHost, connection, start_hosts, stop_hosts
from tests.serving import import_appliance

pytestmark = pytest.mark.guest

FIRST_ADDRESS = 13  # 127.0.0.13-15: apart from the other multi-host tests


@pytest.fixture(scope="module")
def pool(appliance: ApplianceArtifacts) -> Iterator[tuple[CorralEnv, list[TestHost]]]:
    prefix = f"mg{secrets.token_hex(3)}"
    root = Path("/var/tmp") / f"corral-test-{prefix}"
    root.mkdir(mode=0o755)
    env = CorralEnv(root=root, prefix=prefix)
    env.env = {f"CORRAL_{k.upper()}": str(v) for k, v in env.settings_kwargs.items()}
    env.env["CORRAL_CONFIG"] = str(root / "none.toml")
    hosts: list[TestHost] = []
    try:
        hosts = start_hosts(root, 3, first_address=FIRST_ADDRESS)
        import_appliance(env.settings(), appliance)
        shared = root / "shared-pool"
        pools = {hosts[0].name: root / hosts[0].name / "pool", hosts[1].name: shared,
                 hosts[2].name: shared}
        for h in hosts:
            env.run("host", "add", h.name, h.uri, "--pool-path", str(pools[h.name]),
                    "--network", f"{prefix}-{h.name}", "--accelerator", "tcg")
        env.run("host", "maintenance", "local", "on")
        yield env, hosts
    finally:
        for h in hosts:
            if h.running:
                remove_prefixed(h.uri, prefix)
        stop_hosts(hosts)
        remove_prefixed("qemu:///system", prefix)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cleanup(pool: tuple[CorralEnv, list[TestHost]]) -> Iterator[CorralEnv]:
    env, hosts = pool
    try:
        yield env
    finally:
        for h in hosts:
            if not h.running:
                h.start()
        for m in env.json("vm", "list"):
            env.run("vm", "delete", "--force", m["name"], check=False)
        for h in hosts:
            env.run("host", "maintenance", h.name, "off", check=False)


def where_defined(hosts: list[TestHost], name: str) -> dict[str, bool]:
    """Host name -> whether the domain runs there, for every host that defines it."""
    found = {}
    for h in hosts:
        with connection(h.uri) as conn:
            try:
                found[h.name] = bool(conn.lookupByName(name).isActive())
            except libvirt.libvirtError:
                continue
    return found


def record(env: CorralEnv, name: str) -> dict:
    return next(m for m in env.json("vm", "list") if m["name"] == name)


def host_of(hosts: list[TestHost], name: str) -> TestHost:
    return next(h for h in hosts if h.name == name)


def test_a_running_guest_moves_live_and_keeps_running(cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    h13, h14, h15 = hosts
    name = env.name("live")
    env.run("vm", "create", name, "--image", "appliance", "--host", h13.name, "--wait",
            timeout=600)
    run_in_guest(h13.uri, name, "echo moved-with-me >/root/marker && sync && echo WROTE",
                 "WROTE")
    before, boot = uptime_and_boot(h13.uri, name)

    # no shared storage: the overlay's blocks travel with the memory
    moved = json.loads(env.run("vm", "migrate", name, "--to", h14.name, "--live",
                               "--output", "json", timeout=600).stdout)
    assert (moved["source"], moved["target"], moved["shared_storage"]) == (
        h13.name, h14.name, False)
    assert where_defined(hosts, name) == {h14.name: True}
    after, boot_after = uptime_and_boot(h14.uri, name)
    assert boot_after == boot and after > before  # the same boot, still counting
    assert record(env, name)["host"] == h14.name
    assert not list((env.root / h13.name / "pool").glob(f"{name}-*"))  # the source is clean
    assert run_in_guest(h14.uri, name, "cat /root/marker", "moved-with-me")

    # shared storage: the target reads the same files, only memory moves
    disk = env.json("vm", "show", name)["disk_path"]
    moved = json.loads(env.run("vm", "migrate", name, "--to", h15.name, "--live",
                               "--output", "json", timeout=600).stdout)
    assert moved["shared_storage"] is True
    assert env.json("vm", "show", name)["disk_path"] == disk and Path(disk).exists()
    assert where_defined(hosts, name) == {h15.name: True}
    later, boot_later = uptime_and_boot(h15.uri, name)
    assert boot_later == boot and later > after

    # the scheduler picks the target when none is named; the progress reached the job
    env.run("vm", "migrate", name, "--live", timeout=600)
    landed = record(env, name)["host"]
    assert landed in (h13.name, h14.name)
    assert where_defined(hosts, name) == {landed: True}
    assert uptime_and_boot(host_of(hosts, landed).uri, name)[1] == boot
    jobs = [j for j in env.json("job", "list") if j["target"] == name]
    assert {j["kind"] for j in jobs} >= {"migrate-live"}
    assert all(j["state"] == "succeeded" for j in jobs)
    with env.context() as ctx:  # the long step's progress went out as events
        sent = [e.message for e in ctx.store.list_events(limit=1000)
                if e.kind == "machine.migrating" and e.target == name]
    assert any(m.endswith("100 % sent") for m in sent), sent


def test_a_stopped_machine_moves_cold_with_its_data(cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    h13, h14, _h15 = hosts
    name = env.name("cold")
    env.run("vm", "create", name, "--image", "appliance", "--host", h14.name, "--wait",
            timeout=600)
    run_in_guest(h14.uri, name, "echo cold-bytes >/root/marker && sync && echo WROTE", "WROTE")
    identity = env.json("vm", "show", name)
    env.run("vm", "stop", name, timeout=300)

    refused = env.run("vm", "migrate", name, "--to", h13.name, "--live", check=False)
    assert refused.returncode != 0 and "not running" in refused.stderr

    moved = json.loads(env.run("vm", "migrate", name, "--to", h13.name, "--output", "json",
                               timeout=600).stdout)
    assert (moved["target"], moved["live"], moved["shared_storage"]) == (h13.name, False, False)
    assert where_defined(hosts, name) == {h13.name: False}
    shown = env.json("vm", "show", name)
    assert shown["host"] == h13.name and shown["disk_path"].startswith(str(env.root / h13.name))
    assert (shown["uuid"], shown["mac"]) == (identity["uuid"], identity["mac"])  # a move keeps them
    # only the overlay travelled: the base on h13 is the shared copy the overlay points at
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output", "json", "-U", shown["disk_path"]],
        check=True, capture_output=True, text=True).stdout)
    assert info["backing-filename"].startswith(str(env.root / h13.name / "pool" / "base-"))
    assert not list((env.root / "shared-pool").glob(f"{name}-*"))

    env.run("vm", "start", name)
    assert run_in_guest(h13.uri, name, "cat /root/marker", "cold-bytes", timeout=300)

    running = env.run("vm", "migrate", name, "--to", h14.name, check=False)
    assert running.returncode != 0 and "--live" in running.stderr


def test_evacuate_moves_everything_and_respects_anti_affinity(cleanup: CorralEnv,
                                                              pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    h13, h14, h15 = hosts
    env.run("vm", "create", env.name("ev"), "--image", "appliance", "--count", "2",
            "--anti-affinity", "ev", "--no-start")
    placed = {m["name"]: m["host"] for m in env.json("vm", "list")}
    assert len(set(placed.values())) == 2
    victim = placed[env.name("ev-1")]
    free = ({h.name for h in hosts} - set(placed.values())).pop()

    out = env.run("host", "evacuate", victim, timeout=600)
    assert env.name("ev-1") in out.stdout
    after = {m["name"]: m["host"] for m in env.json("vm", "list")}
    # anti-affinity: the only host without a machine of the group
    assert after[env.name("ev-1")] == free
    assert after[env.name("ev-2")] == placed[env.name("ev-2")]
    assert {h["name"]: h["state"] for h in env.json("host", "list")}[victim] == "maintenance"

    # a second evacuation has nowhere to put the group: it says so and moves nothing
    stuck = env.run("host", "evacuate", free, check=False)
    assert stuck.returncode == 1
    assert "already runs a machine of group 'ev'" in " ".join(stuck.stdout.split())
    assert {m["name"]: m["host"] for m in env.json("vm", "list")} == after
    del h13, h14, h15


def test_rebalance_carries_out_its_plan(cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    h13 = hosts[0]
    for i in range(3):
        env.run("vm", "create", env.name(f"rb{i}"), "--image", "appliance", "--memory", "512M",
                "--host", h13.name, "--no-start")
    plan = env.json("pool", "rebalance", "--dry-run")
    assert plan, "three machines on one host of three: the plan moves some"
    env.run("pool", "rebalance", timeout=600)
    after = {m["name"]: m["host"] for m in env.json("vm", "list")}
    for move in plan:
        assert after[move["machine"]] == move["target"]
        assert where_defined(hosts, move["machine"]) == {move["target"]: False}
    assert len(set(after.values())) > 1
    assert env.json("pool", "rebalance", "--dry-run") == []


# -- faults ----------------------------------------------------------------------------


def test_a_target_libvirtd_killed_mid_live_migration_leaves_the_guest_on_its_source(
        cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    h13, h14, _h15 = hosts
    name = env.name("kill-dst")
    env.run("vm", "create", name, "--image", "appliance", "--host", h14.name, "--wait",
            timeout=600)
    _, boot = uptime_and_boot(h14.uri, name)
    # Slow the move down (1 MiB/s) so that it is surely under way when the target dies.
    mover = popen(env, "vm", "migrate", name, "--to", h13.name, "--live",
                  extra={"CORRAL_MIGRATION_BANDWIDTH_MIB": "1"})
    try:
        wait_for_step(env, name, "domain.migrate")
        time.sleep(2)
        h13.kill()
        mover.wait(timeout=300)
        assert mover.returncode != 0
    finally:
        if mover.poll() is None:
            mover.kill()
        h13.start()
    assert record(env, name)["host"] == h14.name
    assert where_defined(hosts, name) == {h14.name: True}
    assert uptime_and_boot(h14.uri, name)[1] == boot  # never restarted
    # the target's files could not be removed while it was down; the next command does it
    env.run("host", "list")
    assert not list((env.root / h13.name / "pool").glob(f"{name}-*"))
    job = next(j for j in env.json("job", "list") if j["target"] == name
               and j["kind"] == "migrate-live")
    assert job["state"] == "rolled-back"


def test_corral_killed_mid_live_migration_settles_where_the_guest_is(
        cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    h13, h14, _h15 = hosts
    name = env.name("kill-me")
    env.run("vm", "create", name, "--image", "appliance", "--host", h13.name, "--wait",
            timeout=600)
    _, boot = uptime_and_boot(h13.uri, name)
    mover = popen(env, "vm", "migrate", name, "--to", h14.name, "--live",
                  extra={"CORRAL_MIGRATION_BANDWIDTH_MIB": "4"})
    try:
        wait_for_step(env, name, "domain.migrate")
        os.kill(mover.pid, signal.SIGKILL)
        mover.wait(timeout=30)
    finally:
        if mover.poll() is None:
            mover.kill()
    # the migration runs between the two daemons, whatever became of Corral
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = {h for h, active in where_defined(hosts, name).items() if active}
        if len(running) == 1 and not migrating(host_of(hosts, next(iter(running))), name):
            break
        time.sleep(1)
    env.run("host", "list")  # the next command recovers the interrupted job
    (there,) = [h for h, active in where_defined(hosts, name).items() if active]
    assert record(env, name)["host"] == there
    assert where_defined(hosts, name) == {there: True}
    assert uptime_and_boot(host_of(hosts, there).uri, name)[1] == boot
    job = next(j for j in env.json("job", "list") if j["target"] == name
               and j["kind"] == "migrate-live")
    assert job["state"] in ("succeeded", "rolled-back")


def test_a_full_target_pool_rolls_a_cold_move_back(cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    h13, h14, _h15 = hosts
    name = env.name("full")
    env.run("vm", "create", name, "--image", "appliance", "--host", h14.name, "--wait",
            timeout=600)
    # some MiB of the machine's own, so that its disk does not fit where only a little is left
    run_in_guest(h14.uri, name, "dd if=/dev/urandom of=/root/fill bs=1M count=24 && sync "
                 "&& echo FILLED", "FILLED", timeout=300)
    env.run("vm", "stop", name, timeout=300)
    before = env.json("vm", "show", name)
    target_pool = env.root / h13.name / "pool"
    with small_filesystem_at(target_pool, h13, env, free_mib=8):
        failed = env.run("vm", "migrate", name, "--to", h13.name, check=False, timeout=600)
        assert failed.returncode != 0
        assert "full" in failed.stderr.lower() or "space" in failed.stderr.lower()
        assert not [p for p in target_pool.iterdir() if p.name.startswith(name)]
    assert env.json("vm", "show", name) == before
    assert where_defined(hosts, name) == {h14.name: False}
    env.run("vm", "start", name)
    assert run_in_guest(h14.uri, name, "ls /root/fill && echo STILL", "STILL", timeout=300)


@pytest.mark.parametrize("step", ["file.send:after", "domain.define-moved:after",
                                  "machine.move:after"])
def test_corral_killed_mid_cold_migration(cleanup: CorralEnv, pool: tuple, step: str) -> None:
    env, hosts = cleanup, pool[1]
    h13, h14, _h15 = hosts
    name = env.name("crash-" + step.split(":")[0].replace(".", "-"))
    env.run("vm", "create", name, "--image", "appliance", "--host", h14.name, "--no-start")
    killed = env.run("vm", "migrate", name, "--to", h13.name, check=False,
                     env={"CORRAL_FAILPOINT": step})
    assert killed.returncode == -signal.SIGKILL
    env.run("host", "list")  # recovery
    past_pivot = step == "machine.move:after"
    there = h13.name if past_pivot else h14.name
    assert record(env, name)["host"] == there
    assert where_defined(hosts, name) == {there: False}
    gone = env.root / (h14.name if past_pivot else h13.name)
    shown = env.json("vm", "show", name)
    assert Path(shown["disk_path"]).exists()
    if past_pivot:
        assert not list((env.root / "shared-pool").glob(f"{name}-*"))
    else:
        assert not list((gone / "pool").glob(f"{name}-*"))


# -- helpers ---------------------------------------------------------------------------


def popen(env: CorralEnv, *args: str, extra: dict[str, str] | None = None
          ) -> subprocess.Popen[str]:
    """``corral *args`` started in the background, to be killed half-way."""
    return subprocess.Popen([CORRAL, *args], env={**os.environ, **env.env, **(extra or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(env: CorralEnv, name: str, step: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in env.json("job", "list"):
            if job["target"] == name and job["state"] == "running":
                detail = env.json("job", "show", str(job["id"]))
                if any(s["name"] == step and s["state"] == "started" for s in detail["steps"]):
                    return
        time.sleep(0.3)
    raise AssertionError(f"{name}'s job never reached {step}")


def migrating(host: TestHost, name: str) -> bool:
    with connection(host.uri) as conn:
        try:
            return conn.lookupByName(name).jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
        except libvirt.libvirtError:
            return False


@contextmanager
def small_filesystem_at(pool: Path, host: TestHost, env: CorralEnv, free_mib: int
                        ) -> Iterator[None]:
    """A tmpfs over ``pool`` holding what it held plus ``free_mib`` MiB of room. The
    host's libvirtd restarts, so that its mount namespace sees the mount."""
    saved = pool.with_name("pool.saved")
    size = sum(p.stat().st_blocks * 512 for p in pool.iterdir()) + (free_mib << 20)
    size = (size + (1 << 20)) & ~((1 << 20) - 1)
    host.kill()
    pool.rename(saved)
    pool.mkdir(mode=0o755)
    mounted = False
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(pool)], check=True)
        mounted = True
        for p in saved.iterdir():
            subprocess.run(["cp", "-a", "--sparse=always", str(p), str(pool)], check=True)
        room = os.statvfs(pool)
        filler = room.f_bavail * room.f_frsize - (free_mib << 20)
        if filler > 0:  # whatever the copies took, exactly free_mib is left
            subprocess.run(["fallocate", "-l", str(filler), str(pool / ".filler")], check=True)
        host.start()
        env.run("host", "check")
        yield
    finally:
        host.kill()
        if mounted:
            subprocess.run(["umount", str(pool)], check=True)
        pool.rmdir()
        saved.rename(pool)
        host.start()
        env.run("host", "check")
