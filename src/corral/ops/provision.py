"""Provisioning: machines from library images, each with an identity of its own."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from corral.errors import (
    Conflict,
    CorralError,
    GuestTimeout,
    InsufficientResources,
    InvalidInput,
    NotFound,
)
from corral.identity import allocate_macs, batch_names, new_identity
from corral.model import (
    CloneMode,
    Image,
    Job,
    Machine,
    MachineSpec,
    PlacementHints,
    PowerState,
    Step,
    StepState,
    Usage,
)
from corral.model.units import format_size
from corral.ops import lifecycle
from corral.ops import steps as _steps  # noqa: F401  (registers the step kinds)
from corral.ops.console import ReadyReport, read_ready
from corral.ops.context import Context, HostHandle
from corral.ops.distribute import image_on
from corral.ops.hosts import local_host
from corral.ops.jobs import PlannedStep, Recovery, check_steps, execute_job, job_kind
from corral.ops.machines import disk_claim, machine_args, new_machine
from corral.ops.pools import base_path, get_pool
from corral.ops.usage import require_quota
from corral.storage.base import FULL_CLONE, LINKED_CLONE
from corral.store.repository import ClaimedJob, ClaimRefused

if TYPE_CHECKING:
    from corral.scheduler import Explanation, Placement, Request

log = logging.getLogger(__name__)
PROVISION = job_kind("provision", Recovery.ROLL_BACK)
MIN_MEMORY = 64 << 20
CLAIM_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class BatchResult:
    created: list[Machine]
    failed: dict[str, CorralError]


def create_machines(ctx: Context, spec: MachineSpec, count: int = 1) -> BatchResult:
    """Validate the whole batch, then provision each machine as a job of its own.

    Nothing is created when the request is invalid. A machine whose job fails is rolled
    back; the others stay, and the result says which failed and why.
    """
    return provision(ctx, plan_machines(ctx, spec, count), start=spec.start)


def plan_machines(ctx: Context, spec: MachineSpec, count: int = 1) -> list[Job]:
    """Check the batch, place it, claim it and write one pending job per machine.

    Everything that can be refused is refused here, before a job exists; the API calls
    this in the request and answers 202 with the jobs. The batch is placed as a whole
    (anti-affinity and capacity hold across it) and claimed in one transaction; if
    another request filled a host in between, the batch is placed again.
    """
    from corral.ops import placement  # numpy: loaded only to place

    batch = _batch(ctx, spec, count)
    sched = placement.scheduler(ctx)
    for _attempt in range(CLAIM_ATTEMPTS):
        inv = placement.inventory(ctx, only=batch.hints.host)
        chosen = sched.place_batch(inv, batch.requests, claim=False)
        claimed = [
            _claimed_job(ctx, batch, name, mac, ctx.on(p.host))
            for name, mac, p in zip(batch.names, batch.macs, chosen, strict=True)
        ]
        try:
            return ctx.store.create_claimed_jobs(claimed, ctx.owner, ctx.overcommit)
        except ClaimRefused:
            log.info("a host filled up while %s was placed; placing it again", spec.name)
    raise InsufficientResources(
        f"The hosts kept filling up while '{spec.name}' was being placed.",
        hint="Try again; other requests are taking the room.",
    )


def plan_placement(ctx: Context, spec: MachineSpec, count: int = 1) -> list[Placement]:
    """Where the batch would go, and with which scores: ``vm create --dry-run``."""
    from corral.ops import placement

    batch = _batch(ctx, spec, count, dry_run=True)
    inv = placement.inventory(ctx, only=batch.hints.host)
    return placement.scheduler(ctx).place_batch(inv, batch.requests, claim=False)


def explain_placement(ctx: Context, spec: MachineSpec) -> Explanation:
    """Every host's verdict for one machine of ``spec``: ``corral placement explain``."""
    from corral.ops import placement

    batch = _batch(ctx, spec, 1, dry_run=True)
    inv = placement.inventory(ctx, only=batch.hints.host)
    return placement.scheduler(ctx).explain(inv, batch.requests[0])


