"""A new machine from a snapshot of another: ``corral vm create NEW --from-snapshot SRC@SNAP``.

The new machine's disk is the source's disk as it was at the snapshot, read out of the
source's qcow2 by ``qemu-img convert -l`` (``storage.qemu_img.convert_snapshot``); it
gets an identity of its own (name, UUID, MAC, seed, instance id), as a clone does. When
the source is a linked clone of a library image, the new disk is an overlay of the same
base, holding only the clusters the snapshot itself holds. The source may be running
and is neither paused nor reverted.

Reading a running machine's disk. QEMU holds a write lock on it, so qemu-img must open
it with force-share (``-U``). That is sound for an internal snapshot: while a snapshot
exists, its L1 table, its L2 tables and the data clusters it refers to are never written
in place. They are shared (refcount > 1) with the live image, or referenced by the
snapshot alone, and QEMU copies on write anything whose refcount is not 1 *and* that
the live L1 does not own outright. What could change under the reader is the snapshot
table itself, rewritten when another snapshot is taken or deleted, and the snapshot's
clusters, freed only when *it* is deleted. So the job refuses to start while another
job has the source, and the copy step reads the snapshot's entry (id and creation time)
before and after copying: if it changed or vanished, the copy is thrown away.

Only a machine on this host can be the source: qemu-img runs here and reads the file;
remote hosts are reached through libvirt alone.

The job rolls back like a clone's: a failure, or Corral killed at any instant, leaves
no disk, no domain and no record (the next command compensates).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.compute.base import SNAPSHOTS
from corral.errors import Conflict, CorralError, InvalidInput, NotFound
from corral.formats.qcow2 import OVERLAY_CLUSTER_BITS, OVERLAY_EXTENDED_L2
from corral.identity import check_name
from corral.model import CloneMode, Job, JobState, Machine, RecordState
from corral.ops import steps as _steps  # noqa: F401  (registers the step kinds it reuses)
from corral.ops.context import Context, HostHandle
from corral.ops.distribute import image_on
from corral.ops.jobs import PlannedStep, Recovery, execute_job, job_kind, prepare_job, step
from corral.ops.machines import copy_of, machine_args
from corral.ops.usage import require_room
from corral.storage import qemu_img

log = logging.getLogger(__name__)

SNAPSHOT_CLONE = job_kind("snapshot-clone", Recovery.ROLL_BACK)

OVERLAY_OPTIONS = {
    "cluster_size": str(1 << OVERLAY_CLUSTER_BITS),
    "extended_l2": "on" if OVERLAY_EXTENDED_L2 else "off",
}
"""The layout of every new overlay (``formats.qcow2.write_overlay``): the guest's first
small writes cost what they cost on a linked clone made from the library."""


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """``MACHINE@SNAPSHOT``."""

    machine: str
    snapshot: str

    @classmethod
    def parse(cls, text: str) -> SnapshotRef:
        machine, at, snapshot = text.partition("@")
        if not at or not machine or not snapshot or "@" in snapshot:
            raise InvalidInput(
                f"'{text}' is not MACHINE@SNAPSHOT.",
                hint="Name the machine and one of its snapshots, e.g. web-1@before-upgrade "
                     "('corral vm snapshot list MACHINE' shows them).",
            )
        check_name(machine)
        check_name(snapshot, what="snapshot name")
        return cls(machine, snapshot)

    def __str__(self) -> str:
        return f"{self.machine}@{self.snapshot}"


# -- the step --------------------------------------------------------------------------


def _delete_disk(ctx: Context, a: dict[str, Any]) -> None:
    ctx.on(a["host"]).storage.delete(Path(a["path"]))


@step("disk.from-snapshot", undo=_delete_disk)
def _disk_from_snapshot(ctx: Context, a: dict[str, Any]) -> None:
    """The source's disk as it was at the snapshot, into a new qcow2 (an overlay of the
    source's base when ``base`` is given, else standalone)."""
    handle = ctx.on(a["host"])
    _require_local(handle, a["machine"])
    source, dest = Path(a["source"]), Path(a["path"])
    require_room(ctx, handle, f"the disk {dest.name}")
    handle.storage.delete(dest)  # a crash may have left a partial one
    _check_unchanged(ctx, a)
    qemu_img.convert_snapshot(
        source, a["snapshot"], dest, ctx.limits, ctx.on_progress,
        backing=Path(a["base"]) if a["base"] else None, options=OVERLAY_OPTIONS,
    )
    try:
        _check_unchanged(ctx, a)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _check_unchanged(ctx: Context, a: dict[str, Any]) -> None:
    """The snapshot is still the one the job was planned from (see the module's doc)."""
    found = _internal_snapshot(ctx, Path(a["source"]), a["snapshot"])
    if found is None or [found.id, found.date_sec, found.date_nsec] != a["internal"]:
        raise Conflict(
            f"Snapshot '{a['snapshot']}' of machine '{a['machine']}' was deleted or replaced "
            "while it was being copied; nothing was made.",
            hint="Create the machine again from a snapshot that stays.",
        )



# -- planning and running --------------------------------------------------------------


