"""corral job …: what Corral did, step by step, and how each job ended."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from corral.cli.common import OutputOpt, context
from corral.cli.render import Output, emit
from corral.model import Job, JobState

app = typer.Typer(help="Jobs: provision, clone, delete and import, step by step.",
                  no_args_is_help=True)

_STYLE = {"succeeded": "green", "running": "yellow", "failed": "red", "rolled-back": "red"}


def job_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "target": job.target,
        "state": job.state.value,
        "error": job.error,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "steps": [{"name": s.name, "state": s.state.value} for s in job.steps],
    }


@app.command("list")
def list_jobs(
    state: Annotated[JobState | None, typer.Option(help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(help="how many, newest first")] = 20,
    output: OutputOpt = Output.TABLE,
) -> None:
    """List recent jobs, newest first."""
    with context(enroll=False) as ctx:
        jobs = ctx.store.list_jobs(state, limit=limit)
    table = Table("ID", "KIND", "TARGET", "STATE", "STARTED", "ERROR", box=None)
    for j in jobs:
        table.add_row(str(j.id), j.kind, j.target,
                      f"[{_STYLE.get(j.state.value, 'white')}]{j.state.value}[/]",
                      j.created_at.strftime("%Y-%m-%d %H:%M:%S"), j.error or "")
    emit([job_dict(j) for j in jobs], output, table)


@app.command()
def show(job_id: int, output: OutputOpt = Output.TABLE) -> None:
    """Show one job and the state of each of its steps."""
    with context(enroll=False) as ctx:
        job = ctx.store.get_job(job_id)
    table = Table("STEP", "STATE", box=None, title=f"job {job.id}: {job.kind} {job.target} "
                  f"({job.state.value})")
    for st in job.steps:
        table.add_row(st.name, st.state.value)
    emit(job_dict(job), output, table)
