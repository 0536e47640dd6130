"""corral vm …"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from corral.cli.backend import backend, local_only
from corral.cli.common import OutputOpt, context
from corral.cli.placement import (
    AffinityOpt,
    AntiAffinityOpt,
    FastOpt,
    GroupOpt,
    HostOpt,
    SoftOpt,
    TagOpt,
    placement_hints,
    placements_table,
)
from corral.cli.render import (
    Output,
    details_table,
    emit,
    err,
    error,
    machine_dict,
    machines_table,
    out,
    progress_bar,
)
from corral.errors import CorralError, InvalidInput
from corral.model import CloneMode, MachineSpec
from corral.model.units import parse_size
from corral.ops import lifecycle, reconcile
from corral.ops.snapshot_clone import SnapshotRef

app = typer.Typer(help="Machines: create, inspect, power, clone, delete.", no_args_is_help=True)


@app.command()
def create(
    cli: typer.Context,
    name: Annotated[str, typer.Argument(help="machine name; NAME-1 … NAME-N with --count")],
    image: Annotated[str | None, typer.Option(help="library image to clone")] = None,
    from_snapshot: Annotated[
        str | None, typer.Option(
            "--from-snapshot", metavar="MACHINE@SNAPSHOT",
            help="the disk of MACHINE as it was at SNAPSHOT (instead of --image)")
    ] = None,
    count: Annotated[int, typer.Option(help="how many machines")] = 1,
    cpus: Annotated[int, typer.Option(help="vCPUs per machine")] = 1,
    memory: Annotated[str, typer.Option(help="memory per machine, e.g. 512M")] = "256M",
    disk_size: Annotated[str | None, typer.Option(help="disk size (default: the image's)")] = None,
    ssh_key: Annotated[
        list[Path] | None, typer.Option(help="public key file for root (repeatable)")
    ] = None,
    clone: Annotated[CloneMode, typer.Option(help="linked (copy-on-write) or full copy")] = (
        CloneMode.LINKED
    ),
    no_start: Annotated[bool, typer.Option("--no-start", help="define only")] = False,
    wait: Annotated[bool, typer.Option(help="wait until every guest says it is ready")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait with --wait")] = None,
    host: HostOpt = None,
    tag: TagOpt = None,
    group: GroupOpt = None,
    affinity: AffinityOpt = None,
    anti_affinity: AntiAffinityOpt = None,
    soft: SoftOpt = False,
    fast: FastOpt = False,
    pool: Annotated[
        str | None, typer.Option(help="storage pool for the disks ('corral pool list'); "
                                 "it decides the host")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show where each machine would go; create nothing")
    ] = False,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Create machines from an image, each with its own UUID, MAC, hostname and seed.

    Without --host, each machine goes to the most fitting host of the pool. With
    --from-snapshot, one machine whose disk is another's as it was at a snapshot, on
    that machine's host, with its hardware and keys (a linked clone of the same base
    when it is one).
    """
    if (image is None) == (from_snapshot is None):
        raise InvalidInput("Give exactly one of --image and --from-snapshot.")
    if wait and no_start:
        raise InvalidInput("--wait and --no-start contradict each other; choose one.")
    if from_snapshot is not None:
        _create_from_snapshot(cli, name, from_snapshot, clone, start=not no_start, wait=wait,
                              timeout=timeout, output=output)
        return
    assert image is not None
    keys = tuple(_read_key(p) for p in ssh_key or [])
    spec = MachineSpec(
        name=name,
        image=image,
        cpus=cpus,
        memory_bytes=parse_size(memory, what="memory size"),
        disk_bytes=parse_size(disk_size, what="disk size") if disk_size else None,
        clone=clone,
        ssh_keys=keys,
        start=not no_start,
        placement=placement_hints(host, tag, group, affinity, anti_affinity, soft, fast),
        pool=pool,
    )
    if dry_run:
        with backend() as b:
            rows = b.plan_placement(spec, count)
        emit(rows, output, placements_table(rows))
        return
    with backend() as b:
        result = b.create_machines(spec, count, wait=wait, timeout=timeout)
        emit(result.created, output, machines_table(result.created))
    for failed_name, exc in result.failed.items():
        error(f"{failed_name}: {exc}")
    if result.failed:
        raise typer.Exit(next(iter(result.failed.values())).exit_code)


