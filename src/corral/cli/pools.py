"""``corral pool add|list|show|remove``: storage pools by type (see ``ops.pools``).

The commands join the ``pool`` group of ``cli.placement``, beside ``pool usage`` and
``pool rebalance``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from corral.cli.backend import backend
from corral.cli.common import OutputOpt
from corral.cli.placement import pool
from corral.cli.render import Output, emit, out
from corral.model.units import format_size


@pool.command("add")
def add(
    name: Annotated[str, typer.Argument(help="pool name")],
    type_: Annotated[str, typer.Option("--type", help="qcow2, btrfs, reflink… "
                                                      "(a corral.storage plugin)")],
    path: Annotated[Path, typer.Option(help="an existing directory on this host")],
    output: OutputOpt = Output.TABLE,
) -> None:
    """Add a directory of this host as a storage pool; 'vm create --pool NAME' puts
    disks there, cloned the type's native way (a btrfs snapshot, a reflink…)."""
    with backend() as b:
        row = b.add_storage_pool(name, type_, str(path.absolute()))
    emit(row, output, _table([row]))


@pool.command("list")
def list_(output: OutputOpt = Output.TABLE) -> None:
    """Each host's own pool, then the added ones."""
    with backend() as b:
        rows = b.storage_pools()
    emit(rows, output, _table(rows))


@pool.command()
def show(name: Annotated[str, typer.Argument(help="an added pool's name")],
         output: OutputOpt = Output.TABLE) -> None:
    """One added pool: its type, capabilities, space, machines and image copies."""
    with backend() as b:
        row = b.storage_pool(name)
    if output is Output.JSON:
        emit(row, output, Table())
        return
    out.print(_table([row]))
    out.print(f"capabilities: {', '.join(row['capabilities']) or '-'}", highlight=False)
    out.print(f"machines: {', '.join(row['machines']) or '-'}", highlight=False)
    out.print(f"image copies: {', '.join(row['images']) or '-'}", highlight=False)


@pool.command()
def remove(name: Annotated[str, typer.Argument(help="an added pool's name")]) -> None:
    """Forget an added pool; refused while it holds a machine's disk. Corral's image
    copies there are deleted; the directory and anything else in it stay."""
    with backend() as b:
        b.remove_storage_pool(name)
    out.print(f"Removed storage pool [bold]{name}[/].")


def _table(rows: list[dict[str, Any]]) -> Table:
    t = Table("NAME", "TYPE", "HOST", "PATH", "CAPACITY", "CLAIMED", "MACHINES", box=None)
    for r in rows:
        capacity = r["capacity_bytes"]
        t.add_row(r["name"] + ("" if r["added"] else " (host's own)"), r["type"], r["host"],
                  r["path"], format_size(capacity) if capacity else "-",
                  format_size(r["claimed_bytes"]), str(len(r["machines"])))
    return t
