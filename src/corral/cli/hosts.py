"""corral host …"""

from __future__ import annotations

from typing import Annotated

import typer

from corral.cli.backend import HostRequest, backend, local_only
from corral.cli.common import OutputOpt, context
from corral.cli.render import (
    Output,
    details_table,
    emit,
    finish_moves,
    hosts_table,
    move_line,
    out,
)
from corral.errors import InvalidInput
from corral.model import HostPlacement
from corral.ops import hosts as host_ops

app = typer.Typer(help="Hosts that run machines.", no_args_is_help=True)

TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="host tag (repeatable)")]
RatioOpt = Annotated[float | None, typer.Option(min=0.01)]


@app.command("list")
def list_hosts(output: OutputOpt = Output.TABLE) -> None:
    """List enrolled hosts: state, capacity and what is claimed on each."""
    with backend() as b:
        rows = b.hosts()
    emit(rows, output, hosts_table(rows))


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="host name")] = "local",
    output: OutputOpt = Output.TABLE,
) -> None:
    """Show a host: CPUs, memory, storage pool, state and the accelerator that works."""
    with backend() as b:
        d = b.host(name)
    emit(d, output, details_table(d))


@app.command()
def add(
    name: Annotated[str, typer.Argument(help="a name for the host")],
    uri: Annotated[str, typer.Argument(help="libvirt URI, e.g. qemu+ssh://root@node2/system")],
    pool_path: Annotated[str | None, typer.Option(
        help=f"directory for disks on that host [default: {host_ops.DEFAULT_REMOTE_POOL}]")] = None,
    network: Annotated[str | None, typer.Option(help="isolated network for NICs")] = None,
    tag: TagOpt = None,
    cpu_ratio: RatioOpt = None,
    memory_ratio: RatioOpt = None,
    disk_ratio: RatioOpt = None,
    accelerator: Annotated[str | None, typer.Option(help="auto, kvm or tcg")] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Enrol a host by its libvirt URI; probe its CPU, memory, pool and accelerator."""
    if accelerator not in (None, "auto", "kvm", "tcg"):
        raise InvalidInput(f"'{accelerator}' is not an accelerator choice: use auto, kvm or tcg.")
    req = HostRequest(name, uri, pool_path, network,
                      HostPlacement(frozenset(tag or ()), cpu_ratio, memory_ratio, disk_ratio),
                      accelerator)  # type: ignore[arg-type]
    with backend() as b:
        d = b.add_host(req)
    emit(d, output, details_table(d))


@app.command("set")
def set_placement(
    name: Annotated[str, typer.Argument(help="host name")],
    tag: TagOpt = None,
    cpu_ratio: RatioOpt = None,
    memory_ratio: RatioOpt = None,
    disk_ratio: RatioOpt = None,
) -> None:
    """Replace a host's tags and overcommit ratios (unset ratios follow the global ones)."""
    with backend() as b:
        b.set_host_placement(
            name, HostPlacement(frozenset(tag or ()), cpu_ratio, memory_ratio, disk_ratio))
    out.print(f"Host [bold]{name}[/] updated.")


@app.command()
def maintenance(
    name: Annotated[str, typer.Argument(help="host name")],
    on: Annotated[str, typer.Argument(help="on or off", metavar="on|off")],
) -> None:
    """Put a host in maintenance (it receives no new machines) or take it out."""
    if on not in ("on", "off"):
        raise InvalidInput(f"'{on}' is neither on nor off.")
    with backend() as b:
        host = b.set_maintenance(name, on == "on")
    out.print(f"Host [bold]{name}[/] is {host['state']}.")


@app.command()
def evacuate(
    name: Annotated[str, typer.Argument(help="host name")],
    output: OutputOpt = Output.TABLE,
) -> None:
    """Put a host in maintenance and move every machine on it elsewhere.

    Running machines move live, stopped ones cold; each goes where the scheduler
    places it then, so anti-affinity and capacity hold. Exits 1 if any stayed.
    """
    with backend() as b:
        rows = b.evacuate(name, lambda r: out.print(move_line(r)) if output is Output.TABLE
                          else None)
    if not finish_moves(rows, output, f"Host [bold]{name}[/] is empty and in maintenance."):
        raise typer.Exit(1)


@app.command()
def remove(name: Annotated[str, typer.Argument(help="host name")]) -> None:
    """Forget a host; refused while it holds machines. Nothing on the host is deleted."""
    with backend() as b:
        b.remove_host(name)
    out.print(f"Removed host [bold]{name}[/].")


@app.command()
def check() -> None:
    """Ask every host whether it answers; mark those that do not as down."""
    with backend() as b:
        changes, hosts = b.check_hosts()
    for c in changes:
        out.print(f"{c['host']}: {c['before']} → {c['after']} ({c['note']})", highlight=False)
    for h in hosts:
        note = h.get("state_note")
        out.print(f"{h['name']}: {h['state']}" + (f" ({note})" if note else ""), highlight=False)


@app.command()
def probe(name: Annotated[str, typer.Argument(help="host name")] = "local") -> None:
    """Probe a host again: accelerator (a guest must boot with it) and CPU score."""
    local_only("host probe")
    with context() as ctx:
        host = host_ops.probe(ctx, name)
    score = f"{host.cpu_score:g}" if host.cpu_score is not None else "not measured"
    typer.echo(f"{host.name}: {host.accelerator.value} — {host.accelerator_note} "
               f"CPU score: {score}")
