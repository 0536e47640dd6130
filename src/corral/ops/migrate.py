"""Moving machines between hosts: cold (stopped) and live (running), one at a time, and
the two operations made of many moves, host evacuation and pool rebalancing.

A move is a job with a *pivot* (see ``ops.jobs``): before it, any failure rolls back to
the machine intact on its source; after it, the machine lives on the target and what
is left (removing the source's copy) is only ever finished, never undone.

- **Cold**: the target gets the machine's image (base and kernel), the machine's own
  disk bytes (a linked clone's overlay alone, re-pointed at the target's base) and its
  seed, each read back and compared by sha256; then its domain. The pivot is the
  store's record moving to the target, with the target's capacity checked under lock.
- **Live**: the target gets the image and an empty overlay; libvirt then moves memory
  and the overlay's blocks peer to peer while the guest runs. The pivot is that
  migration; a job interrupted in it is settled by asking both hosts where the domain
  runs.

Storage is *shared* when both hosts name the same pool directory and the target sees
the machine's disk there: then no disk byte moves.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from corral.compute.base import LIVE_MIGRATION, LiveMigration
from corral.errors import Conflict, CorralError, HypervisorError, InvalidInput, NotFound
from corral.images.transfer import copy_volume, file_sha256, partial_marker, send_file
from corral.model import CloneMode, HostState, Job, Machine, PowerState, RecordState
from corral.ops.context import Context, HostHandle
from corral.ops.distribute import image_on
from corral.ops.jobs import (
    PlannedStep,
    Recovery,
    execute_job,
    job_kind,
    nothing,
    prepare_job,
    step,
)
from corral.ops.machines import domain_plan, machine_args, machine_from_args
from corral.ops.snapshots import has_snapshots
from corral.ops.usage import require_room
from corral.storage import qemu_img

if TYPE_CHECKING:  # the scheduler brings numpy: not at every command's start
    from corral.scheduler import Move

_ACTIVE = frozenset({PowerState.RUNNING, PowerState.PAUSED, PowerState.BLOCKED})


# -- steps ---------------------------------------------------------------------------------


def _delete_target_file(ctx: Context, a: dict[str, Any]) -> None:
    storage = ctx.on(a["host"]).storage
    storage.delete(Path(a["path"]))
    storage.delete(partial_marker(Path(a["path"])))  # an interrupted send leaves it


@step("file.send", undo=_delete_target_file)
def _send(ctx: Context, a: dict[str, Any]) -> None:
    """A machine's file, byte for byte from the source host's pool to the target's,
    verified by sha256; a qcow2 overlay is re-pointed at the target's copy of its base."""
    source, target = ctx.on(a["source_host"]), ctx.on(a["host"])
    src, dest = Path(a["source"]), Path(a["path"])
    if a["backing"] is None:
        # Pool to pool, read, written and read back chunk by chunk at once: a full
        # clone's disk may be large, and a temporary copy would cost a pass more.
        # Its length bounds what it takes (a qcow2 file holds no holes to speak of).
        require_room(ctx, target, f"the file {dest.name}", needed=source.storage.size(src))
        copy_volume(source.storage, src, target.storage, dest,
                    on_progress=_fraction_of(ctx, source.storage.size(src)))
        return
    # An overlay's header must name the target's base, so it is rewritten in a local
    # copy first: overlays are the machine's own blocks only, small.
    with tempfile.TemporaryDirectory(dir=ctx.settings.state_dir, prefix="move-") as tmp:
        local = Path(tmp) / src.name
        source.storage.fetch(src, local)
        qemu_img.set_backing(local, Path(a["backing"]), ctx.limits)
        require_room(ctx, target, f"the file {dest.name}",
                     needed=local.stat().st_blocks * 512)
        size = local.stat().st_size
        target.storage.delete(dest)  # a crash may have left part of one; resuming is no cheaper
        send_file(local, file_sha256(local), target.storage, dest,
                  on_progress=_fraction_of(ctx, size))


