"""corral image …"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from corral.cli.backend import ImportRequest, backend, local_only
from corral.cli.common import OutputOpt, context
from corral.cli.render import Output, details_table, emit, err, images_table, out, progress_bar
from corral.model import ImageFormat
from corral.ops import images as ops

app = typer.Typer(help="The image library: read-only bases that machines clone.",
                  no_args_is_help=True)


@app.command("list")
def list_images(output: OutputOpt = Output.TABLE) -> None:
    """List the images in the library."""
    with backend(enroll=False) as b:
        rows = b.images()
    emit(rows, output, images_table(rows))


@app.command()
def show(name: str, output: OutputOpt = Output.TABLE) -> None:
    """Show an image: format, size, checksum and how it boots."""
    with backend(enroll=False) as b:
        d = b.image(name)
    emit(d, output, details_table(d))


@app.command("import")
def import_image(
    file: Annotated[Path, typer.Argument(help="qcow2, raw, vmdk or vdi image")],
    name: Annotated[str | None, typer.Option(help="name in the library")] = None,
    fmt: Annotated[
        ImageFormat | None,
        typer.Option("--format", help="declared format; checked against the file"),
    ] = None,
    kernel: Annotated[Path | None, typer.Option(help="kernel for direct kernel boot")] = None,
    initrd: Annotated[Path | None, typer.Option(help="initrd for direct kernel boot")] = None,
    cmdline: Annotated[str, typer.Option(help="kernel command line")] = "",
) -> None:
    """Inspect an image and import it as a read-only qcow2 base."""
    request = ImportRequest(file, name, fmt, kernel, initrd, cmdline)
    with backend(enroll=False) as b, progress_bar(f"importing {file.name}") as progress:
        image = b.import_image(request, progress)
    out.print(f"Imported [bold]{image['name']}[/] ({image['source_format']}, sha256 "
              f"{image['sha256'][:12]}…).")


@app.command()
def capture(
    machine: Annotated[str, typer.Argument(help="a stopped machine")],
    name: Annotated[str, typer.Option("--name", help="the new image's name")],
    seal: Annotated[
        bool,
        typer.Option(
            "--seal/--no-seal",
            help="remove the machine's identity (machine-id, SSH host keys, cloud-init "
            "state, DHCP leases) from the copy, so clones do not share it",
        ),
    ] = True,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Capture a stopped machine as a new image (a template); the machine is not changed."""
    with backend(enroll=False) as b, progress_bar(f"capturing {machine}") as progress:
        image = b.capture_image(machine, name, seal=seal, progress=progress)
    if output is not Output.TABLE:
        emit(image, output, details_table(image))
        return
    if not seal:
        out.print(f"Not sealed: clones of [bold]{name}[/] share the identity of {machine} "
                  "(machine-id, SSH host keys).")
    elif image["seal_report"]:
        out.print(f"Sealed the copy of {machine}:")
        for line in image["seal_report"]:
            out.print(f"  {escape(line)}")
    else:
        out.print(f"Sealed the copy of {machine}: it held no identity to remove.")
    out.print(f"Captured [bold]{machine}[/] as image [bold]{image['name']}[/] (sha256 "
              f"{image['sha256'][:12]}…).")


@app.command()
def delete(name: str) -> None:
    """Delete an image; refused while a machine's disk depends on it."""
    with backend(enroll=False) as b:
        b.delete_image(name)
    out.print(f"Deleted image [bold]{name}[/].")


@app.command("build-appliance")
def build_appliance(
    force: Annotated[bool, typer.Option(help="rebuild even if it exists")] = False,
) -> None:
    """Build the built-in appliance (Debian cloud kernel + busybox) and import it."""
    local_only("image build-appliance")
    with context(enroll=False) as ctx:
        image = ops.build_appliance(ctx, log=lambda s: err.print(f"[dim]{s}[/]"), force=force)
    out.print(f"Appliance image [bold]{image.name}[/] is ready ({image.sha256[:12]}…).")