_NOT_WITH_SNAPSHOT = ("count", "cpus", "memory", "disk_size", "ssh_key", "host", "tag", "group",
                      "affinity", "anti_affinity", "soft", "fast", "pool", "dry_run")
"""What ``--from-snapshot`` takes from the source machine (or does not do)."""


def _create_from_snapshot(
    cli: typer.Context, name: str, ref: str, clone: CloneMode, *, start: bool, wait: bool,
    timeout: float | None, output: Output,
) -> None:
    # By the source's name: typer carries a click of its own, with its own enum.
    sources = {p: cli.get_parameter_source(p) for p in _NOT_WITH_SNAPSHOT}
    given = [f"--{p.replace('_', '-')}" for p, source in sources.items()
             if source is not None and source.name != "DEFAULT"]
    if given:
        raise InvalidInput(
            f"{' and '.join(given)} cannot be given with --from-snapshot: the new machine "
            "is one, on its source's host, with the source's hardware and keys.")
    parsed = SnapshotRef.parse(ref)
    with backend() as b:
        row = b.create_from_snapshot(parsed, name, clone, start=start, wait=wait,
                                     timeout=timeout)
    emit([row], output, machines_table([row]))


def _read_key(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"Cannot read the SSH key {path}: {exc.strerror}.") from exc
    if not key.startswith(("ssh-", "ecdsa-", "sk-")) or "\n" in key:
        raise InvalidInput(f"{path} does not hold one OpenSSH public key.")
    return key


@app.command("list")
def list_machines(output: OutputOpt = Output.TABLE) -> None:
    """List machines with state, identity and the disk bytes each owns."""
    with backend() as b:
        rows = b.machines()
    emit(rows, output, machines_table(rows))


@app.command()
def show(name: str, output: OutputOpt = Output.TABLE) -> None:
    """Show one machine: state, identity, image and disk usage."""
    with backend() as b:
        d = b.machine(name)
    emit(d, output, details_table(d))


@app.command()
def start(name: str) -> None:
    """Start a stopped machine."""
    with backend() as b:
        b.start(name)
    out.print(f"Started [bold]{name}[/].")


@app.command()
def stop(
    name: str,
    timeout: Annotated[float | None, typer.Option(help="seconds before forcing it off")] = None,
) -> None:
    """Shut down gracefully (ACPI); power off after the timeout."""
    with backend() as b:
        graceful = b.stop(name, timeout)
    out.print(f"Stopped [bold]{name}[/]" + ("." if graceful else " (forced after the timeout)."))


@app.command()
def reboot(name: str) -> None:
    """Reboot gracefully (ACPI)."""
    with backend() as b:
        b.reboot(name)
    out.print(f"Rebooting [bold]{name}[/].")


@app.command()
def kill(name: str) -> None:
    """Power off at once, like pulling the plug."""
    with backend() as b:
        b.kill(name)
    out.print(f"Powered off [bold]{name}[/].")


@app.command()
def delete(
    names: Annotated[list[str], typer.Argument(help="machines to delete")],
    force: Annotated[bool, typer.Option(help="power off running machines first")] = False,
) -> None:
    """Delete machines: domain, disk, seed and record."""
    failures: list[CorralError] = []
    with backend() as b:
        for name in names:
            try:
                b.delete_machine(name, force=force)
                out.print(f"Deleted [bold]{name}[/].")
            except CorralError as exc:
                failures.append(exc)
                error(exc)
    if failures:
        raise typer.Exit(failures[0].exit_code)


@app.command()
def clone(
    source: str,
    new: str,
    mode: Annotated[CloneMode, typer.Option("--clone", help="linked or full disk copy")] = (
        CloneMode.LINKED
    ),
    output: OutputOpt = Output.TABLE,
) -> None:
    """Clone a stopped machine into a new one with a new name, UUID, MAC and seed."""
    with backend() as b:
        original = b.machine(source)
        d = b.clone_machine(source, new, mode)
    emit(d, output, details_table(d))
    if output is Output.TABLE:
        # A clone is a machine of its own: say plainly which identity it did not keep.
        changed = [f"{key} {original[key]} → {d[key]}" for key in ("hostname", "uuid", "mac")
                   if original[key] != d[key]]
        out.print("New identity: " + "; ".join(changed) + ".")


