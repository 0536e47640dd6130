"""The ``corral`` command. Errors end here: one sentence and an exit code, no traceback."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

import corral.cli.exports
import corral.cli.ova  # registers "corral import ova" on the import app
import corral.cli.pools  # registers "corral pool add|list|show|remove"
from corral.cli import accounts, hosts, images, imports, jobs, login, placement, server, vms
from corral.cli.backend import OPTIONS, local_only
from corral.cli.common import OutputOpt, context
from corral.cli.render import Output, emit, err, error
from corral.errors import CorralError, InvalidInput
from corral.ops import reconcile

app = typer.Typer(
    help="Corral: one console over every machine a data center runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(hosts.app, name="host")
app.add_typer(images.app, name="image")
app.add_typer(vms.app, name="vm")
app.add_typer(placement.app, name="placement")
app.add_typer(placement.pool, name="pool")
app.add_typer(jobs.app, name="job")
app.add_typer(imports.app, name="import")
app.add_typer(accounts.users, name="user")
app.add_typer(accounts.projects, name="project")
app.add_typer(accounts.tokens, name="token")
app.command()(server.serve)
app.command("export")(corral.cli.exports.export)
app.command()(login.login)
app.command()(login.logout)


@app.callback()
def options(
    server: Annotated[
        str | None,
        typer.Option("--server", envvar="CORRAL_SERVER", show_envvar=True,
                     help="talk to this Corral server (URL) instead of the local store"),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="use the local store even when logged in")
    ] = False,
) -> None:
    """Corral: one console over every machine a data center runs.

    After 'corral login' (or with --server), commands run on that server.
    """
    if server and local:
        raise InvalidInput("--server and --local contradict each other; choose one.")
    OPTIONS.server = server or None
    OPTIONS.local = local


@app.command()
def sync(output: OutputOpt = Output.TABLE) -> None:
    """Reconcile the store with libvirt and report every difference."""
    local_only("sync")
    from rich.table import Table

    with context() as ctx:
        report = reconcile.sync(ctx)
    rows = (
        [{"name": n, "status": "unmanaged"} for n in report.unmanaged]
        + [{"name": n, "status": "missing"} for n in report.missing]
        + [{"name": n, "status": "returned"} for n in report.returned]
        + [{"name": n, "status": "unreachable"} for n in report.unreachable]
    )
    table = Table("NAME", "STATUS", "WHAT TO DO", box=None)
    advice = {
        "unmanaged": "defined outside Corral: 'corral vm adopt NAME' takes it over",
        "missing": "its domain is gone from the host; the record is kept",
        "returned": "its domain is back; marked ready again",
        "unreachable": "a host that is down or did not answer: its machines were not checked",
    }
    for row in rows:
        table.add_row(row["name"], row["status"], advice[row["status"]])
    if output is Output.TABLE and not rows:
        err.print("In sync: every record has its domain and every domain its record.")
        return
    emit(rows, output, table)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        app()  # standalone: Typer reports usage errors and exits with their code
    except CorralError as exc:
        error(exc)
        sys.exit(exc.exit_code)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        error(f"configuration value '{where}' is invalid: {first['msg']}.")
        sys.exit(2)
