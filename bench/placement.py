"""Placement: decisions per second with their claims, against a pure-Python loop; and packing.

Synthetic pools (fixed seeds): 1,000 hosts holding 10,000 machines, and 10,000 hosts
holding 100,000; mixed host sizes, some tags, images and placement groups, a few hosts
down or in maintenance. Each decision is ``Scheduler.place`` then ``Inventory.claim``
(and ``claim_write``, when given: e.g. the store's write of the claim). The baseline
is the same filters and the spread weigher as a plain loop over ``HostView`` objects,
timed in the same process on the same requests. Packing: traces of machines of mixed
sizes, placed in pack mode on identical 256 GiB hosts one at a time (online) and as one batch
(largest first), against first-fit-decreasing on the same trace.
"""

from __future__ import annotations

import math
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from corral.errors import InsufficientResources
from corral.model import (
    Accelerator,
    CloneMode,
    Host,
    HostFacts,
    HostPlacement,
    Identity,
    Machine,
    RecordState,
    Step,
    StepState,
)
from corral.model.states import GroupPolicy, HostState
from corral.scheduler import (
    HostView,
    Inventory,
    NoValidHost,
    Overcommit,
    Request,
    Resources,
    Scheduler,
    Weighting,
)
from corral.store import Store
from corral.store.repository import ClaimedJob

GiB = 1 << 30
TiB = 1 << 40
IMAGES = ("debian-12", "ubuntu-24.04", "rocky-9", "alpine-3.20")
FLAVOURS = (  # (vCPUs, memory GiB, disk GiB), weight
    ((1, 1, 10), 20), ((2, 4, 20), 30), ((4, 8, 40), 25), ((8, 16, 80), 15),
    ((16, 64, 200), 8), ((32, 128, 400), 2),
)


def _row(label: str, value: str, note: str = "") -> None:
    # bench._env's format, without its libvirt imports: this bench is pure
    print(f"  {label:<52} {value:>14}  {note}")


def synthetic_hosts(n: int, seed: int = 1) -> list[HostView]:
    rng = random.Random(seed)
    hosts = []
    for i in range(n):
        roll = rng.random()
        state = (HostState.DOWN if roll < 0.01 else
                 HostState.MAINTENANCE if roll < 0.02 else HostState.UP)
        tags = {t for t, p in (("ssd", 0.5), ("gpu", 0.05), ("rack-a", 0.25)) if rng.random() < p}
        hosts.append(HostView(
            name=f"host-{i:05d}",
            capacity=Resources(rng.choice((32, 64, 128)), rng.choice((128, 256, 512, 1024)) * GiB,
                               rng.choice((2, 4, 8)) * TiB),
            state=state,
            accelerator="tcg" if rng.random() < 0.01 else "kvm",
            ratios=Overcommit(cpu=4.0, memory=rng.choice((1.0, 1.0, 1.5)), disk=1.0),
            tags=frozenset(tags),
            cpu_score=None if rng.random() < 0.1 else round(rng.uniform(1.0, 3.0), 2),
            images=frozenset(img for img in IMAGES if rng.random() < 0.3),
        ))
    return hosts


def synthetic_requests(n: int, prefix: str, seed: int = 2) -> list[Request]:
    rng = random.Random(seed)
    flavours = [f for f, _ in FLAVOURS]
    weights = [w for _, w in FLAVOURS]
    reqs = []
    for k in range(n):
        cpus, memory, disk = rng.choices(flavours, weights)[0]
        grouped = rng.random() < 0.1
        reqs.append(Request(
            name=f"{prefix}-{k}",
            needs=Resources(cpus, memory * GiB, disk * GiB),
            image=rng.choice((*IMAGES, None)),
            tags=frozenset({"ssd"}) if rng.random() < 0.2 else frozenset(),
            group=f"{prefix}-g{k // 3}" if grouped else None,
            policy=GroupPolicy.ANTI_AFFINITY if grouped else None,
            hard=rng.random() < 0.8,
            fast=rng.random() < 0.05,
        ))
    return reqs


