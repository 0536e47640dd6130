"""corral import … : machines from VMware and VirtualBox, physical disks into the library.

Local only for now: the machine's files are read where the command runs, and a server
would need them uploaded first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from corral.cli.backend import local_only
from corral.cli.common import OutputOpt, context
from corral.cli.render import Output, emit, err, out
from corral.errors import InvalidInput, NotFound, StorageError
from corral.formats.foreign import ForeignMachine
from corral.formats.vbox import MAX_VBOX_BYTES, parse_vbox
from corral.formats.vmx import MAX_VMX_BYTES, parse_vmx
from corral.model.units import format_size, parse_size
from corral.ops import imports as ops
from corral.ops.context import Context

app = typer.Typer(
    help="Bring machines from VMware and VirtualBox, and physical disks, into Corral.",
    no_args_is_help=True,
)

NameOpt = Annotated[str | None, typer.Option(help="machine name (default: from the file)")]
HostOpt = Annotated[str | None, typer.Option(help="host to import to (default: placed)")]
KernelOpt = Annotated[
    str | None,
    typer.Option("--kernel-from", help="boot the kernel and initrd of this library image"),
]
AllowOpt = Annotated[
    list[Path] | None,
    typer.Option("--allow-path",
                 help="a file or folder outside the machine's folder its disks may read "
                      "(repeatable)"),
]
NewIdentityOpt = Annotated[
    bool, typer.Option("--new-identity", help="new UUID and MAC instead of the source's")
]
NoStartOpt = Annotated[bool, typer.Option("--no-start", help="define only; do not start")]
CpusOpt = Annotated[int | None, typer.Option(help="vCPUs (default: the file's)")]
MemoryOpt = Annotated[str | None, typer.Option(help="memory, e.g. 1G (default: the file's)")]


@app.command("vmx")
def import_vmx(
    file: Annotated[Path, typer.Argument(help="the machine's .vmx file")],
    name: NameOpt = None,
    host: HostOpt = None,
    kernel_from: KernelOpt = None,
    allow_path: AllowOpt = None,
    new_identity: NewIdentityOpt = False,
    no_start: NoStartOpt = False,
    cpus: CpusOpt = None,
    memory: MemoryOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Import a VMware machine (Workstation, Player, Fusion, ESXi) from its .vmx file.

    Its first disk is converted to qcow2; UUID and MAC are kept unless --new-identity.
    """
    local_only("import vmx")
    foreign = parse_vmx(read_machine_file(file, MAX_VMX_BYTES),
                        fallback_name=file.name.split(".")[0])
    _import(file, foreign, name=name, host=host, kernel_from=kernel_from,
            allow_path=allow_path, new_identity=new_identity, no_start=no_start, cpus=cpus,
            memory=memory, output=output)