def prepare(
    ctx: Context, ref: SnapshotRef, new: str, mode: CloneMode = CloneMode.LINKED
) -> Job:
    """Check the request and write its job down (not run yet).

    Refuses (nothing written): a bad name, a source that is not ready, adopted, on a
    remote host or busy with another job; an unknown snapshot; a taken name; a full
    quota. The host's capacity is claimed when the job records the machine.
    """
    check_name(new)
    src = ctx.store.get_machine(ref.machine)
    if src.record_state is not RecordState.READY:
        raise Conflict(f"Machine '{src.name}' is {src.record_state.value}.",
                       hint="Wait for its job to finish (corral job list).")
    if not src.managed:
        raise Conflict(f"Machine '{src.name}' was adopted; Corral cannot copy its snapshots.")
    handle = ctx.on(src.host)
    _require_local(handle, src.name)
    if SNAPSHOTS not in type(handle.driver).capabilities:
        raise Conflict(f"Host '{src.host}' cannot snapshot machines.")
    if ref.snapshot not in {s.name for s in handle.driver.snapshots(src.name)}:
        raise NotFound("snapshot", str(ref),
                       hint=f"'corral vm snapshot list {src.name}' shows its snapshots.")
    busy = ctx.store.list_jobs((JobState.PENDING, JobState.RUNNING), target=src.name)
    if busy:
        raise Conflict(f"Machine '{src.name}' is busy with job {busy[0].id} ({busy[0].kind}).",
                       hint=f"Wait for it to end: corral job show {busy[0].id}.")
    if ctx.store.taken(names=[new]) or new in handle.driver.domain_names():
        raise Conflict(f"A machine named '{new}' already exists.",
                       hint="Choose another name, or delete the old machine first.")
    source = Path(src.disk_path)
    disk = qemu_img.info(source, "qcow2", ctx.limits)
    internal = next((s for s in disk.snapshots if s.name == ref.snapshot), None)
    if internal is None:
        # libvirt lists it, but the disk does not hold it: an external snapshot, or
        # metadata that outlived the disk's own.
        raise Conflict(f"The disk of machine '{src.name}' holds no snapshot named "
                       f"'{ref.snapshot}', though libvirt lists one.")
    size = disk.virtual_size
    base = _shared_base(ctx, handle, src, disk) if mode is CloneMode.LINKED else None
    clone_mode = CloneMode.LINKED if base is not None else CloneMode.FULL
    machine = copy_of(ctx, handle, src, new, clone_mode, size)
    args = machine_args(machine)
    on = {"host": src.host}
    return prepare_job(
        ctx,
        SNAPSHOT_CLONE,
        new,
        [
            PlannedStep("machine.record", args),
            PlannedStep(
                "disk.from-snapshot",
                {**on, "machine": src.name, "source": src.disk_path,
                 "snapshot": ref.snapshot,
                 "internal": [internal.id, internal.date_sec, internal.date_nsec],
                 "path": machine.disk_path, "base": base},
            ),
            PlannedStep(
                "seed.write",
                {**on, "path": machine.seed_path, "identity": args["identity"],
                 "ssh_keys": args["ssh_keys"]},
            ),
            PlannedStep("domain.define", {**on, "name": new, "uuid": machine.identity.uuid}),
            PlannedStep("machine.ready", {"name": new}),
        ],
        project=src.project,
    )


def finish(ctx: Context, job: Job, start: bool) -> Machine:
    """Run a job of :func:`prepare`, then start the new machine if asked.

    A machine that will not start is deleted, as ``vm create`` does, so nothing
    half-made stays.
    """
    from corral.ops import lifecycle

    execute_job(ctx, job)
    if start:
        try:
            lifecycle.start(ctx, job.target)
        except CorralError:
            try:
                lifecycle.delete(ctx, job.target, force=True)
            except CorralError:
                log.exception("could not delete %s, which did not start", job.target)
            raise
    return ctx.store.get_machine(job.target)


def create_from_snapshot(
    ctx: Context, ref: SnapshotRef, new: str, *, mode: CloneMode = CloneMode.LINKED,
    start: bool = True,
) -> Machine:
    """A new machine whose disk is ``ref``'s machine's disk as it was at the snapshot."""
    return finish(ctx, prepare(ctx, ref, new, mode), start)


def _require_local(handle: HostHandle, machine: str) -> None:
    if not handle.local:
        raise Conflict(
            f"Machine '{machine}' is on host '{handle.host.name}', and Corral can copy a "
            "snapshot only from a machine on its own host."
        )


def _shared_base(ctx: Context, handle: HostHandle, src: Machine,
                 disk: qemu_img.QemuImgInfo) -> str | None:
    """The library base the source's disk is an overlay of, if it is a linked clone of
    one: the new disk will be an overlay of it too. ``None``: stand alone."""
    if src.clone is not CloneMode.LINKED or src.image is None or not disk.backing_filename:
        return None
    image = ctx.store.find_image(src.image)
    if image is None:
        return None
    base = image_on(handle, image).base
    # The domain of the new machine names its base from the library (ops.machines), so
    # the disk must name that same file; a disk pointing elsewhere is copied whole.
    named = Path(src.disk_path).parent / disk.backing_filename  # relative to the disk
    if named.resolve() != Path(base).resolve():
        return None
    return base


def _internal_snapshot(ctx: Context, disk: Path, name: str) -> qemu_img.InternalSnapshot | None:
    return next((s for s in qemu_img.info(disk, "qcow2", ctx.limits).snapshots
                 if s.name == name), None)
