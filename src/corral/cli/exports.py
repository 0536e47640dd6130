"""corral export …"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from corral.cli.backend import is_remote
from corral.cli.common import context
from corral.cli.render import err, out
from corral.errors import InvalidInput
from corral.model.units import format_size
from corral.ops.exports import ExportFormat, export_machine


def export(
    name: Annotated[str, typer.Argument(help="the machine to export (it must be stopped)")],
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", help="ova, libvirt (XML + qcow2), qcow2 or vmdk (+ .vmx)"),
    ],
    output_dir: Annotated[
        Path, typer.Option("--output", help="folder to write into (it must exist)")
    ] = Path(),
) -> None:
    """Export a stopped machine in an open format, as files that stand without Corral."""
    if is_remote():
        raise InvalidInput(
            "'corral export' writes files on the machine it runs on, so it works only "
            "against the local store, not through a server.",
            hint="Run it on the server's host with --local (or after 'corral logout').",
        )
    with context(enroll=False) as ctx, Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
        console=err, transient=True,
    ) as bar:
        task = bar.add_task(f"exporting {name}", total=100)

        def progress(what: str, pct: float) -> None:
            bar.update(task, description=what, completed=pct)

        result = export_machine(ctx, name, fmt, output_dir, progress)
    # --output names the folder here, so there is no -o json: the table is the report.
    table = Table("FILE", "WHAT", "SIZE", box=None)
    for f in result.files:
        table.add_row(str(f.path), f.role, format_size(f.size))
    total = format_size(sum(f.size for f in result.files))
    out.print(f"Exported [bold]{name}[/] as {result.format.value} ({total} on disk):")
    out.print(table)
