"""corral import ova … : an OVF package, unpacked safely, then imported like any machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from corral.cli.backend import local_only
from corral.cli.common import OutputOpt, context
from corral.cli.imports import HostOpt, KernelOpt, NameOpt, NewIdentityOpt, NoStartOpt, app, report
from corral.cli.render import Output, err
from corral.errors import InvalidInput, NotFound
from corral.images.ova import unpacked_ova
from corral.ops.imports import import_machine


@app.command("ova")
def import_ova(
    file: Annotated[Path, typer.Argument(help="the .ova package (OVF 1.x or 2.x)")],
    name: NameOpt = None,
    host: HostOpt = None,
    kernel_from: KernelOpt = None,
    new_identity: NewIdentityOpt = False,
    no_start: NoStartOpt = False,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Import a machine from an OVA (VMware, VirtualBox, Corral's own export).

    Every file is checked against the package's manifest before it is used; members
    that are links, climb out of the package or are not listed are refused. UUID and
    MAC are kept unless --new-identity.
    """
    local_only("import ova")
    if not file.is_file():
        if not file.exists():
            raise NotFound("file", str(file))
        raise InvalidInput(f"'{file}' is not a file; name the .ova package.")
    with context() as ctx, Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
        console=err, transient=True,
    ) as bar:
        task = bar.add_task(f"checking {file.name}", total=None)
        # The staging folder sits in Corral's state dir, beside the library it feeds.
        limit = ctx.settings.max_upload_bytes  # the same cap as an upload to the server
        with unpacked_ova(file, ctx.settings.state_dir, max_bytes=limit) as unpacked:
            for note in unpacked.notes:
                err.print(f"[yellow]{note}[/]", highlight=False)
            bar.update(task, description=f"converting the disk of {file.name}", total=100)
            ctx.on_progress = lambda pct: bar.update(task, completed=pct)
            result = import_machine(
                ctx, unpacked.machine(), unpacked.folder, name=name, host=host,
                kernel_image=kernel_from, new_identity=new_identity, start=not no_start,
                source=file.name,
            )
    report(result, output)
