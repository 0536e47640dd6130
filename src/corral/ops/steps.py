"""The step kinds jobs are made of. Each ``run`` and ``undo`` is idempotent.

A job's arguments are JSON recorded before the step runs; everything a compensation
needs (paths, UUIDs) is in them, so a different process can undo a dead one's work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corral.identity.seed import seed_content, write_seed
from corral.model import CloneMode, Identity, RecordState
from corral.ops.context import Context
from corral.ops.hosts import local_host
from corral.ops.jobs import nothing, step
from corral.ops.machines import domain_plan, machine_from_args

# -- the record --------------------------------------------------------------------------


def _forget(ctx: Context, a: dict[str, Any]) -> None:
    ctx.store.forget_machine(a["name"], a["identity"]["uuid"])


@step("machine.record", undo=_forget)
def _record(ctx: Context, a: dict[str, Any]) -> None:
    existing = ctx.store.find_machine(a["name"])
    if existing is None or existing.identity.uuid != a["identity"]["uuid"]:
        ctx.store.add_machine(machine_from_args(a))


@step("machine.ready", undo=nothing)
def _ready(ctx: Context, a: dict[str, Any]) -> None:
    ctx.store.set_machine_state(a["name"], RecordState.READY)


@step("machine.mark-deleting", undo=nothing)
def _mark_deleting(ctx: Context, a: dict[str, Any]) -> None:
    ctx.store.set_machine_state(a["name"], RecordState.DELETING)


@step("machine.forget", undo=nothing)
def _forget_step(ctx: Context, a: dict[str, Any]) -> None:
    _forget(ctx, a)


# -- disks and seeds ---------------------------------------------------------------------


def _delete_disk(ctx: Context, a: dict[str, Any]) -> None:
    ctx.storage.delete(Path(a["path"]))


@step("disk.clone", undo=_delete_disk)
def _clone_image(ctx: Context, a: dict[str, Any]) -> None:
    """A new disk from a library image, linked (overlay) or full (copy)."""
    dest, base = Path(a["path"]), Path(a["base"])
    ctx.storage.delete(dest)  # a crash may have left a partial one
    if CloneMode(a["mode"]) is CloneMode.LINKED:
        ctx.storage.linked_clone(base, dest, a["size"])
    else:
        ctx.storage.full_clone(base, dest, a["size"], ctx.on_progress)


@step("disk.copy", undo=_delete_disk)
def _copy_disk(ctx: Context, a: dict[str, Any]) -> None:
    """A machine's disk copied for a clone: the overlay alone (linked) or flattened (full)."""
    src, dest = Path(a["source"]), Path(a["path"])
    ctx.storage.delete(dest)
    if CloneMode(a["mode"]) is CloneMode.FULL:
        ctx.storage.full_clone(src, dest, a["size"], ctx.on_progress)
        return
    # The copy keeps its explicit backing reference to the same read-only base, so
    # only the bytes the source machine owns are copied.
    ctx.storage.copy(src, dest)


@step("disk.delete", undo=nothing)
def _delete_disk_step(ctx: Context, a: dict[str, Any]) -> None:
    _delete_disk(ctx, a)


def _delete_file(_ctx: Context, a: dict[str, Any]) -> None:
    Path(a["path"]).unlink(missing_ok=True)


@step("seed.write", undo=_delete_file)
def _write_seed(_ctx: Context, a: dict[str, Any]) -> None:
    identity = Identity(**a["identity"])
    write_seed(Path(a["path"]), seed_content(identity, tuple(a["ssh_keys"])))
    Path(a["path"]).chmod(0o644)


@step("file.delete", undo=nothing)
def _delete_file_step(ctx: Context, a: dict[str, Any]) -> None:
    _delete_file(ctx, a)


# -- the domain --------------------------------------------------------------------------


def _undefine(ctx: Context, a: dict[str, Any]) -> None:
    ctx.driver.undefine(a["uuid"], force=True)


@step("domain.define", undo=_undefine)
def _define(ctx: Context, a: dict[str, Any]) -> None:
    host, _ = local_host(ctx)
    machine = ctx.store.get_machine(a["name"])
    ctx.settings.console_dir.mkdir(parents=True, exist_ok=True)
    ctx.driver.define(domain_plan(ctx, machine, host))


@step("domain.destroy", undo=nothing)
def _destroy(ctx: Context, a: dict[str, Any]) -> None:
    ctx.driver.destroy(a["name"])


@step("domain.undefine", undo=nothing)
def _undefine_step(ctx: Context, a: dict[str, Any]) -> None:
    _undefine(ctx, a)