@dataclass(frozen=True, slots=True)
class _Batch:
    spec: MachineSpec
    image: Image
    hints: PlacementHints
    names: list[str]
    macs: list[str]
    disk_bytes: int
    disk_claim: int
    requests: list[Request]


def _batch(ctx: Context, spec: MachineSpec, count: int, *, dry_run: bool = False) -> _Batch:
    from corral.ops import placement
    names = batch_names(spec.name, count)
    local_host(ctx)
    if spec.pool is not None:
        spec = _pinned_to_pool(ctx, spec)
    image = ctx.store.get_image(spec.image)
    if image.project not in (None, spec.project):
        raise NotFound("image", spec.image)
    disk_bytes = spec.disk_bytes or image.virtual_size
    _check_sizes(spec, disk_bytes, image.virtual_size)
    hints = placement.group_hints(ctx, spec.placement)
    claim = disk_claim(ctx, spec.clone, disk_bytes)
    require_quota(ctx, spec.project, Usage.of(count, spec.cpus, spec.memory_bytes, claim))
    taken = ctx.store.taken(names=names) | (set(names) & ctx.driver.domain_names())
    if taken:
        raise Conflict(
            f"A machine named {_quote(sorted(taken))} already exists.",
            hint="Choose another name, or delete the old machine first.",
        )
    macs = [] if dry_run else allocate_macs(count, lambda c: ctx.store.taken(macs=c))
    spec = replace(spec, placement=hints)
    requests = [placement.request(name, spec, image, claim) for name in names]
    return _Batch(spec, image, hints, names, macs, disk_bytes, claim, requests)


def _pinned_to_pool(ctx: Context, spec: MachineSpec) -> MachineSpec:
    """An added pool is one host's: the machines go there, or nowhere."""
    pool = get_pool(ctx, spec.pool or "")
    wanted = spec.placement.host
    if wanted is not None and wanted != pool.host:
        raise InvalidInput(f"Storage pool '{pool.name}' is on host '{pool.host}', not "
                           f"'{wanted}'; drop --host or choose a pool of that host.")
    return replace(spec, placement=replace(spec.placement, host=pool.host))


def _claimed_job(ctx: Context, batch: _Batch, name: str, mac: str,
                 handle: HostHandle) -> ClaimedJob:
    spec, image = batch.spec, batch.image
    volumes = handle.storage if spec.pool is None else ctx.disk_storage(handle.host.name,
                                                                         spec.pool)
    wanted = LINKED_CLONE if spec.clone is CloneMode.LINKED else FULL_CLONE
    if wanted not in volumes.capabilities:
        where = f"Storage pool '{spec.pool}'" if spec.pool else (
            f"Host '{handle.host.name}''s storage")
        raise InvalidInput(f"{where} cannot make a {spec.clone} clone.")
    m = new_machine(
        handle,
        new_identity(name, mac),
        image=image.name,
        cpus=spec.cpus,
        memory_bytes=spec.memory_bytes,
        clone=spec.clone,
        ssh_keys=spec.ssh_keys,
        project=spec.project,
        disk_bytes=batch.disk_bytes,
        disk_claim=batch.disk_claim,
        placement=batch.hints,
        pool=None if spec.pool is None else (spec.pool, volumes),
    )
    args = machine_args(m)
    on = {"host": m.host}
    if spec.pool is None:
        base = image_on(handle, image).base
    else:
        base = str(base_path(ctx, get_pool(ctx, spec.pool), image))
    plan = [
        PlannedStep("machine.record", args),
        PlannedStep("image.ensure", {**on, "image": image.name, "pool": spec.pool}),
        PlannedStep(
            "disk.clone",
            {**on, "path": m.disk_path, "base": base, "size": batch.disk_bytes,
             "mode": spec.clone.value, "pool": spec.pool},
        ),
        PlannedStep(
            "seed.write",
            {**on, "path": m.seed_path, "identity": args["identity"],
             "ssh_keys": args["ssh_keys"]},
        ),
        PlannedStep("domain.define", {**on, "name": m.name, "uuid": m.identity.uuid}),
        PlannedStep("machine.ready", {"name": m.name}),
    ]
    # The record is written with the job: it is the claim (see create_claimed_jobs).
    steps = [Step(st.name, StepState.DONE if i == 0 else StepState.PENDING, st.args)
             for i, st in enumerate(plan)]
    check_steps(plan)
    return ClaimedJob(PROVISION.name, m, steps)