@step("disk.prepare", undo=_delete_target_file)
def _prepare_disk(ctx: Context, a: dict[str, Any]) -> None:
    """The empty overlay a live migration fills: libvirt copies only the top layer."""
    handle = ctx.on(a["host"])
    require_room(ctx, handle, f"the disk {Path(a['path']).name}")
    storage = handle.storage
    dest = Path(a["path"])
    storage.delete(dest)
    storage.linked_clone(Path(a["backing"]), dest, a["size"])


def _undefine_target(ctx: Context, a: dict[str, Any]) -> None:
    ctx.on(a["host"]).driver.undefine(a["identity"]["uuid"], force=True)


@step("domain.define-moved", undo=_undefine_target)
def _define_moved(ctx: Context, a: dict[str, Any]) -> None:
    handle = ctx.on(a["host"])
    if handle.local:
        ctx.settings.console_dir.mkdir(parents=True, exist_ok=True)
    handle.driver.define(domain_plan(ctx, machine_from_args(a), handle))


def _recorded_on_target(ctx: Context, a: dict[str, Any]) -> bool:
    m = ctx.store.find_machine(a["name"])
    return m is not None and m.identity.uuid == a["identity"]["uuid"] and m.host == a["host"]


@step("machine.move", undo=nothing, settle=_recorded_on_target)
def _move_record(ctx: Context, a: dict[str, Any]) -> None:
    """The record, and with it the claim, moves to the target. Cold moves check the
    target's room here, under lock; a live move records what already happened."""
    ctx.store.move_machine(machine_from_args(a), ctx.overcommit if a["check_room"] else None)


def _runs_on_target(ctx: Context, a: dict[str, Any]) -> bool:
    """Where a migration that was interrupted left the domain: the facts decide."""
    if _active_with_uuid(ctx.on(a["source_host"]), a["name"], a["uuid"]):
        return False
    return _active_with_uuid(ctx.on(a["host"]), a["name"], a["uuid"])


@step("domain.migrate", undo=nothing, settle=_runs_on_target)
def _migrate(ctx: Context, a: dict[str, Any]) -> None:
    source, target = ctx.on(a["source_host"]), ctx.on(a["host"])
    if _active_with_uuid(target, a["name"], a["uuid"]):
        return  # moved before a crash
    move = LiveMigration(
        dest_uri=target.host.uri,
        data_address=a["data_address"],
        paths=a["paths"],
        network=target.host.network,
        copy_disks=tuple(a["copy_disks"]),
        bandwidth_mib=ctx.settings.migration_bandwidth_mib,
    )
    report = ctx.on_progress
    project = ctx.store.get_machine(a["name"]).project
    announced = [0]

    def progress(fraction: float) -> None:
        if report is not None:
            report(100.0 * fraction)
        # The job's own progress counts steps; this one is most of the move, so its
        # progress also goes out as events (the API's and console's event stream).
        tenth = int(fraction * 10)
        if tenth > announced[0]:
            announced[0] = tenth
            ctx.store.add_event("machine.migrating", a["name"],
                                f"moving {a['name']} to {a['host']}: {tenth * 10} % sent",
                                project)

    source.driver.migrate_live(a["name"], move, progress)


@step("source.remove", undo=nothing)
def _remove_source(ctx: Context, a: dict[str, Any]) -> None:
    """The source's domain (by UUID: the target now holds the same name) and files."""
    handle = ctx.on(a["source_host"])
    handle.driver.undefine(a["uuid"], force=True)
    for path in a["paths"]:
        handle.storage.delete(Path(path))


# -- jobs ----------------------------------------------------------------------------------

MIGRATE = job_kind("migrate", Recovery.ROLL_BACK, pivot="machine.move")
MIGRATE_LIVE = job_kind("migrate-live", Recovery.ROLL_BACK, pivot="domain.migrate")


@dataclass(frozen=True, slots=True)
class MoveResult:
    machine: str
    source: str
    target: str
    live: bool
    shared_storage: bool
    seconds: float
    job: int