def populate(inv: Inventory, machines: int, seed: int = 3) -> int:
    """Claim ``machines`` synthetic machines on random hosts that are up; returns how many
    found room within ten tries."""
    rng = random.Random(seed)
    up = [inv.names[i] for i in range(len(inv)) if inv.up[i]]
    placed = 0
    for req in synthetic_requests(machines, "old", seed):
        for _ in range(10):
            try:
                inv.claim(rng.choice(up), req)
            except InsufficientResources:
                continue
            placed += 1
            break
    return placed


@dataclass(frozen=True, slots=True)
class LoopResult:
    latencies: list[float]
    """Seconds per decision, placed or refused."""
    placed: int
    refused: int
    elapsed: float

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.elapsed

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def decide_and_claim_loop(
    inv: Inventory,
    scheduler: Scheduler,
    requests: Sequence[Request],
    claim_write: Callable[[str, Request], object] | None = None,
) -> LoopResult:
    """Place and claim each request in turn; ``claim_write(host, request)`` runs after
    each in-memory claim and is timed with it. A refusal (NoValidHost) counts as a
    decision too."""
    latencies = []
    placed = refused = 0
    clock = time.perf_counter
    began = clock()
    for req in requests:
        start = clock()
        try:
            host = scheduler.place(inv, req).host
        except NoValidHost:
            refused += 1
        else:
            inv.claim(host, req)
            if claim_write is not None:
                claim_write(host, req)
            placed += 1
        latencies.append(clock() - start)
    return LoopResult(latencies, placed, refused, clock() - began)


def naive_place(hosts: list[HostView], req: Request) -> int | None:
    """The same filters and the spread weigher, host by host in plain Python."""
    best, best_free = None, -1
    needs = req.needs
    for k, h in enumerate(hosts):
        if h.state is not HostState.UP:
            continue
        if req.arch is not None and h.arch != req.arch:
            continue
        if req.accelerator is not None and h.accelerator != req.accelerator:
            continue
        if not req.tags <= h.tags:
            continue
        cap, r, used = h.capacity, h.ratios, h.used
        if needs.cpus and int(cap.cpus * r.cpu) - used.cpus < needs.cpus:
            continue
        free_memory = math.floor(cap.memory_bytes * r.memory) - used.memory_bytes
        if needs.memory_bytes and free_memory < needs.memory_bytes:
            continue
        free_disk = math.floor(cap.disk_bytes * r.disk) - used.disk_bytes
        if needs.disk_bytes and free_disk < needs.disk_bytes:
            continue
        if req.group is not None and req.hard and req.policy is not None:
            count = h.groups.get(req.group, 0)
            if req.policy is GroupPolicy.ANTI_AFFINITY and count:
                continue
        if free_memory > best_free:  # strict: the first name wins ties
            best, best_free = k, free_memory
    return best


def naive_loop(
    hosts: list[HostView], requests: Sequence[Request]
) -> tuple[list[float], list[str | None]]:
    latencies: list[float] = []
    chosen: list[str | None] = []
    clock = time.perf_counter
    for req in requests:
        start = clock()
        k = naive_place(hosts, req)
        if k is not None:
            h = hosts[k]
            groups = dict(h.groups)
            if req.group is not None:
                groups[req.group] = groups.get(req.group, 0) + 1
            hosts[k] = replace(h, used=h.used + req.needs, groups=groups)
        latencies.append(clock() - start)
        chosen.append(None if k is None else hosts[k].name)
    return latencies, chosen


