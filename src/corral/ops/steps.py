"""The step kinds jobs are made of. Each ``run`` and ``undo`` is idempotent.

A job's arguments are JSON recorded before the step runs; everything a compensation
needs (paths, UUIDs) is in them, so a different process can undo a dead one's work.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from corral.identity.seed import seed_content, write_seed
from corral.images.transfer import partial_marker
from corral.model import CloneMode, Identity, RecordState
from corral.ops.context import Context, HostHandle
from corral.ops.distribute import ensure_image
from corral.ops.jobs import nothing, step
from corral.ops.machines import domain_plan, machine_from_args
from corral.ops.pools import ensure_base, get_pool
from corral.ops.usage import require_room
from corral.storage.base import StorageBackend


def _on(ctx: Context, a: dict[str, Any]) -> HostHandle:
    """The host a step acts on; jobs written before there were several name none."""
    return ctx.on(a.get("host") or ctx.settings.host_name)


# -- the record --------------------------------------------------------------------------


def _forget(ctx: Context, a: dict[str, Any]) -> None:
    ctx.store.forget_machine(a["name"], a["identity"]["uuid"])


@step("machine.record", undo=_forget)
def _record(ctx: Context, a: dict[str, Any]) -> None:
    existing = ctx.store.find_machine(a["name"])
    if existing is None or existing.identity.uuid != a["identity"]["uuid"]:
        ctx.store.add_machine(machine_from_args(a), ctx.overcommit)


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


def _delete_volume(ctx: Context, a: dict[str, Any]) -> None:
    """A disk, seed or console log in the host's pool (or the local console dir), or a
    disk in the added pool ``a["pool"]``."""
    _storage(ctx, a).delete(Path(a["path"]))


def _storage(ctx: Context, a: dict[str, Any]) -> StorageBackend:
    return ctx.disk_storage(a["host"], a.get("pool"))


@step("image.ensure", undo=nothing)
def _ensure_image(ctx: Context, a: dict[str, Any]) -> None:
    """The image's base is on the host, or in the added pool ``a["pool"]`` (copied once,
    verified); kept for later clones."""
    image = ctx.store.get_image(a["image"])
    if a.get("pool") is None:
        ensure_image(ctx, _on(ctx, a), image)
        return
    ensure_base(ctx, get_pool(ctx, a["pool"]), image)


@step("disk.clone", undo=_delete_volume)
def _clone_image(ctx: Context, a: dict[str, Any]) -> None:
    """A new disk from a library image, linked (overlay) or full (copy)."""
    dest, base = Path(a["path"]), Path(a["base"])
    require_room(ctx, _on(ctx, a), f"the disk {dest.name}", pool=a.get("pool"))
    storage = _storage(ctx, a)
    storage.delete(dest)  # a crash may have left a partial one
    if CloneMode(a["mode"]) is CloneMode.LINKED:
        storage.linked_clone(base, dest, a["size"])
    else:
        storage.full_clone(base, dest, a["size"], ctx.on_progress)


@step("disk.copy", undo=_delete_volume)
def _copy_disk(ctx: Context, a: dict[str, Any]) -> None:
    """A machine's disk copied for a clone: the overlay alone (linked) or flattened (full)."""
    src, dest = Path(a["source"]), Path(a["path"])
    handle = _on(ctx, a)
    require_room(ctx, handle, f"the disk {dest.name}")
    storage = handle.storage
    storage.delete(dest)
    if CloneMode(a["mode"]) is CloneMode.FULL:
        storage.full_clone(src, dest, a["size"], ctx.on_progress)
        return
    # The copy keeps its explicit backing reference to the same read-only base, so
    # only the bytes the source machine owns are copied.
    storage.copy(src, dest)


def _delete_imported(ctx: Context, a: dict[str, Any]) -> None:
    """The imported disk, and the marker of a copy to a remote host cut short."""
    storage = _on(ctx, a).storage
    storage.delete(Path(a["path"]))
    storage.delete(partial_marker(Path(a["path"])))


@step("disk.import", undo=_delete_imported)
def _import_disk(ctx: Context, a: dict[str, Any]) -> None:
    """A foreign machine's vetted disk converted to a standalone qcow2 (ops.imports)."""
    from corral.ops.imports import convert_into_pool

    handle = _on(ctx, a)
    require_room(ctx, handle, f"the disk {Path(a['path']).name}")
    convert_into_pool(ctx, handle, a["disk"], Path(a["path"]))


@step("seed.write", undo=_delete_volume)
def _write_seed(ctx: Context, a: dict[str, Any]) -> None:
    identity = Identity(**a["identity"])
    content = seed_content(identity, tuple(a["ssh_keys"]))
    handle = _on(ctx, a)
    if handle.local:
        write_seed(Path(a["path"]), content)
        Path(a["path"]).chmod(0o644)
        return
    with tempfile.TemporaryDirectory(dir=ctx.settings.state_dir) as tmp:
        local = Path(tmp) / "seed.iso"
        write_seed(local, content)
        handle.storage.put_file(local, Path(a["path"]))


# Two names, one action: jobs already written name either.
step("disk.delete", undo=nothing)(_delete_volume)
step("file.delete", undo=nothing)(_delete_volume)


# -- the domain --------------------------------------------------------------------------


def _undefine(ctx: Context, a: dict[str, Any]) -> None:
    _on(ctx, a).driver.undefine(a["uuid"], force=True)


@step("domain.define", undo=_undefine)
def _define(ctx: Context, a: dict[str, Any]) -> None:
    handle = _on(ctx, a)
    machine = ctx.store.get_machine(a["name"])
    if handle.local:
        ctx.settings.console_dir.mkdir(parents=True, exist_ok=True)
    handle.driver.define(domain_plan(ctx, machine, handle))


@step("domain.destroy", undo=nothing)
def _destroy(ctx: Context, a: dict[str, Any]) -> None:
    _on(ctx, a).driver.destroy(a["name"])


@step("domain.undefine", undo=nothing)
def _undefine_step(ctx: Context, a: dict[str, Any]) -> None:
    _undefine(ctx, a)