def migrate(ctx: Context, name: str, *, to: str | None = None, live: bool = False) -> MoveResult:
    """Move machine ``name`` to host ``to`` (or the one the scheduler picks).

    ``live`` moves a running machine without stopping it; without it the machine must
    be stopped. On failure the machine is as it was, on its source, and the error says why.
    """
    started = time.monotonic()
    job, plan = prepare_migration(ctx, name, to=to, live=live)
    execute_job(ctx, job)
    return MoveResult(machine=name, source=plan.source, target=plan.target, live=live,
                      shared_storage=plan.shared, seconds=time.monotonic() - started,
                      job=job.id)


@dataclass(frozen=True, slots=True)
class MovePlan:
    source: str
    target: str
    shared: bool
    steps: list[PlannedStep] = field(default_factory=list)


def prepare_migration(
    ctx: Context, name: str, *, to: str | None = None, live: bool = False
) -> tuple[Job, MovePlan]:
    """Check the move, choose the target, write the job down; run nothing yet."""
    m = ctx.store.get_machine(name)
    if m.record_state is not RecordState.READY:
        raise Conflict(f"Machine '{name}' is {m.record_state.value}; only a ready machine moves.",
                       hint="Wait for its job to finish (corral job list).")
    if m.storage_pool is not None:
        # An added pool is one host's filesystem; its native clones do not travel.
        raise Conflict(f"Machine '{name}' has its disk in the storage pool "
                       f"'{m.storage_pool}', which is on its host only, so it cannot move.",
                       hint=f"Clone it into the host's own pool (corral vm clone {name} NEW), "
                            "then move the clone.")
    source = ctx.on(m.host)
    power = source.driver.state(name)
    if live and power not in _ACTIVE:
        raise Conflict(f"Machine '{name}' is not running, so it cannot move live.",
                       hint="Move it without the live option, or start it first.")
    if not live and power in _ACTIVE:
        raise Conflict(f"Machine '{name}' is running.",
                       hint="Move it with the live option (--live), or stop it first.")
    if live and LIVE_MIGRATION not in type(source.driver).capabilities:
        raise Conflict(f"Host '{m.host}' cannot move running machines.",
                       hint="Stop the machine and move it without the live option.")
    if has_snapshots(source, name):
        # libvirt moves no snapshot metadata, and a live move of a machine with internal
        # snapshots is refused by QEMU: the tree would be lost or the move fail half-way.
        raise Conflict(f"Machine '{name}' has snapshots, which cannot move with it.",
                       hint=f"Delete them (corral vm snapshot list {name}), then move it.")
    target = ctx.on(choose_target(ctx, m, to))
    plan = _live_steps(ctx, m, source, target) if live else _cold_steps(ctx, m, source, target)
    kind = MIGRATE_LIVE if live else MIGRATE
    # Two moves of one machine at once would write the same target files.
    return prepare_job(ctx, kind, name, plan.steps, project=m.project, exclusive=True), plan


def choose_target(ctx: Context, m: Machine, to: str | None) -> str:
    """The host named (which must still pass the placement filters), or the scheduler's
    pick among the others; NoValidHost explains a refusal."""
    from corral.ops.placement import inventory, machine_request, scheduler

    if to == m.host:
        raise InvalidInput(f"Machine '{m.name}' already runs on host '{to}'.",
                           hint="Name another host with --to, or leave it out.")
    image = ctx.store.find_image(m.image) if m.image else None
    inv = inventory(ctx, only=to) if to is not None else inventory(ctx, exclude=m.host)
    return scheduler(ctx).place(inv, machine_request(m, image)).host


@dataclass(frozen=True, slots=True)
class _Arrival:
    """What a machine becomes, and needs, on the host it moves to."""

    moved: Machine
    """Its record once on the target: the same machine with the target's paths."""
    shared: bool
    """The target reads the very same disk file (shared storage)."""
    base: str | None
    """The target's copy of the base the machine's overlay reads; None without one."""
    images: list[str]
    """Library images the target must hold: the base's and the kernel's."""