@app.command()
def migrate(
    name: str,
    to: Annotated[str | None, typer.Option("--to", help="target host (default: the "
                                           "scheduler's pick)")] = None,
    live: Annotated[bool, typer.Option("--live", help="move a running machine without "
                                       "stopping it")] = False,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Move a machine to another host: stopped (cold), or running with --live.

    Its disk's own bytes travel (a linked clone's base is copied to the target once),
    checked by sha256; the source copy goes only once the target holds the machine.
    UUID, MAC and name stay. On failure the machine is as it was, where it was.
    """
    with backend() as b, progress_bar(f"moving {name}") as progress:
        moved = b.migrate(name, to, live, progress)
    if output is Output.JSON:
        emit(moved, output, details_table(moved))
        return
    how = "live" if moved["live"] else "stopped"
    storage = "shared storage, memory only" if moved["shared_storage"] else "disk copied"
    out.print(f"Moved [bold]{name}[/] ({how}, {storage}) from {moved['source']} to "
              f"[bold]{moved['target']}[/] in {moved['seconds']:.1f} s.")


snapshot = typer.Typer(help="Snapshots of a machine: its disk, and its memory when it runs.",
                       no_args_is_help=True)
app.add_typer(snapshot, name="snapshot")


@snapshot.command("create")
def snapshot_create(
    name: str,
    snap: Annotated[str, typer.Argument(metavar="SNAPSHOT", help="the snapshot's name")],
    description: Annotated[str | None, typer.Option(help="a note kept with it")] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Snapshot a machine: running, with its memory (a revert resumes it where it was);
    stopped, its disk."""
    with backend() as b:
        made = b.create_snapshot(name, snap, description)
    what = "disk and memory" if made["memory"] else "disk"
    emit(made, output, details_table(made))
    if output is Output.TABLE:
        out.print(f"Took snapshot [bold]{snap}[/] of {name} ({what}).")


@snapshot.command("list")
def snapshot_list(name: str, output: OutputOpt = Output.TABLE) -> None:
    """A machine's snapshots, oldest first, each with its parent; * marks the current one."""
    with backend() as b:
        rows = b.snapshots(name)
    t = Table("", "SNAPSHOT", "PARENT", "TAKEN", "OF", "DESCRIPTION", box=None)
    for r in rows:
        t.add_row("*" if r["current"] else "", r["name"], r["parent"] or "-",
                  r["created_at"], "disk+memory" if r["memory"] else "disk",
                  r["description"] or "")
    emit(rows, output, t)


@snapshot.command("revert")
def snapshot_revert(
    name: str,
    snap: Annotated[str, typer.Argument(metavar="SNAPSHOT")],
) -> None:
    """Put a machine back as it was at a snapshot; what it wrote since is lost."""
    with backend() as b:
        reverted = b.revert_snapshot(name, snap)
    how = "running where it was" if reverted["memory"] else "its disk as it was"
    out.print(f"Reverted [bold]{name}[/] to {snap} ({how}).")


@snapshot.command("delete")
def snapshot_delete(
    name: str,
    snap: Annotated[str, typer.Argument(metavar="SNAPSHOT")],
) -> None:
    """Delete a snapshot; its children keep theirs, the machine's data is untouched."""
    with backend() as b:
        b.delete_snapshot(name, snap)
    out.print(f"Deleted snapshot {snap} of [bold]{name}[/].")


@app.command()
def console(name: str) -> None:
    """Attach to the serial console (Ctrl-] detaches)."""
    local_only("vm console")
    with context() as ctx:
        driver = ctx.on(ctx.store.get_machine(name).host).driver
        err.print(f"Connected to {name}; Ctrl-] detaches.", highlight=False)
        driver.attach_console(name, os.dup(0), os.dup(1))


@app.command()
def adopt(name: str, output: OutputOpt = Output.TABLE) -> None:
    """Take over a domain defined outside Corral (see 'corral sync')."""
    local_only("vm adopt")
    with context() as ctx:
        machine = reconcile.adopt(ctx, name)
        d = machine_dict(lifecycle.status(ctx, machine))
        emit(d, output, details_table(d))
