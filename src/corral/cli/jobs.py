"""corral job …: what Corral did, step by step, and how each job ended."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from corral.cli.backend import backend
from corral.cli.common import OutputOpt
from corral.cli.render import Output, emit
from corral.model import JobState

app = typer.Typer(help="Jobs: provision, clone, delete and import, step by step.",
                  no_args_is_help=True)

_STYLE = {"succeeded": "green", "running": "yellow", "failed": "red", "rolled-back": "red"}


@app.command("list")
def list_jobs(
    state: Annotated[JobState | None, typer.Option(help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(help="how many, newest first")] = 20,
    output: OutputOpt = Output.TABLE,
) -> None:
    """List recent jobs, newest first."""
    with backend(enroll=False) as b:
        jobs = b.jobs(state, limit)
    table = Table("ID", "KIND", "TARGET", "STATE", "STARTED", "ERROR", box=None)
    for j in jobs:
        started = datetime.fromisoformat(j["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(str(j["id"]), j["kind"], j["target"],
                      f"[{_STYLE.get(j['state'], 'white')}]{j['state']}[/]",
                      started, j["error"] or "")
    emit(jobs, output, table)


@app.command()
def show(job_id: int, output: OutputOpt = Output.TABLE) -> None:
    """Show one job and the state of each of its steps."""
    with backend(enroll=False) as b:
        job = b.job(job_id)
    table = Table("STEP", "STATE", box=None, title=f"job {job['id']}: {job['kind']} "
                  f"{job['target']} ({job['state']})")
    for st in job["steps"]:
        table.add_row(st["name"], st["state"])
    emit(job, output, table)