def _arrival(ctx: Context, m: Machine, source: HostHandle, target: HostHandle) -> _Arrival:
    shared = (Path(source.host.pool_path) == Path(target.host.pool_path)
              and target.storage.exists(Path(m.disk_path)))
    base = None
    if m.image is not None and m.clone is CloneMode.LINKED:
        base = image_on(target, ctx.store.get_image(m.image)).base
    if shared:
        moved = replace(m, host=target.host.name)
    else:
        pool = Path(target.host.pool_path)
        moved = replace(
            m, host=target.host.name, disk_path=str(pool / Path(m.disk_path).name),
            seed_path=str(pool / Path(m.seed_path).name) if m.seed_path else None,
        )
    images = [i for i in (m.image, m.kernel_image) if i is not None]
    return _Arrival(moved, shared, base, images)


def _arrival_steps(m: Machine, arrival: _Arrival, source: HostHandle,
                   target: HostHandle) -> list[PlannedStep]:
    """The images the target needs, and the machine's seed, before anything else."""
    moved = arrival.moved
    steps = [PlannedStep("image.ensure", {"host": target.host.name, "image": i})
             for i in arrival.images]
    if m.seed_path is not None and moved.seed_path != m.seed_path:
        steps.append(PlannedStep("file.send", {
            "host": target.host.name, "source_host": source.host.name,
            "source": m.seed_path, "path": moved.seed_path, "backing": None,
        }))
    return steps


def _source_leftovers(m: Machine, moved: Machine, source: HostHandle) -> list[str]:
    paths = [str(source.console_log(m.name))]
    if moved.disk_path != m.disk_path:
        paths.append(m.disk_path)
    if m.seed_path is not None and moved.seed_path != m.seed_path:
        paths.append(m.seed_path)
    return paths


def _cold_steps(ctx: Context, m: Machine, source: HostHandle, target: HostHandle) -> MovePlan:
    arrival = _arrival(ctx, m, source, target)
    moved, shared = arrival.moved, arrival.shared
    steps = _arrival_steps(m, arrival, source, target)
    if not shared:
        steps.append(PlannedStep("file.send", {
            "host": target.host.name, "source_host": source.host.name,
            "source": m.disk_path, "path": moved.disk_path, "backing": arrival.base,
        }))
    steps += [
        PlannedStep("domain.define-moved", machine_args(moved)),
        PlannedStep("machine.move", {**machine_args(moved), "check_room": True}),
        PlannedStep("source.remove", {
            "source_host": source.host.name, "uuid": m.identity.uuid,
            "paths": _source_leftovers(m, moved, source),
        }),
    ]
    return MovePlan(source.host.name, target.host.name, shared, steps)


def _live_steps(ctx: Context, m: Machine, source: HostHandle, target: HostHandle) -> MovePlan:
    arrival = _arrival(ctx, m, source, target)
    moved, shared, base = arrival.moved, arrival.shared, arrival.base
    if not shared and base is None:
        raise Conflict(
            f"Machine '{m.name}' has a disk of its own (no base image), so it moves live "
            "only between hosts that share its storage.",
            hint="Stop it and move it without the live option, or pick a host sharing its pool.",
        )
    steps = _arrival_steps(m, arrival, source, target)
    if not shared:
        size = source.storage.usage(Path(m.disk_path)).virtual_size
        steps.append(PlannedStep("disk.prepare", {
            "host": target.host.name, "path": moved.disk_path, "backing": base, "size": size,
        }))
    paths = {m.disk_path: moved.disk_path, str(source.console_log(m.name)):
             str(target.console_log(m.name))}
    if m.seed_path is not None and moved.seed_path is not None:
        paths[m.seed_path] = moved.seed_path
    if m.image is not None:
        src_image = image_on(source, ctx.store.get_image(m.image))
        dst_image = image_on(target, ctx.store.get_image(m.image))
        paths[src_image.base] = dst_image.base
    for image in arrival.images:
        src_boot = image_on(source, ctx.store.get_image(image)).kernel_boot
        dst_boot = image_on(target, ctx.store.get_image(image)).kernel_boot
        if src_boot is not None and dst_boot is not None:
            paths[src_boot.kernel] = dst_boot.kernel
            if src_boot.initrd is not None and dst_boot.initrd is not None:
                paths[src_boot.initrd] = dst_boot.initrd
    steps += [
        PlannedStep("domain.migrate", {
            "host": target.host.name, "source_host": source.host.name, "name": m.name,
            "uuid": m.identity.uuid, "paths": paths, "data_address": _address(target),
            "copy_disks": [] if shared else ["vda"],
        }),
        PlannedStep("machine.move", {**machine_args(moved), "check_room": False}),
        PlannedStep("source.remove", {
            "source_host": source.host.name, "uuid": m.identity.uuid,
            "paths": _source_leftovers(m, moved, source),
        }),
    ]
    return MovePlan(source.host.name, target.host.name, shared, steps)


