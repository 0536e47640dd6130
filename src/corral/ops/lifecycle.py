"""Power actions, delete and clone of existing machines."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from corral.errors import Conflict, CorralError, NotFound
from corral.identity import check_name
from corral.model import CloneMode, DiskUsage, Job, JobState, Machine, PowerState
from corral.ops import steps as _steps  # noqa: F401  (registers the step kinds)
from corral.ops.context import Context, HostHandle
from corral.ops.jobs import PlannedStep, Recovery, execute_job, job_kind, prepare_job
from corral.ops.machines import copy_of, machine_args

DELETE = job_kind("delete", Recovery.ROLL_FORWARD)
CLONE = job_kind("clone", Recovery.ROLL_BACK)

_OFF = frozenset({PowerState.SHUT_OFF, PowerState.CRASHED})


@dataclass(frozen=True, slots=True)
class MachineStatus:
    machine: Machine
    power: PowerState | None
    """``None`` when the domain is missing from its host."""
    usage: DiskUsage | None


def status(ctx: Context, machine: Machine) -> MachineStatus:
    try:
        handle = ctx.on(machine.host)
        power: PowerState | None = handle.driver.state(machine.name)
    except NotFound:
        power = None
    try:
        usage: DiskUsage | None = ctx.disk_storage(machine.host, machine.storage_pool).usage(
            Path(machine.disk_path))
    except CorralError:
        usage = None
    return MachineStatus(machine, power, usage)


def host_of(ctx: Context, name: str) -> tuple[Machine, HostHandle]:
    """A machine's record and the host it runs on."""
    machine = ctx.store.get_machine(name)
    return machine, ctx.on(machine.host)


def start(ctx: Context, name: str) -> None:
    machine, handle = host_of(ctx, name)
    if handle.driver.state(name) not in _OFF:
        raise Conflict(f"Machine '{name}' is already running.")
    handle.remove_console(machine.name)
    handle.driver.start(name)
    _event(ctx, machine, "started")


def stop(ctx: Context, name: str, timeout: float) -> bool:
    """Graceful ACPI shutdown; after ``timeout`` seconds, power off. True if graceful."""
    machine, handle = host_of(ctx, name)
    driver = handle.driver
    if driver.state(name) in _OFF:
        return True
    driver.shutdown(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.state(name) in _OFF:
            _event(ctx, machine, "stopped")
            return True
        time.sleep(0.2)
    driver.destroy(name)
    _event(ctx, machine, "powered off", f"did not shut down within {timeout:g} s")
    return False


def reboot(ctx: Context, name: str) -> None:
    machine, handle = host_of(ctx, name)
    if handle.driver.state(name) in _OFF:
        raise Conflict(f"Machine '{name}' is not running; start it instead.")
    handle.driver.reboot(name)
    _event(ctx, machine, "rebooted")


def kill(ctx: Context, name: str) -> None:
    machine, handle = host_of(ctx, name)
    handle.driver.destroy(name)
    _event(ctx, machine, "powered off")


def _event(ctx: Context, machine: Machine, what: str, why: str | None = None) -> None:
    message = f"{machine.name} {what}" + (f": {why}" if why else "")
    ctx.store.add_event(f"machine.{what.replace(' ', '-')}", machine.name, message,
                        machine.project)


def delete(ctx: Context, name: str, *, force: bool = False) -> None:
    """Remove domain, disk, seed, console log and record; refuse a running machine."""
    execute_job(ctx, prepare_delete(ctx, name, force=force))


def prepare_delete(ctx: Context, name: str, *, force: bool = False) -> Job:
    """Check that ``name`` may be deleted and write its delete job down (not run yet)."""
    from corral.ops.migrate import MIGRATE, MIGRATE_LIVE

    machine, handle = host_of(ctx, name)
    for job in ctx.store.list_jobs((JobState.PENDING, JobState.RUNNING), target=name):
        if job.kind in (MIGRATE.name, MIGRATE_LIVE.name):
            raise Conflict(f"Machine '{name}' is moving (job {job.id}).",
                           hint=f"Wait for the move to end: corral job show {job.id}.")
    try:
        power: PowerState | None = handle.driver.state(name)
    except NotFound:
        power = None  # the domain vanished already; remove what is left
    if power is not None and power not in _OFF and not force:
        raise Conflict(
            f"Machine '{name}' is {power}.", hint="Stop it first, or delete with --force."
        )
    uuid = machine.identity.uuid
    on = {"host": machine.host}
    plan = [
        PlannedStep("machine.mark-deleting", {"name": name}),
        PlannedStep("domain.destroy", {**on, "name": name}),
        PlannedStep("domain.undefine", {**on, "uuid": uuid}),
        PlannedStep("disk.delete",
                    {**on, "path": machine.disk_path, "pool": machine.storage_pool}),
    ]
    if machine.seed_path:
        plan.append(PlannedStep("file.delete", {**on, "path": machine.seed_path}))
    plan += [
        PlannedStep("file.delete", {**on, "path": str(handle.console_log(name))}),
        PlannedStep("machine.forget", {"name": name, "identity": {"uuid": uuid}}),
    ]
    return prepare_job(ctx, DELETE, name, plan, project=machine.project)


def clone(ctx: Context, source: str, new: str, mode: CloneMode = CloneMode.LINKED) -> Machine:
    """A stopped machine becomes a new one: new name, UUID, MAC and seed; disk cloned.

    The new machine is left stopped, like its source.
    """
    execute_job(ctx, prepare_clone(ctx, source, new, mode))
    return ctx.store.get_machine(new)


def prepare_clone(
    ctx: Context, source: str, new: str, mode: CloneMode = CloneMode.LINKED
) -> Job:
    """Check the clone request and write its job down (not run yet)."""
    check_name(new)
    src, handle = host_of(ctx, source)
    if handle.driver.state(source) not in _OFF:
        raise Conflict(f"Machine '{source}' is running.", hint="Stop it before cloning.")
    if ctx.store.taken(names=[new]) or new in handle.driver.domain_names():
        raise Conflict(f"A machine named '{new}' already exists.")
    if not src.managed:
        raise Conflict(f"Machine '{source}' was adopted; Corral cannot clone it yet.")
    size = handle.storage.usage(Path(src.disk_path)).virtual_size
    # A linked copy of a full clone or an imported disk stands alone all the same: it has
    # no base to share.
    clone_mode = mode if src.clone is CloneMode.LINKED and src.image else CloneMode.FULL
    machine = copy_of(ctx, handle, src, new, clone_mode, size)
    identity = machine.identity
    args = machine_args(machine)
    on = {"host": src.host}
    return prepare_job(
        ctx,
        CLONE,
        new,
        [
            PlannedStep("machine.record", args),
            PlannedStep(
                "disk.copy",
                {**on, "source": src.disk_path, "path": machine.disk_path, "size": size,
                 "mode": mode.value},
            ),
            PlannedStep(
                "seed.write",
                {**on, "path": machine.seed_path, "identity": args["identity"],
                 "ssh_keys": args["ssh_keys"]},
            ),
            PlannedStep("domain.define", {**on, "name": new, "uuid": identity.uuid}),
            PlannedStep("machine.ready", {"name": new}),
        ],
        project=src.project,
    )