def _decisions(hosts_n: int, machines: int, decisions: int, baseline_n: int,
               goal: str) -> None:
    began = time.perf_counter()
    inv = Inventory(synthetic_hosts(hosts_n))
    held = populate(inv, machines)
    setup = time.perf_counter() - began
    scheduler = Scheduler()
    requests = synthetic_requests(decisions, "new")
    label = f"{hosts_n:,} hosts"
    _row(f"{label}: inventory of {held:,} machines built", f"{setup:.2f} s")
    result = decide_and_claim_loop(inv.copy(), scheduler, requests)
    _row(f"{label}: place + claim", f"{result.per_second:,.0f} /s",
         f"median {result.quantile_ms(0.5):.3f} ms, p99 {result.quantile_ms(0.99):.3f} ms,"
         f" {result.refused} refused  ({goal})")

    # the baseline: plain requests (no image, not fast, hard groups), so that both rank by
    # free memory alone and must agree host for host
    plain = [replace(r, image=None, fast=False, hard=True) for r in requests[:baseline_n]]
    ours = decide_and_claim_loop(inv.copy(), scheduler, plain)
    mine_inv = inv.copy()
    mine = []
    for req in plain:
        try:
            host: str | None = scheduler.place(mine_inv, req).host
        except NoValidHost:
            host = None
        if host is not None:
            mine_inv.claim(host, req)
        mine.append(host)
    theirs_lat, theirs = naive_loop(inv.views(), plain)
    agree = sum(a == b for a, b in zip(mine, theirs, strict=True))
    ours_ms = statistics.median(ours.latencies) * 1000
    naive_ms = statistics.median(theirs_lat) * 1000
    _row(f"{label}: pure-Python loop, same filters", f"{naive_ms:.3f} ms",
         f"numpy {ours_ms:.3f} ms median: {naive_ms / ours_ms:.0f}× faster;"
         f" same host {agree}/{len(plain)}")


TRACES = {  # name: (memory sizes in GiB, weights)
    "1-128 GiB": ((1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128),
                  (10, 14, 6, 14, 6, 12, 5, 10, 4, 7, 3, 5, 2, 2)),
    "16-160 GiB": ((16, 24, 32, 48, 64, 96, 128, 160), (5, 5, 5, 5, 5, 4, 3, 2)),
}


