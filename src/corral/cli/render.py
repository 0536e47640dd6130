"""How things look: Rich tables for people, JSON with stable keys for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from corral.formats.snapshot_xml import ParsedSnapshot
from corral.model import Host, Image, Job, Usage
from corral.model.units import format_size
from corral.ops.lifecycle import MachineStatus
from corral.ops.migrate import MoveFailure, MoveResult

# Piped output is for reading in full (less, grep): never squeeze it to 80 columns.
# No emoji codes: a MAC such as 1a:ab:07:… would print ":ab:" as an emoji.
out = Console(width=None if sys.stdout.isatty() else 240, emoji=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 240, emoji=False)


def error(message: object) -> None:
    """An error as the user sees it: one line, never wrapped, never a traceback."""
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[str, float], None]]:
    """A progress bar on stderr for one long operation; yields ``update(what, percent)``."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(description, total=100)

        def update(what: str, percent: float) -> None:
            bar.update(task, description=what, completed=percent)

        yield update


def emit(rows: Sequence[dict[str, Any]] | dict[str, Any], output: Output, table: Table) -> None:
    if output is Output.JSON:
        print(json.dumps(rows, indent=2, sort_keys=True, default=str))
    else:
        out.print(table)


def placement_dict(p: Any) -> dict[str, Any]:
    """A scheduler Placement (typed loosely: the CLI does not import numpy to start)."""
    return {"machine": p.machine, "host": p.host, "score": p.score, "scores": dict(p.scores)}


def host_dict(h: Host, claimed: Usage | None = None) -> dict[str, Any]:
    return {
        "name": h.name,
        "uri": h.uri,
        "hostname": h.facts.hostname,
        "arch": h.facts.arch,
        "cpu_model": h.facts.cpu_model,
        "cpus": h.facts.cpus,
        "memory_bytes": h.facts.memory_bytes,
        "hypervisor": f"{h.facts.hypervisor} {h.facts.hypervisor_version}",
        "accelerator": h.accelerator.value,
        "accelerator_note": h.accelerator_note,
        "pool": h.pool_name,
        "pool_path": h.pool_path,
        "pool_bytes": h.disk_bytes,
        "state": h.state.value,
        "state_note": h.state_note,
        "tags": sorted(h.placement.tags),
        "cpu_score": h.cpu_score,
        "claimed": None if claimed is None else {
            "machines": claimed.machines,
            "cpus": claimed.cpus,
            "memory_bytes": claimed.memory_bytes,
            "disk_bytes": claimed.disk_bytes,
        },
    }


def image_dict(i: Image) -> dict[str, Any]:
    return {
        "name": i.name,
        "project": i.project,
        "path": i.path,
        "source_format": i.source_format.value,
        "virtual_size": i.virtual_size,
        "sha256": i.sha256,
        "boot": "kernel" if i.kernel_boot else "disk",
        "kernel": i.kernel_boot.kernel if i.kernel_boot else None,
        "initrd": i.kernel_boot.initrd if i.kernel_boot else None,
        "cmdline": i.kernel_boot.cmdline if i.kernel_boot else None,
        "created_at": i.created_at.isoformat(),
    }


def move_dict(r: MoveResult | MoveFailure) -> dict[str, Any]:
    """A migration's outcome: where the machine went, or why it stayed."""
    if isinstance(r, MoveFailure):
        return {"machine": r.machine, "state": "failed", "error": r.error}
    return {"machine": r.machine, "state": "moved", "source": r.source, "target": r.target,
            "live": r.live, "shared_storage": r.shared_storage,
            "seconds": round(r.seconds, 2), "job": r.job}


def snapshot_dict(s: ParsedSnapshot, current: str | None) -> dict[str, Any]:
    return {"name": s.name, "parent": s.parent, "created_at": s.created_at.isoformat(),
            "state": s.state, "memory": s.with_memory, "description": s.description,
            "current": s.name == current}