# -- many moves ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MoveFailure:
    machine: str
    error: str


@dataclass(frozen=True, slots=True)
class ManyMoves:
    moved: list[MoveResult]
    failed: list[MoveFailure]

    @property
    def outcomes(self) -> list[MoveResult | MoveFailure]:
        return [*self.moved, *self.failed]


def evacuate(ctx: Context, host: str,
             on_move: Callable[[MoveResult | MoveFailure], None] = lambda r: None) -> ManyMoves:
    """Put ``host`` in maintenance and move every machine on it elsewhere: running ones
    live, stopped ones cold, each to the host the scheduler picks then (so each move
    sees the ones before it, and anti-affinity holds)."""
    from corral.ops.hosts import set_maintenance

    if ctx.store.get_host(host).state is not HostState.MAINTENANCE:
        set_maintenance(ctx, host, True)
    return _many(ctx, [(m.name, None) for m in ctx.store.list_machines(host)], on_move)


def rebalance(ctx: Context, max_moves: int = 50,
              on_move: Callable[[MoveResult | MoveFailure], None] = lambda r: None,
              plan: list[Move] | None = None) -> ManyMoves:
    """Carry out the rebalance plan (``corral pool rebalance``), move by move: ``plan``
    when the caller already showed one, else the pool's plan now."""
    from corral.ops.placement import rebalance as plan_now

    moves = plan if plan is not None else plan_now(ctx, max_moves)
    return _many(ctx, [(mv.machine, mv.target) for mv in moves], on_move)


def _many(ctx: Context, moves: list[tuple[str, str | None]],
          on_move: Callable[[MoveResult | MoveFailure], None]) -> ManyMoves:
    done, failed = [], []
    for name, to in moves:
        outcome: MoveResult | MoveFailure
        try:
            m = ctx.store.get_machine(name)
            live = ctx.on(m.host).driver.state(name) in _ACTIVE
            outcome = migrate(ctx, name, to=to, live=live)
            done.append(outcome)
        except CorralError as exc:
            outcome = MoveFailure(name, str(exc))
            failed.append(outcome)
        on_move(outcome)
    return ManyMoves(done, failed)


# -- helpers -------------------------------------------------------------------------------


def _active_with_uuid(handle: HostHandle, name: str, uuid: str) -> bool:
    try:
        return (handle.driver.state(name) in _ACTIVE
                and handle.driver.domain_xml(name).uuid == uuid)
    except NotFound:
        return False


def _address(handle: HostHandle) -> str:
    """Where the source's QEMU reaches the target: its URI's host name."""
    address = urlsplit(handle.host.uri).hostname
    if not address:
        raise HypervisorError(
            f"Host '{handle.host.name}' is enrolled as {handle.host.uri}, which names no "
            "network address, so no other host can send a running machine to it.",
            hint="Enrol it with a network URI (qemu+tls:// or qemu+ssh://) to move machines "
                 "to it live.",
        )
    return address


def _fraction_of(ctx: Context, size: int) -> Callable[[int], None] | None:
    report = ctx.on_progress
    if report is None or size == 0:
        return None
    return lambda done: report(100.0 * done / size)


