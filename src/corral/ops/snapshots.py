"""Machine snapshots: take, list, revert and delete, on whichever host the machine is.

A snapshot is internal to the machine's own qcow2 file (see ``formats.snapshot_xml``):
taking one of a running machine saves its memory too, so a revert resumes it exactly
where it was; a stopped machine's snapshot holds its disk. libvirt keeps the tree.
Each operation is one libvirt call that either happens or not, so none needs a job;
each leaves an event.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.compute.base import SNAPSHOTS
from corral.errors import Conflict
from corral.formats.snapshot_xml import ParsedSnapshot
from corral.identity import check_name
from corral.model import Machine, RecordState
from corral.ops.context import Context, HostHandle


@dataclass(frozen=True, slots=True)
class SnapshotTree:
    snapshots: list[ParsedSnapshot]
    """Oldest first; each names its parent."""
    current: str | None
    """The one the machine last reverted to or took; the parent of the next."""


def create(ctx: Context, name: str, snapshot: str,
           description: str | None = None) -> ParsedSnapshot:
    check_name(snapshot, what="snapshot name")
    machine, handle = _snapshottable(ctx, name)
    made = handle.driver.snapshot_create(name, snapshot, description=description)
    what = "with its memory" if made.with_memory else "of its disk"
    _event(ctx, machine, "snapshot", f"snapshot {snapshot} taken {what}")
    return made


def tree(ctx: Context, name: str) -> SnapshotTree:
    _machine, handle = _snapshottable(ctx, name)
    return SnapshotTree(handle.driver.snapshots(name), handle.driver.snapshot_current(name))


def revert(ctx: Context, name: str, snapshot: str) -> ParsedSnapshot:
    """Back to ``snapshot``: the disk, and a running machine's memory. What the machine
    wrote since is lost unless another snapshot holds it."""
    machine, handle = _snapshottable(ctx, name)
    handle.driver.snapshot_revert(name, snapshot)
    _event(ctx, machine, "reverted", f"reverted to snapshot {snapshot}")
    return next(s for s in handle.driver.snapshots(name) if s.name == snapshot)


def delete(ctx: Context, name: str, snapshot: str) -> None:
    machine, handle = _snapshottable(ctx, name)
    handle.driver.snapshot_delete(name, snapshot)
    _event(ctx, machine, "snapshot-deleted", f"snapshot {snapshot} deleted")


def has_snapshots(handle: HostHandle, name: str) -> bool:
    return SNAPSHOTS in type(handle.driver).capabilities and bool(handle.driver.snapshots(name))


def _snapshottable(ctx: Context, name: str) -> tuple[Machine, HostHandle]:
    machine = ctx.store.get_machine(name)
    if machine.record_state is not RecordState.READY:
        raise Conflict(f"Machine '{name}' is {machine.record_state.value}.",
                       hint="Wait for its job to finish (corral job list).")
    handle = ctx.on(machine.host)
    if SNAPSHOTS not in type(handle.driver).capabilities:
        raise Conflict(f"Host '{machine.host}' cannot snapshot machines.")
    return machine, handle


def _event(ctx: Context, machine: Machine, kind: str, message: str) -> None:
    ctx.store.add_event(f"machine.{kind}", machine.name, f"{machine.name}: {message}",
                        machine.project)