def synthetic_trace(n: int, sizes: Sequence[int], weights: Sequence[int],
                    seed: int = 7) -> list[Request]:
    rng = random.Random(seed)
    reqs = []
    for k in range(n):
        memory = rng.choices(sizes, weights)[0]
        reqs.append(Request(f"t{k}", Resources(max(1, memory // 4), memory * GiB,
                                               rng.choice((10, 20, 40, 80)) * GiB)))
    return reqs


HOST_CAPACITY = Resources(64, 256 * GiB, 16 * TiB)


def _identical(n: int) -> Inventory:
    return Inventory(HostView(f"bin-{i:04d}", HOST_CAPACITY) for i in range(n))


def _hosts_used(inv: Inventory) -> int:
    return int((inv.used[1] > 0).sum())


def first_fit_decreasing(reqs: Sequence[Request], capacity: Resources,
                         ratios: Overcommit) -> int:
    limit = (int(capacity.cpus * ratios.cpu), int(capacity.memory_bytes * ratios.memory),
             int(capacity.disk_bytes * ratios.disk))
    bins: list[list[int]] = []
    for req in sorted(reqs, key=lambda r: -r.needs.memory_bytes):
        wants = (req.needs.cpus, req.needs.memory_bytes, req.needs.disk_bytes)
        for free in bins:
            if all(w <= f for w, f in zip(wants, free, strict=True)):
                for d in range(3):
                    free[d] -= wants[d]
                break
        else:
            bins.append([limit[d] - wants[d] for d in range(3)])
    return len(bins)


def _packing(n: int, trace_name: str) -> None:
    trace = synthetic_trace(n, *TRACES[trace_name])
    total = sum(r.needs.memory_bytes for r in trace)
    lower = math.ceil(total / HOST_CAPACITY.memory_bytes)
    room = lower * 2
    pack = Scheduler(weighting=Weighting(mode="pack"))
    ffd = first_fit_decreasing(trace, HOST_CAPACITY, Overcommit())
    online_inv = _identical(room)
    began = time.perf_counter()
    decide_and_claim_loop(online_inv, pack, trace)
    online_s = time.perf_counter() - began
    online = _hosts_used(online_inv)
    batch_inv = _identical(room)
    began = time.perf_counter()
    pack.place_batch(batch_inv, trace)
    batch_s = time.perf_counter() - began
    batch = _hosts_used(batch_inv)
    label = f"pack {n:,} × {trace_name}"
    _row(f"{label}: first-fit-decreasing", f"{ffd} hosts", f"(memory lower bound {lower})")
    _row(f"{label}: online, arrival order", f"{online} hosts",
         f"{online / ffd:.3f}× FFD in {online_s:.2f} s (goal ≤ 1.05)")
    _row(f"{label}: one batch, largest first", f"{batch} hosts",
         f"{batch / ffd:.3f}× FFD in {batch_s:.2f} s (goal ≤ 1.05)")


def _store_claims(hosts_n: int, machines: int, decisions: int, goal: str) -> None:
    """The same decisions, each claim written to a real SQLite store (WAL,
    synchronous=FULL) by ``Store.create_claimed_jobs``, the call ``vm create`` makes;
    baseline: the same statements issued by the stdlib's sqlite3, one commit each."""
    root = Path(tempfile.mkdtemp(prefix="corral-bench-placement-", dir="/var/tmp"))
    try:
        store = Store(f"sqlite:///{root / 'corral.db'}")
        views = synthetic_hosts(hosts_n)
        inv = Inventory(views)
        _fill_store(store, views, inv, machines)
        scheduler = Scheduler()
        overcommit = Overcommit()
        steps = [Step("machine.record", StepState.DONE, {})]

        def write(host: str, req: Request) -> None:
            store.create_claimed_jobs(
                [ClaimedJob("provision", _machine(req.name, host, req), steps)], "bench",
                overcommit)

        result = decide_and_claim_loop(inv, scheduler, synthetic_requests(decisions, "new"),
                                       write)
        _row(f"{hosts_n:,} hosts: place + claim in the store", f"{result.per_second:,.0f} /s",
             f"median {result.quantile_ms(0.5):.3f} ms, p99 {result.quantile_ms(0.99):.3f} ms"
             f"  ({goal})")
        batched = _batched_claims(store, inv, scheduler, synthetic_requests(decisions, "bat"))
        _row(f"{hosts_n:,} hosts: batches of 10 (vm create --count 10)", f"{batched:,.0f} /s",
             "decisions per second, one commit per batch")
        store.close()
        raw = _raw_claims(root / "corral.db", [v.name for v in views if v.state is
                                               HostState.UP], decisions)
        _row("  baseline: the same claim transaction in sqlite3", f"{raw:,.0f} /s",
             f"Corral is {result.per_second / raw:.2f}× of it")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _batched_claims(store: Store, inv: Inventory, scheduler: Scheduler,
                    requests: Sequence[Request]) -> float:
    steps = [Step("machine.record", StepState.DONE, {})]
    began = time.perf_counter()
    done = 0
    for k in range(0, len(requests), 10):
        batch = requests[k:k + 10]
        try:
            placed = scheduler.place_batch(inv, batch)
        except NoValidHost:
            continue
        store.create_claimed_jobs(
            [ClaimedJob("provision", _machine(r.name, p.host, r), steps)
             for r, p in zip(batch, placed, strict=True)], "bench", Overcommit())
        done += len(batch)
    return done / (time.perf_counter() - began)


def _machine(name: str, host: str, req: Request) -> Machine:
    uid = uuid.uuid4()
    return Machine(
        name=name, identity=Identity(str(uid), None, name, f"i-{uid.hex[:12]}"), host=host,
        image=None, cpus=req.needs.cpus, memory_bytes=req.needs.memory_bytes,
        clone=CloneMode.LINKED, disk_path=f"/pool/{name}.qcow2", seed_path=None,
        record_state=RecordState.PROVISIONING, managed=True, created_at=datetime.now(UTC),
        disk_claim=req.needs.disk_bytes,
    )


def _fill_store(store: Store, views: list[HostView], inv: Inventory, machines: int) -> None:
    """Hosts as enrolled, and ``machines`` machines claimed on them (in batches)."""
    for v in views:
        facts = HostFacts(v.name, v.arch, "x", v.capacity.cpus, v.capacity.memory_bytes,
                          "QEMU", "9")
        store.put_host(Host(v.name, f"qemu+tls://{v.name}/system", facts, Accelerator(
            v.accelerator), "", "corral", "/pool", disk_bytes=v.capacity.disk_bytes,
            state=v.state, placement=HostPlacement(tags=v.tags)))
        if v.ratios.memory != 1.0:
            store.set_host_placement(v.name, HostPlacement(v.tags,
                                                           memory_ratio=v.ratios.memory))
    rng = random.Random(3)
    up = [inv.names[i] for i in range(len(inv)) if inv.up[i]]
    steps = [Step("machine.record", StepState.DONE, {})]
    batch: list[ClaimedJob] = []
    for req in synthetic_requests(machines, "old", 3):
        for _ in range(10):
            host = rng.choice(up)
            try:
                inv.claim(host, req)
            except InsufficientResources:
                continue
            batch.append(ClaimedJob("provision", _machine(req.name, host, req), steps))
            break
        if len(batch) == 500:
            store.create_claimed_jobs(batch, "bench", Overcommit())
            batch = []
    store.create_claimed_jobs(batch, "bench", Overcommit())


def _raw_claims(db: Path, hosts: Sequence[str], n: int) -> float:
    """The same claim transaction in the stdlib's sqlite3, on the same tables: lock,
    read the host, sum its claims, read the quota, insert machine, job and step."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    began = time.perf_counter()
    for k in range(n):
        host = hosts[k % len(hosts)]
        uid = uuid.uuid4()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("SELECT facts, disk_bytes, cpu_ratio, memory_ratio, disk_ratio FROM hosts "
                     "WHERE name = ?", (host,)).fetchone()
        conn.execute("SELECT count(*), coalesce(sum(cpus), 0), coalesce(sum(memory_bytes), 0),"
                     " coalesce(sum(disk_claim), 0) FROM machines WHERE host = ?",
                     (host,)).fetchone()
        conn.execute("SELECT quota_machines, quota_cpus, quota_memory_bytes, quota_disk_bytes "
                     "FROM projects WHERE name = 'default'").fetchone()
        conn.execute(
            "INSERT INTO machines (name, uuid, mac, hostname, instance_id, host, image, cpus, "
            "memory_bytes, clone_mode, disk_path, seed_path, record_state, managed, ssh_keys, "
            "created_at, project, disk_bytes, disk_claim, placement, placement_group) VALUES "
            "(?, ?, NULL, ?, ?, ?, NULL, 2, ?, 'linked', ?, NULL, 'provisioning', 1, '[]', ?, "
            "'default', NULL, ?, '{}', NULL)",
            (f"raw-{k}", str(uid), f"raw-{k}", f"i-{uid.hex[:12]}", host, 4 * GiB,
             f"/pool/raw-{k}.qcow2", datetime.now(UTC).isoformat(" "), 40 * GiB))
        job = conn.execute(
            "INSERT INTO jobs (kind, target, state, owner, created_at, project) VALUES "
            "('provision', ?, 'pending', 'bench', ?, 'default') RETURNING id",
            (f"raw-{k}", datetime.now(UTC).isoformat(" "))).fetchone()[0]
        conn.execute("INSERT INTO job_steps (job_id, position, name, state, args) VALUES "
                     "(?, 0, 'machine.record', 'done', '{}')", (job,))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    return n / elapsed


def run() -> None:
    _decisions(1_000, 10_000, 5_000, 300, "goal ≥ 5,000/s, p99 ≤ 5 ms")
    _store_claims(1_000, 10_000, 2_000, "goal ≥ 5,000/s, p99 ≤ 5 ms")
    _decisions(10_000, 100_000, 2_000, 40, "goal ≥ 1,000/s")
    for trace_name in TRACES:
        _packing(3_000, trace_name)


if __name__ == "__main__":
    run()
