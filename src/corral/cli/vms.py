"""corral vm …"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from corral.cli.common import OutputOpt, context
from corral.cli.render import (
    Output,
    details_table,
    emit,
    err,
    error,
    machine_dict,
    machines_table,
    out,
)
from corral.errors import CorralError, InvalidInput
from corral.model import CloneMode, MachineSpec
from corral.model.units import parse_size
from corral.ops import lifecycle, provision, reconcile
from corral.ops.context import Context

app = typer.Typer(help="Machines: create, inspect, power, clone, delete.", no_args_is_help=True)


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="machine name; NAME-1 … NAME-N with --count")],
    image: Annotated[str, typer.Option(help="library image to clone")],
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
    output: OutputOpt = Output.TABLE,
) -> None:
    """Create machines from an image, each with its own UUID, MAC, hostname and seed."""
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
    )
    if wait and no_start:
        raise InvalidInput("--wait and --no-start contradict each other; choose one.")
    with context() as ctx:
        result = provision.create_machines(ctx, spec, count)
        if wait and result.created:
            _wait(ctx, [m.name for m in result.created], timeout or ctx.settings.ready_timeout)
        statuses = [lifecycle.status(ctx, m) for m in result.created]
        emit([machine_dict(s) for s in statuses], output, machines_table(statuses))
    for failed_name, exc in result.failed.items():
        error(f"{failed_name}: {exc}")
    if result.failed:
        raise typer.Exit(next(iter(result.failed.values())).exit_code)


def _wait(ctx: Context, names: list[str], timeout: float) -> None:
    began = time.monotonic()
    states = dict.fromkeys(names, "booting")
    took: dict[str, float] = {}

    def table() -> Table:
        t = Table("MACHINE", "STATUS", "SECONDS", box=None)
        for n in names:
            seconds = took.get(n, time.monotonic() - began)
            style = "green" if states[n] == "ready" else "yellow"
            t.add_row(n, f"[{style}]{states[n]}[/]", f"{seconds:5.1f}")
        return t

    def update(n: str, status: str) -> None:
        states[n] = status
        took[n] = time.monotonic() - began
        live.update(table())

    with Live(table(), console=err, refresh_per_second=4, transient=False) as live:
        provision.wait_ready(ctx, names, timeout, update)
        live.update(table())


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
    with context() as ctx:
        statuses = [lifecycle.status(ctx, m) for m in ctx.store.list_machines()]
        emit([machine_dict(s) for s in statuses], output, machines_table(statuses))


@app.command()
def show(name: str, output: OutputOpt = Output.TABLE) -> None:
    """Show one machine: state, identity, image and disk usage."""
    with context() as ctx:
        d = machine_dict(lifecycle.status(ctx, ctx.store.get_machine(name)))
        emit(d, output, details_table(d))


@app.command()
def start(name: str) -> None:
    """Start a stopped machine."""
    with context() as ctx:
        lifecycle.start(ctx, name)
    out.print(f"Started [bold]{name}[/].")


@app.command()
def stop(
    name: str,
    timeout: Annotated[float | None, typer.Option(help="seconds before forcing it off")] = None,
) -> None:
    """Shut down gracefully (ACPI); power off after the timeout."""
    with context() as ctx:
        graceful = lifecycle.stop(ctx, name, timeout or ctx.settings.stop_timeout)
    out.print(f"Stopped [bold]{name}[/]" + ("." if graceful else " (forced after the timeout)."))


@app.command()
def reboot(name: str) -> None:
    """Reboot gracefully (ACPI)."""
    with context() as ctx:
        lifecycle.reboot(ctx, name)
    out.print(f"Rebooting [bold]{name}[/].")


@app.command()
def kill(name: str) -> None:
    """Power off at once, like pulling the plug."""
    with context() as ctx:
        lifecycle.kill(ctx, name)
    out.print(f"Powered off [bold]{name}[/].")


@app.command()
def delete(
    names: Annotated[list[str], typer.Argument(help="machines to delete")],
    force: Annotated[bool, typer.Option(help="power off running machines first")] = False,
) -> None:
    """Delete machines: domain, disk, seed and record."""
    failures: list[CorralError] = []
    with context() as ctx:
        for name in names:
            try:
                lifecycle.delete(ctx, name, force=force)
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
    with context() as ctx:
        machine = lifecycle.clone(ctx, source, new, mode)
        d = machine_dict(lifecycle.status(ctx, machine))
        emit(d, output, details_table(d))


@app.command()
def console(name: str) -> None:
    """Attach to the serial console (Ctrl-] detaches)."""
    with context() as ctx:
        ctx.store.get_machine(name)
        err.print(f"Connected to {name}; Ctrl-] detaches.", highlight=False)
        ctx.driver.attach_console(name, os.dup(0), os.dup(1))


@app.command()
def adopt(name: str, output: OutputOpt = Output.TABLE) -> None:
    """Take over a domain defined outside Corral (see 'corral sync')."""
    with context() as ctx:
        machine = reconcile.adopt(ctx, name)
        d = machine_dict(lifecycle.status(ctx, machine))
        emit(d, output, details_table(d))
