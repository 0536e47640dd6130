"""Provisioning: machines from library images, each with an identity of its own."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from corral.errors import (
    Conflict,
    CorralError,
    GuestTimeout,
    InsufficientResources,
    InvalidInput,
    NotFound,
)
from corral.identity import allocate_macs, batch_names, new_identity
from corral.model import CloneMode, Job, Machine, MachineSpec, PowerState, Usage
from corral.model.units import format_size
from corral.ops import accounts, lifecycle
from corral.ops import steps as _steps  # noqa: F401  (registers the step kinds)
from corral.ops.console import ReadyReport, read_ready
from corral.ops.context import Context
from corral.ops.hosts import local_host
from corral.ops.jobs import PlannedStep, Recovery, execute_job, job_kind, prepare_job
from corral.ops.machines import console_log, machine_args, new_machine
from corral.storage.base import FULL_CLONE, LINKED_CLONE

log = logging.getLogger(__name__)
PROVISION = job_kind("provision", Recovery.ROLL_BACK)
MIN_MEMORY = 64 << 20


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
    """Check the batch against names, host and quota, and write one pending job per machine.

    Everything that can be refused is refused here, before a job exists; the API calls
    this in the request and answers 202 with the jobs.
    """
    names = batch_names(spec.name, count)
    host, _ = local_host(ctx)
    image = ctx.store.get_image(spec.image)
    if image.project not in (None, spec.project):
        raise NotFound("image", spec.image)
    disk_bytes = spec.disk_bytes or image.virtual_size
    wanted = LINKED_CLONE if spec.clone is CloneMode.LINKED else FULL_CLONE
    if wanted not in ctx.storage.capabilities:
        raise InvalidInput(f"This host's storage cannot make a {spec.clone} clone.")
    _check_resources(ctx, spec, disk_bytes, image.virtual_size, host.facts.memory_bytes,
                     host.facts.cpus)
    accounts.require_room(
        ctx.store, spec.project, Usage.of(count, spec.cpus, spec.memory_bytes, disk_bytes)
    )
    taken = ctx.store.taken(names=names) | (set(names) & ctx.driver.domain_names())
    if taken:
        raise Conflict(
            f"A machine named {_quote(sorted(taken))} already exists.",
            hint="Choose another name, or delete the old machine first.",
        )

    macs = allocate_macs(count, lambda candidates: ctx.store.taken(macs=candidates))
    jobs = []
    for name, mac in zip(names, macs, strict=True):
        m = new_machine(
            ctx,
            new_identity(name, mac),
            host=host.name,
            image=image.name,
            cpus=spec.cpus,
            memory_bytes=spec.memory_bytes,
            clone=spec.clone,
            ssh_keys=spec.ssh_keys,
            project=spec.project,
            disk_bytes=disk_bytes,
        )
        args = machine_args(m)
        plan = [
            PlannedStep("machine.record", args),
            PlannedStep(
                "disk.clone",
                {"path": m.disk_path, "base": image.path, "size": disk_bytes,
                 "mode": spec.clone.value},
            ),
            PlannedStep(
                "seed.write",
                {"path": m.seed_path, "identity": args["identity"], "ssh_keys": args["ssh_keys"]},
            ),
            PlannedStep("domain.define", {"name": m.name, "uuid": m.identity.uuid}),
            PlannedStep("machine.ready", {"name": m.name}),
        ]
        jobs.append(prepare_job(ctx, PROVISION, m.name, plan, project=spec.project))
    return jobs


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


def _check_resources(
    ctx: Context, spec: MachineSpec, disk: int, image_size: int, memory: int, cpus: int
) -> None:
    """Cheap checks against the host, before anything is made (two-phase validation)."""
    if spec.cpus < 1:
        raise InvalidInput("--cpus must be at least 1.")
    if spec.cpus > cpus:
        raise InsufficientResources(
            f"{spec.cpus} vCPUs is more than this host has ({cpus})."
        )
    if spec.memory_bytes < MIN_MEMORY:
        raise InvalidInput(f"--memory must be at least {format_size(MIN_MEMORY)}.")
    if spec.memory_bytes > memory:
        raise InsufficientResources(
            f"{format_size(spec.memory_bytes)} of memory is more than this host has "
            f"({format_size(memory)})."
        )
    if disk < image_size:
        raise InvalidInput(
            f"--disk-size {format_size(disk)} is smaller than the image "
            f"({format_size(image_size)}); disks can grow, not shrink."
        )
    stat = os.statvfs(ctx.settings.pool_dir)
    capacity = stat.f_blocks * stat.f_frsize
    if disk > capacity:
        raise InsufficientResources(
            f"A {format_size(disk)} disk is larger than this host's storage pool "
            f"({format_size(capacity)})."
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
    while len(ready) < len(names):
        for name in names:
            if name in ready:
                continue
            report = read_ready(console_log(ctx, name))
            if report is not None:
                ready[name] = report
                on_update(name, "ready")
                continue
            state = ctx.driver.state(name)
            if state in (PowerState.SHUT_OFF, PowerState.CRASHED):
                raise GuestTimeout(
                    f"Machine '{name}' stopped ({state}) before it said it was ready.",
                    hint=f"See its console log: {console_log(ctx, name)}",
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
