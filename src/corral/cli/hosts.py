"""corral host …"""

from __future__ import annotations

from typing import Annotated

import typer

from corral.cli.backend import backend, local_only
from corral.cli.common import OutputOpt, context
from corral.cli.render import Output, details_table, emit, hosts_table
from corral.ops.hosts import reprobe

app = typer.Typer(help="Hosts that run machines.", no_args_is_help=True)


@app.command("list")
def list_hosts(output: OutputOpt = Output.TABLE) -> None:
    """List enrolled hosts (the local host is enrolled on first use)."""
    with backend() as b:
        rows = b.hosts()
    emit(rows, output, hosts_table(rows))


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="host name")] = "local",
    output: OutputOpt = Output.TABLE,
) -> None:
    """Show a host: CPUs, memory, storage pool and the accelerator that works."""
    with backend() as b:
        d = b.host(name)
    emit(d, output, details_table(d))


@app.command()
def probe() -> None:
    """Boot a test guest again to decide whether KVM really works here."""
    local_only("host probe")
    with context() as ctx:
        host = reprobe(ctx)
        typer.echo(f"{host.name}: {host.accelerator.value} — {host.accelerator_note}")