def move_line(r: dict[str, Any]) -> str:
    """One migration's outcome as a line, printed as each move ends."""
    if r["state"] == "failed":
        return f"[red]✗[/] {r['machine']} stayed: {r['error']}"
    how = "live" if r["live"] else "cold"
    return f"[green]✓[/] {r['machine']}: {r['source']} → {r['target']} ({how}, {r['seconds']} s)"


def finish_moves(rows: list[dict[str, Any]], output: Output, all_moved: str) -> bool:
    """After many moves: JSON rows, or a last line. Whether every machine moved."""
    failed = [r for r in rows if r["state"] == "failed"]
    if output is Output.JSON:
        print(json.dumps(rows, indent=2))
    elif not failed:
        out.print(all_moved if rows else "Nothing to move.")
    return not failed


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


def machine_dict(s: MachineStatus) -> dict[str, Any]:
    m = s.machine
    return {
        "name": m.name,
        "project": m.project,
        "state": state_text(s),
        "record": m.record_state.value,
        "host": m.host,
        "image": m.image,
        "clone": m.clone.value if m.clone else None,
        "uuid": m.identity.uuid,
        "mac": m.identity.mac,
        "hostname": m.identity.hostname,
        "instance_id": m.identity.instance_id,
        "cpus": m.cpus,
        "memory_bytes": m.memory_bytes,
        "disk_path": m.disk_path,
        "seed_path": m.seed_path,
        "virtual_size": s.usage.virtual_size if s.usage else None,
        "owned_bytes": s.usage.owned_bytes if s.usage else None,
        "shared_bytes": s.usage.shared_bytes if s.usage else None,
        "adopted": not m.managed,
    }


def state_text(s: MachineStatus) -> str:
    if s.power is None:
        return "missing"
    return s.power.value


_STATE_STYLE = {"running": "green", "shut-off": "dim", "paused": "yellow", "missing": "red",
                "crashed": "red"}


def hosts_table(hosts: Sequence[dict[str, Any]]) -> Table:
    t = Table("NAME", "STATE", "URI", "MACHINES", "VCPUS", "MEMORY", "ACCEL", "SCORE", "TAGS",
              box=None)
    for h in hosts:
        claimed = h.get("claimed") or {}
        memory = format_size(h["memory_bytes"])
        t.add_row(
            h["name"],
            h.get("state", "up"),
            h["uri"],
            str(claimed.get("machines", "")),
            f"{claimed.get('cpus', 0)}/{h['cpus']}",
            f"{format_size(claimed.get('memory_bytes', 0))}/{memory}",
            h["accelerator"],
            "" if h.get("cpu_score") is None else f"{h['cpu_score']:g}",
            ",".join(h.get("tags") or ()),
        )
    return t


def images_table(images: Sequence[dict[str, Any]]) -> Table:
    t = Table("NAME", "FORMAT", "VIRTUAL", "BOOT", "SHA256", box=None)
    for i in images:
        t.add_row(i["name"], i["source_format"], format_size(i["virtual_size"]), i["boot"],
                  i["sha256"][:12])
    return t


def machines_table(machines: Sequence[dict[str, Any]]) -> Table:
    t = Table("NAME", "STATE", "HOST", "IMAGE", "UUID", "MAC", "VIRTUAL", "OWNED", "SHARED",
              box=None)
    for m in machines:
        state = m["state"]
        t.add_row(
            m["name"],
            f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]",
            m["host"],
            m["image"] or "-",
            m["uuid"],
            m["mac"] or "-",
            format_size(m["virtual_size"]),
            format_size(m["owned_bytes"]),
            format_size(m["shared_bytes"]),
        )
    return t


def details_table(d: dict[str, Any]) -> Table:
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    for key, value in d.items():
        t.add_row(key.replace("_", " "), _shown(key, value))
    return t


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes") or key == "virtual_size":
        return f"{format_size(value)} ({value} bytes)"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_bytes', '')} {_brief(k, v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _brief(key: str, value: Any) -> str:
    return format_size(value) if key.endswith("_bytes") and value is not None else str(value)