def provision(ctx: Context, jobs: list[Job], *, start: bool) -> BatchResult:
    """Run the jobs of ``plan_machines``, then start the machines in turn if asked."""

    def run(job: Job) -> Machine:
        execute_job(ctx, job)
        return ctx.store.get_machine(job.target)

    created: list[Machine] = []
    failed: dict[str, CorralError] = {}
    # Full copies run qemu-img for seconds; a few at once use both cores.
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), 4))) as pool:
        futures = {job.target: pool.submit(run, job) for job in jobs}
        for name, future in futures.items():
            try:
                created.append(future.result())
            except CorralError as exc:
                failed[name] = exc
    if start:
        created = _start_in_turn(ctx, created, failed)
    return BatchResult(created=created, failed=failed)


def _start_in_turn(
    ctx: Context, machines: list[Machine], failed: dict[str, CorralError]
) -> list[Machine]:
    """Start provisioned machines one after another; delete any that will not start.

    One at a time, after all are defined: measured with ten appliance guests on two
    cores, starting QEMUs from several threads while earlier guests boot costs each
    guest ~10 % more CPU, and the batch ~10 % more time, than starting them in turn.
    A machine that does not start is deleted, so `vm create` leaves nothing half-made.
    """
    started = []
    for machine in machines:
        try:
            lifecycle.start(ctx, machine.name)
            started.append(machine)
        except CorralError as exc:
            failed[machine.name] = exc
            try:
                lifecycle.delete(ctx, machine.name, force=True)
            except CorralError:
                log.exception("could not delete %s, which did not start", machine.name)
    return started


def _check_sizes(spec: MachineSpec, disk: int, image_size: int) -> None:
    """What no host could make right; capacity is the scheduler's to judge."""
    if spec.cpus < 1:
        raise InvalidInput("--cpus must be at least 1.")
    if spec.memory_bytes < MIN_MEMORY:
        raise InvalidInput(f"--memory must be at least {format_size(MIN_MEMORY)}.")
    if disk < image_size:
        raise InvalidInput(
            f"--disk-size {format_size(disk)} is smaller than the image "
            f"({format_size(image_size)}); disks can grow, not shrink."
        )


def wait_ready(
    ctx: Context,
    names: list[str],
    timeout: float,
    on_update: Callable[[str, str], None] = lambda name, status: None,
) -> dict[str, ReadyReport]:
    """Wait until each guest prints its readiness line; fail fast if one powers off.

    ``on_update(name, status)`` is called when a machine's status changes.
    """
    deadline = time.monotonic() + timeout
    ready: dict[str, ReadyReport] = {}
    handles = {n: ctx.on(ctx.store.get_machine(n).host) for n in names}
    while len(ready) < len(names):
        for name in names:
            if name in ready:
                continue
            handle = handles[name]
            report = read_ready(handle.read_console(name))
            if report is not None:
                ready[name] = report
                on_update(name, "ready")
                continue
            state = handle.driver.state(name)
            if state in (PowerState.SHUT_OFF, PowerState.CRASHED):
                raise GuestTimeout(
                    f"Machine '{name}' stopped ({state}) before it said it was ready.",
                    hint=f"'corral vm console {name}' shows what the guest printed.",
                )
        if len(ready) == len(names):
            break
        if time.monotonic() > deadline:
            late = [n for n in names if n not in ready]
            raise GuestTimeout(
                f"{_quote(late)} did not report ready within {timeout:.0f} s.",
                hint="'corral vm console NAME' shows what the guest is doing.",
            )
        time.sleep(0.1)
    return ready


def _quote(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)
