"""corral placement … and the placement options of `vm create`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.table import Table

from corral.cli.backend import backend
from corral.cli.common import OutputOpt
from corral.cli.render import Output, emit, finish_moves, move_line, out
from corral.errors import InvalidInput
from corral.model import GroupPolicy, MachineSpec, PlacementHints
from corral.model.units import format_size, parse_size

app = typer.Typer(help="Why machines go where they go.", no_args_is_help=True)
pool = typer.Typer(help="The pool of hosts as a whole, and the storage pools of their disks.",
                  no_args_is_help=True)

HostOpt = Annotated[str | None, typer.Option(help="this host, not the scheduler's choice")]
TagOpt = Annotated[
    list[str] | None, typer.Option("--tag", help="the host must carry this tag (repeatable)")
]
GroupOpt = Annotated[str | None, typer.Option(help="join this placement group")]
AffinityOpt = Annotated[
    str | None, typer.Option(help="GROUP: machines of the group share a host", metavar="GROUP")
]
AntiAffinityOpt = Annotated[
    str | None,
    typer.Option(help="GROUP: machines of the group each get a host of their own",
                 metavar="GROUP"),
]
SoftOpt = Annotated[bool, typer.Option("--soft", help="the group policy is a preference")]
FastOpt = Annotated[bool, typer.Option("--fast", help="prefer the fastest single thread")]


def placement_hints(
    host: str | None,
    tags: Sequence[str] | None,
    group: str | None,
    affinity: str | None,
    anti_affinity: str | None,
    soft: bool,
    fast: bool,
) -> PlacementHints:
    named = [g for g in (group, affinity, anti_affinity) if g is not None]
    if len(named) > 1:
        raise InvalidInput("Give one of --group, --affinity and --anti-affinity.")
    if soft and not (affinity or anti_affinity):
        raise InvalidInput("--soft qualifies --affinity or --anti-affinity; give one of them.")
    policy = (GroupPolicy.AFFINITY if affinity else
              GroupPolicy.ANTI_AFFINITY if anti_affinity else None)
    return PlacementHints(host=host, tags=frozenset(tags or ()),
                          group=named[0] if named else None, policy=policy, hard=not soft,
                          fast=fast)


def placements_table(rows: Sequence[dict[str, Any]]) -> Table:
    t = Table("MACHINE", "HOST", "SCORE", "WHY", box=None)
    for r in rows:
        why = ", ".join(f"{k} {v:.2f}" for k, v in r["scores"].items())
        t.add_row(r["machine"], r["host"], f"{r['score']:.2f}", why)
    return t


@app.command()
def explain(
    name: Annotated[str, typer.Argument(help="name of the machine to place")],
    image: Annotated[str, typer.Option(help="library image to clone")],
    cpus: Annotated[int, typer.Option(help="vCPUs")] = 1,
    memory: Annotated[str, typer.Option(help="memory, e.g. 512M")] = "256M",
    disk_size: Annotated[str | None, typer.Option(help="disk size (default: the image's)")] = None,
    host: HostOpt = None,
    tag: TagOpt = None,
    group: GroupOpt = None,
    affinity: AffinityOpt = None,
    anti_affinity: AntiAffinityOpt = None,
    soft: SoftOpt = False,
    fast: FastOpt = False,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Every host's verdict for one machine: which filter refused it, or how it scored."""
    spec = MachineSpec(
        name=name, image=image, cpus=cpus, memory_bytes=parse_size(memory, what="memory size"),
        disk_bytes=parse_size(disk_size, what="disk size") if disk_size else None,
        placement=placement_hints(host, tag, group, affinity, anti_affinity, soft, fast),
    )
    with backend() as b:
        explained = b.explain_placement(spec)
    if output is not Output.TABLE:
        emit(explained, output, Table())
        return
    out.print(explained["summary"], highlight=False)
    if explained.get("hint"):
        out.print(explained["hint"], highlight=False)
    for line in explained["lines"]:
        typer.echo(line)


@pool.command()
def usage(
    host: Annotated[str | None, typer.Argument(help="one host's pool (default: all)")] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """What each pool, machine and image uses: a machine's own bytes (USED, in ZFS's
    words) and those it shares with its base (REFER − USED)."""
    with backend() as b:
        pools = b.pool_usage(host)
    if output is Output.JSON:
        emit(pools, output, Table())
        return
    for p in pools:
        out.print(f"[bold]{p['host']}[/] pool {p['pool']} ({p['path']}): "
                  f"{format_size(p['used_bytes'])} used, {format_size(p['available_bytes'])} "
                  f"free of {format_size(p['capacity_bytes'])} ({100 * p['fill']:.0f} % full)")
        t = Table("MACHINE", "VIRTUAL", "OWNED", "SHARED", "BASE", box=None)
        for m in p["machines"]:
            t.add_row(m["name"], format_size(m["virtual_size"]), format_size(m["owned_bytes"]),
                      format_size(m["shared_bytes"]), m["base"] or "-")
        for i in p["images"]:
            t.add_row(f"image {i['name']}", format_size(i["virtual_size"]),
                      format_size(i["allocated_bytes"]), "-", "-")
        out.print(t)
        if p["unreadable"]:
            out.print(f"Could not read: {', '.join(p['unreadable'])}.")


@pool.command()
def rebalance(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the plan; move nothing")] = False,
    max_moves: Annotated[int, typer.Option(min=1, help="at most this many moves")] = 50,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Even out the load: migrations that narrow the spread between hosts, under the
    placement rules. Moves them (running machines live) unless --dry-run."""
    if not dry_run:
        with backend() as b:
            rows = b.carry_out_rebalance(
                max_moves, lambda r: out.print(move_line(r)) if output is Output.TABLE else None
            )
        if not finish_moves(rows, output, "The load is as even as the placement rules allow."):
            raise typer.Exit(1)
        return
    with backend() as b:
        rows = b.rebalance(max_moves)
    t = Table("MACHINE", "FROM", "TO", "SPREAD", "WHY", box=None)
    for r in rows:
        t.add_row(str(r["machine"]), str(r["source"]), str(r["target"]),
                  f"{r['spread_before']:.2f} → {r['spread_after']:.2f}", str(r["reason"]))
    emit(rows, output, t)
    if not rows and output is Output.TABLE:
        out.print("The load is as even as the placement rules allow; nothing to move.")
