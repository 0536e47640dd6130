"""corral host …"""

from __future__ import annotations

from typing import Annotated

import typer

from corral.cli.common import OutputOpt, context
from corral.cli.render import Output, details_table, emit, host_dict, hosts_table
from corral.errors import NotFound
from corral.ops.hosts import reprobe

app = typer.Typer(help="Hosts that run machines.", no_args_is_help=True)


@app.command("list")
def list_hosts(output: OutputOpt = Output.TABLE) -> None:
    """List enrolled hosts (the local host is enrolled on first use)."""
    with context() as ctx:
        hosts = ctx.store.list_hosts()
        emit([host_dict(h) for h in hosts], output, hosts_table(hosts))


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="host name")] = "local",
    output: OutputOpt = Output.TABLE,
) -> None:
    """Show a host: CPUs, memory, storage pool and the accelerator that works."""
    with context() as ctx:
        host = ctx.store.find_host(name)
        if host is None:
            raise NotFound("host", name, hint="'corral host list' shows the enrolled hosts.")
        d = host_dict(host)
        emit(d, output, details_table(d))


@app.command()
def probe() -> None:
    """Boot a test guest again to decide whether KVM really works here."""
    with context() as ctx:
        host = reprobe(ctx)
        typer.echo(f"{host.name}: {host.accelerator.value} — {host.accelerator_note}")