@app.command("vbox")
def import_vbox(
    file: Annotated[Path, typer.Argument(help="the machine's .vbox file, or a bare .vdi disk")],
    name: NameOpt = None,
    host: HostOpt = None,
    kernel_from: KernelOpt = None,
    allow_path: AllowOpt = None,
    new_identity: NewIdentityOpt = False,
    no_start: NoStartOpt = False,
    cpus: CpusOpt = None,
    memory: MemoryOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Import a VirtualBox machine from its .vbox file, or a machine from a bare .vdi disk.

    A bare disk gets 1 vCPU and 256 MiB unless --cpus and --memory say otherwise.
    """
    local_only("import vbox")
    if file.suffix.lower() == ".vdi":
        foreign = ops.bare_disk_machine(file, "vdi")
    else:
        data = read_machine_file(file, MAX_VBOX_BYTES)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"'{file.name}' is not UTF-8 text: not a VirtualBox "
                               "machine file.") from None
        foreign = parse_vbox(text)
    _import(file, foreign, name=name, host=host, kernel_from=kernel_from,
            allow_path=allow_path, new_identity=new_identity, no_start=no_start, cpus=cpus,
            memory=memory, output=output)


@app.command("disk")
def import_disk(
    path: Annotated[Path, typer.Argument(help="a block device (/dev/sdb) or a raw image file")],
    name: Annotated[str, typer.Option(help="name in the library")],
) -> None:
    """Capture a physical disk or a raw image into the library, as a read-only qcow2 base.

    Machines are then made from it with 'corral vm create --image NAME'.
    """
    local_only("import disk")
    with context() as ctx, _progress(f"capturing {path}") as progress:
        ctx.on_progress = progress
        image = ops.import_disk(ctx, path, name)
    out.print(f"Captured [bold]{path}[/] as image [bold]{image.name}[/] "
              f"({format_size(image.virtual_size)}, sha256 {image.sha256[:12]}…).")


def read_machine_file(file: Path, limit: int) -> bytes:
    """A machine file's bytes, refusing a missing or oversized one in one sentence."""
    try:
        with file.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise NotFound("file", str(file)) from None
    except IsADirectoryError:
        raise InvalidInput(f"'{file}' is a folder; name the machine file in it.") from None
    except OSError as exc:
        raise StorageError(f"Cannot read '{file}': {exc.strerror}.") from exc
    if len(data) > limit:
        raise InvalidInput(f"'{file.name}' is larger than {format_size(limit)}; machine files "
                           "are small, so this is not one.")
    return data


def _import(file: Path, foreign: ForeignMachine, *, name: str | None, host: str | None,
            kernel_from: str | None, allow_path: list[Path] | None, new_identity: bool,
            no_start: bool, cpus: int | None, memory: str | None, output: Output) -> None:
    foreign = ops.with_overrides(
        foreign, cpus=cpus,
        memory_bytes=parse_size(memory, what="memory size") if memory else None,
    )
    with context() as ctx:
        result = run_import(ctx, file, foreign, name=name, host=host, kernel_image=kernel_from,
                            allowed_paths=allow_path or (), new_identity=new_identity,
                            start=not no_start)
    report(result, output)


def run_import(ctx: Context, file: Path, foreign: ForeignMachine, **options: Any
               ) -> ops.ImportResult:
    """``ops.import_machine`` with a progress bar for the disk conversion."""
    with _progress(f"converting the disk of {file.name}") as progress:
        ctx.on_progress = progress
        try:
            return ops.import_machine(ctx, foreign, file.parent, source=file.name, **options)
        finally:
            ctx.on_progress = None


@contextmanager
def _progress(what: str) -> Iterator[Callable[[float], None]]:
    """A transient progress bar on stderr, and the callback that feeds it (percent)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(what, total=100)
        yield lambda pct: bar.update(task, completed=pct)


def result_dict(result: ops.ImportResult) -> dict[str, Any]:
    m = result.machine
    return {
        "source": result.source,
        "name": m.name,
        "host": m.host,
        "state": "running" if result.started else "shut-off",
        "cpus": m.cpus,
        "memory_bytes": m.memory_bytes,
        "disk_path": m.disk_path,
        "virtual_size": m.disk_bytes,
        "kernel_image": m.kernel_image,
        "identity": [
            {"what": c.what, "source": c.source, "value": c.value, "kept": c.kept}
            for c in result.identity
        ],
        "changed": list(result.changed),
        "dropped": list(result.dropped),
    }


def report(result: ops.ImportResult, output: Output) -> None:
    """What was imported, its identity (kept, or old -> new), and every setting that was
    changed or not carried over. Shared by every ``corral import`` command."""
    d = result_dict(result)
    if output is Output.JSON:
        from rich.table import Table

        emit(d, output, Table())
        return
    state = "running" if result.started else "defined, not started"
    out.print(f"Imported [bold]{d['source']}[/] as machine [bold]{d['name']}[/] on host "
              f"[bold]{d['host']}[/] ({state}): {d['cpus']} vCPU, "
              f"{format_size(d['memory_bytes'])} memory, "
              f"{format_size(d['virtual_size'])} disk.", highlight=False)
    for change in result.identity:
        if change.kept:
            out.print(f"  {change.what.upper()} kept: {change.value}", highlight=False)
        elif change.source is None:
            out.print(f"  {change.what.upper()} new: {change.value} (the source had none)",
                      highlight=False)
        else:
            out.print(f"  {change.what.upper()} changed: {change.source} -> {change.value}",
                      highlight=False)
    if result.changed:
        out.print("Changed:")
        for sentence in result.changed:
            out.print(f"  - {sentence}", highlight=False, soft_wrap=True)
    if result.dropped:
        out.print("Not carried over:")
        for sentence in result.dropped:
            out.print(f"  - {sentence}", highlight=False, soft_wrap=True)
