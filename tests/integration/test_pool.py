"""A pool of three real hosts: each a libvirtd of its own (tests/multihost.py), enrolled
over qemu+tcp, with the local host in maintenance. Real guests land where the
scheduler says; the claims in the store are checked against what libvirt reports."""

from __future__ import annotations

import math
import secrets
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import CorralError
from corral.images.appliance import ApplianceArtifacts
from corral.model import MachineSpec
from corral.ops import provision
from tests.integration.conftest import CorralEnv
from tests.libvirt_cleanup import remove_prefixed
from tests.multihost import TestHost, connection, start_hosts, stop_hosts
from tests.serving import import_appliance

FIRST_ADDRESS = 5  # 127.0.0.5-7: apart from the fixture test's 127.0.0.2-4
MIB = 1 << 20


@pytest.fixture(scope="module")
def pool(appliance: ApplianceArtifacts) -> Iterator[tuple[CorralEnv, list[TestHost]]]:
    prefix = f"cp{secrets.token_hex(3)}"
    root = Path("/var/tmp") / f"corral-test-{prefix}"
    root.mkdir(mode=0o755)
    env = CorralEnv(root=root, prefix=prefix)
    env.env = {f"CORRAL_{k.upper()}": str(v) for k, v in env.settings_kwargs.items()}
    env.env["CORRAL_CONFIG"] = str(root / "none.toml")
    hosts: list[TestHost] = []
    try:
        hosts = start_hosts(root, 3, first_address=FIRST_ADDRESS)
        import_appliance(env.settings(), appliance)
        for h in hosts:
            env.run("host", "add", h.name, h.uri, "--pool-path", str(root / h.name / "pool"),
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
    """The pool's env; every machine a test made is deleted after it, even on failure."""
    env, _hosts = pool
    try:
        yield env
    finally:
        for m in env.json("vm", "list"):
            env.run("vm", "delete", "--force", m["name"], check=False)


def domains_on(host: TestHost, prefix: str) -> dict[str, int]:
    """What libvirt on ``host`` says: domain name -> its memory in bytes."""
    with connection(host.uri) as conn:
        return {d.name(): d.maxMemory() * 1024 for d in conn.listAllDomains(0)
                if d.name().startswith(prefix)}


def placed(env: CorralEnv) -> dict[str, str]:
    return {m["name"]: m["host"] for m in env.json("vm", "list")}


def test_enrolment_probes_each_host(pool: tuple[CorralEnv, list[TestHost]]) -> None:
    env, hosts = pool
    listed = {h["name"]: h for h in env.json("host", "list")}
    assert listed["local"]["state"] == "maintenance"
    for h in hosts:
        row = listed[h.name]
        assert row["state"] == "up" and row["uri"] == h.uri
        assert row["hostname"] == h.name  # the host's own answer, from its own libvirtd
        assert row["cpus"] >= 1 and row["memory_bytes"] > 1 << 30
        assert row["pool_bytes"] > 0
        # the appliance booted on that host and timed its fixed sha256 work
        assert row["cpu_score"] is not None and row["cpu_score"] > 0


def test_anti_affinity_spreads_real_guests_and_refuses_a_fourth(cleanup: CorralEnv,
                                                                pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    env.run("vm", "create", env.name("web"), "--image", "appliance", "--count", "3",
            "--anti-affinity", "web", "--wait", timeout=600)
    where = placed(env)
    assert sorted(where.values()) == sorted(h.name for h in hosts)  # one per host
    for h in hosts:
        running = domains_on(h, env.prefix)
        (name,) = running
        assert where[name] == h.name
        with connection(h.uri) as conn:
            assert conn.lookupByName(name).isActive()
    # the base went to each host once; the guests are linked clones of that copy
    for m in env.json("vm", "list"):
        assert m["shared_bytes"] > MIB

    refused = env.run("vm", "create", env.name("web-4"), "--image", "appliance", "--group",
                      "web", "--no-start", check=False)
    assert refused.returncode == 4
    message = " ".join(refused.stderr.split())
    assert (f"No host can take '{env.name('web-4')}' (1 vCPU, 256.0 MiB memory, "
            "6.4 MiB disk): of 4 hosts, 1 is in maintenance and 3 already run a machine "
            "of group 'web'.") in message
    assert env.name("web-4") not in placed(env)


def test_spread_follows_free_memory_and_tags_pin(cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    h5, h6, h7 = (h.name for h in hosts)
    env.run("vm", "create", env.name("big"), "--image", "appliance", "--memory", "2G",
            "--host", h5, "--no-start")
    env.run("vm", "create", env.name("mid"), "--image", "appliance", "--memory", "1G",
            "--host", h6, "--no-start")
    # spread: the most free memory wins, so the next goes to the empty host
    plan = env.run("vm", "create", env.name("next"), "--image", "appliance", "--dry-run")
    assert h7 in plan.stdout and env.name("next") not in placed(env)
    env.run("vm", "create", env.name("next"), "--image", "appliance", "--no-start")
    assert placed(env)[env.name("next")] == h7

    env.run("host", "set", h5, "--tag", "ssd")
    try:
        env.run("vm", "create", env.name("fast-disk"), "--image", "appliance", "--tag", "ssd",
                "--no-start")
        assert placed(env)[env.name("fast-disk")] == h5  # the fullest, but the only ssd
        refused = env.run("vm", "create", env.name("gpu"), "--image", "appliance", "--tag",
                          "gpu", "--no-start", check=False)
        assert refused.returncode == 4
        assert "3 lack tag 'gpu'" in " ".join(refused.stderr.split())
    finally:
        env.run("host", "set", h5)


def test_capacity_limits_hold_and_are_explained(cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    names = [h.name for h in hosts]
    limited = names[0]
    host_memory = env.json("host", "show", limited)["memory_bytes"]
    # 300 MiB of memory may be claimed on the first host: one 256 MiB machine fits
    ratio = f"{(300 * MIB) / host_memory:.6f}"
    env.run("host", "set", limited, "--memory-ratio", ratio)
    try:
        env.run("vm", "create", env.name("a"), "--image", "appliance", "--host", limited,
                "--no-start")
        refused = env.run("vm", "create", env.name("b"), "--image", "appliance", "--host",
                          limited, "--no-start", check=False)
        assert refused.returncode == 4
        assert "1 lacks memory" in " ".join(refused.stderr.split())
        explained = env.run("placement", "explain", env.name("b"), "--image", "appliance")
        lines = explained.stdout.splitlines()
        row = next(line for line in lines if line.startswith(limited))
        assert "refused" in row and "capacity: memory" in row
        assert sum("fits" in line for line in lines) == 2
    finally:
        env.run("host", "set", limited)


def test_a_host_whose_libvirtd_stops_is_marked_down_and_excluded(cleanup: CorralEnv,
                                                                  pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    victim = hosts[2]
    victim.kill()
    try:
        checked = env.run("host", "check")
        assert f"{victim.name}: up → down" in checked.stdout
        listed = {h["name"]: h for h in env.json("host", "list")}
        assert listed[victim.name]["state"] == "down"
        env.run("vm", "create", env.name("d"), "--image", "appliance", "--count", "4",
                "--no-start")
        assert victim.name not in placed(env).values()
        explained = env.run("placement", "explain", env.name("e"), "--image", "appliance")
        row = next(x for x in explained.stdout.splitlines() if x.startswith(victim.name))
        assert "state: down" in row
        # reconciliation checks the hosts that answer and names the one that does not
        assert {"name": victim.name, "status": "unreachable"} in env.json("sync")
    finally:
        victim.start()
        env.run("host", "check")
    assert {h["name"]: h for h in env.json("host", "list")}[victim.name]["state"] == "up"


def test_fifty_concurrent_creates_never_overcommit(cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    host_memory = {h["name"]: h["memory_bytes"] for h in env.json("host", "list")}
    # each host may hold 1 GiB of claims: four 256 MiB machines, twelve in the pool (the
    # ratio rounded up: rounded down, capacity × ratio falls a few bytes short of 1 GiB)
    for h in hosts:
        ratio = math.ceil((1 << 30) / host_memory[h.name] * 1e9) / 1e9
        env.run("host", "set", h.name, "--memory-ratio", f"{ratio:.9f}")
    outcomes: dict[str, str] = {}
    lock = threading.Lock()
    start = threading.Barrier(10)

    def worker(k: int) -> None:
        start.wait()
        with env.context() as ctx:
            for i in range(k, 50, 10):
                name = env.name(f"c{i}")
                spec = MachineSpec(name=name, image="appliance", start=False)
                try:
                    result = provision.create_machines(ctx, spec)
                    failed = list(result.failed.values())
                    outcome = f"failed: {failed[0]}" if failed else "created"
                except CorralError as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes[name] = outcome

    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        counts = Counter(outcomes.values())
        assert len(outcomes) == 50
        assert counts["created"] == 12, counts
        assert set(counts) <= {"created", "NoValidHost"}, counts
        where = placed(env)
        for h in hosts:
            real = domains_on(h, env.prefix)
            assert len(real) == 4
            assert sum(real.values()) <= 1 << 30  # what libvirt holds, not just the store
            assert sorted(real) == sorted(n for n, host in where.items() if host == h.name)
            claimed = env.json("host", "show", h.name)["claimed"]
            assert claimed["memory_bytes"] == sum(real.values())
    finally:
        for h in hosts:
            env.run("host", "set", h.name)


def test_a_host_with_machines_cannot_be_removed(cleanup: CorralEnv, pool: tuple) -> None:
    env, hosts = cleanup, pool[1]
    env.run("vm", "create", env.name("keep"), "--image", "appliance", "--host", hosts[0].name,
            "--no-start")
    refused = env.run("host", "remove", hosts[0].name, check=False)
    assert refused.returncode == 4
    assert f"Host '{hosts[0].name}' still holds machines: {env.name('keep')}." in " ".join(
        refused.stderr.split())
    assert hosts[0].name in {h["name"] for h in env.json("host", "list")}


def test_concurrent_requests_for_an_image_wait_for_one_transfer(
    pool: tuple[CorralEnv, list[TestHost]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four processes' worth of requests (own Context each) for a base a host lacks: one
    copy is sent, the others wait for it; an abandoned copy is taken over and finished."""
    from corral.images import transfer
    from corral.ops import distribute

    env, hosts = pool
    target = hosts[1].name
    sent: list[str] = []
    real_send = transfer.send_file

    def counting(source: Path, *args: object, **kwargs: object) -> None:
        sent.append(source.name)
        real_send(source, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(distribute, "send_file", counting)
    with env.context() as ctx:
        image = ctx.store.get_image("appliance")
        handle = ctx.on(target)
        where = distribute.remote_paths(handle, image)
        # forget the copy: the host must receive it again
        ctx.store.drop_host_image(target, "appliance")
        handle.storage.delete(Path(where.base))

    contexts = [env.context() for _ in range(4)]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def ensure(ctx: object) -> None:
        try:
            barrier.wait()
            distribute.ensure_image(ctx, ctx.on(target), image)  # type: ignore[attr-defined]
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=ensure, args=(c,)) for c in contexts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        for c in contexts:
            c.close()
    assert not errors
    assert sent.count(Path(image.path).name) == 1  # the base crossed once
    with env.context() as ctx:
        assert transfer.transfer_complete(ctx.on(target).storage, Path(where.base))
        row = ctx.store.host_image(target, "appliance")
        assert row is not None and row.state == "present" and row.owner is None

        # a copier that died mid-way: its row says "copying" and its lock is free
        ctx.store.drop_host_image(target, "appliance")
        ctx.store.take_host_image(target, "appliance", where.base, "job-1-dead.lock",
                                  unless_owner=lambda o: True)
        sent.clear()
        distribute.ensure_image(ctx, ctx.on(target), image)
        assert Path(image.path).name in sent  # taken over (it verifies, so nothing moves)
        assert ctx.store.host_image(target, "appliance").state == "present"  # type: ignore[union-attr]


def test_fast_machines_go_to_the_best_single_thread_and_pack_fills_one_host(
    cleanup: CorralEnv, pool: tuple
) -> None:
    env, hosts = cleanup, pool[1]
    scores = {h["name"]: h["cpu_score"] for h in env.json("host", "list")
              if h["name"] in {x.name for x in hosts}}
    env.run("vm", "create", env.name("quick"), "--image", "appliance", "--fast", "--no-start")
    assert scores[placed(env)[env.name("quick")]] == max(scores.values())

    # pack: each machine goes where the least memory is left that still fits
    for i in range(3):
        env.run("vm", "create", env.name(f"p{i}"), "--image", "appliance", "--no-start",
                env={"CORRAL_PLACEMENT": "pack"})
    where = placed(env)
    assert len({where[env.name(f"p{i}")] for i in range(3)}) == 1
    assert where[env.name("p0")] == where[env.name("quick")]  # already the fullest
