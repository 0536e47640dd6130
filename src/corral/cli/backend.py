"""The one seam between commands and where the work happens.

A command asks ``backend()`` for a :class:`Backend` and gets either the local store and
libvirt (:class:`LocalBackend`) or a Corral server over HTTP
(:class:`corral.cli.remote.RemoteBackend`). Both answer with the same dicts, the
contract ``render`` prints as tables or as JSON with stable keys, so a command reads
the same whichever side did the work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from rich.live import Live
from rich.table import Table

from corral.cli.common import context
from corral.cli.render import (
    err,
    host_dict,
    image_dict,
    job_dict,
    machine_dict,
    move_dict,
    placement_dict,
    snapshot_dict,
)
from corral.errors import CorralError, InvalidInput, NotFound
from corral.model import CloneMode, HostPlacement, ImageFormat, JobState, MachineSpec
from corral.ops import hosts as host_ops
from corral.ops import images as image_ops
from corral.ops import lifecycle, provision, snapshot_clone
from corral.ops import pools as pool_ops
from corral.ops import snapshots as snapshot_ops
from corral.ops import usage as usage_ops
from corral.ops.context import Context
from corral.ops.snapshot_clone import SnapshotRef

Row = dict[str, Any]
Progress = Callable[[str, float], None]
"""(what is happening, percent done)."""


@dataclass
class Batch:
    created: list[Row]
    failed: dict[str, CorralError] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HostRequest:
    name: str
    uri: str
    pool_path: str | None
    network: str | None
    placement: HostPlacement
    accelerator: Literal["auto", "kvm", "tcg"] | None


@dataclass(frozen=True, slots=True)
class ImportRequest:
    file: Path
    name: str | None
    fmt: ImageFormat | None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""


class Backend(Protocol):
    """What commands may ask; every answer is a render dict."""

    def machines(self) -> list[Row]: ...
    def machine(self, name: str) -> Row: ...
    def create_machines(
        self, spec: MachineSpec, count: int, *, wait: bool, timeout: float | None
    ) -> Batch: ...
    def plan_placement(self, spec: MachineSpec, count: int) -> list[Row]: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str, timeout: float | None) -> bool: ...
    def reboot(self, name: str) -> None: ...
    def kill(self, name: str) -> None: ...
    def delete_machine(self, name: str, *, force: bool) -> None: ...
    def clone_machine(self, source: str, new: str, mode: CloneMode) -> Row: ...
    def create_from_snapshot(
        self, ref: SnapshotRef, new: str, mode: CloneMode, *, start: bool, wait: bool,
        timeout: float | None,
    ) -> Row: ...
    def images(self) -> list[Row]: ...
    def image(self, name: str) -> Row: ...
    def import_image(self, req: ImportRequest, progress: Progress) -> Row: ...
    def delete_image(self, name: str) -> None: ...
    def capture_image(self, machine: str, name: str, *, seal: bool, progress: Progress) -> Row:
        """The new image's dict, with ``sealed`` and ``seal_report`` (what was removed)."""
        ...
    def hosts(self) -> list[Row]: ...
    def host(self, name: str) -> Row: ...
    def add_host(self, req: HostRequest) -> Row: ...
    def set_host_placement(self, name: str, placement: HostPlacement) -> Row: ...
    def set_maintenance(self, name: str, on: bool) -> Row: ...
    def remove_host(self, name: str) -> None: ...
    def check_hosts(self) -> tuple[list[Row], list[Row]]:
        """The state changes the check found, and every host after it."""
        ...
    def explain_placement(self, spec: MachineSpec) -> Row: ...
    def rebalance(self, max_moves: int) -> list[Row]: ...
    def migrate(self, name: str, to: str | None, live: bool, progress: Progress) -> Row: ...
    def snapshots(self, name: str) -> list[Row]: ...
    def pool_usage(self, host: str | None) -> list[Row]: ...
    def storage_pools(self) -> list[Row]: ...
    def storage_pool(self, name: str) -> Row: ...
    def add_storage_pool(self, name: str, type_: str, path: str) -> Row: ...
    def remove_storage_pool(self, name: str) -> None: ...
    def create_snapshot(self, name: str, snapshot: str, description: str | None) -> Row: ...
    def revert_snapshot(self, name: str, snapshot: str) -> Row: ...
    def delete_snapshot(self, name: str, snapshot: str) -> None: ...
    def evacuate(self, host: str, on_move: Callable[[Row], None]) -> list[Row]: ...
    def carry_out_rebalance(self, max_moves: int, on_move: Callable[[Row], None]) -> list[Row]:
        ...
    def jobs(self, state: JobState | None, limit: int) -> list[Row]: ...
    def job(self, job_id: int) -> Row: ...


# -- which side ------------------------------------------------------------------------


@dataclass
class GlobalOptions:
    server: str | None = None
    """From --server or CORRAL_SERVER."""
    local: bool = False
    """--local: the store on this host, even with saved credentials."""


OPTIONS = GlobalOptions()


def is_remote() -> bool:
    from corral.cli import credentials

    if OPTIONS.local:
        return False
    return OPTIONS.server is not None or credentials.load() is not None


def local_only(what: str) -> None:
    """Refuse a command that works only against this host's own store."""
    if is_remote():
        raise InvalidInput(
            f"'corral {what}' works on the server's own host, against its store.",
            hint="Run it there with --local (or after 'corral logout').",
        )


@contextmanager
def backend(*, enroll: bool = True) -> Iterator[Backend]:
    """The server when one is given or logged in to, else this host's store."""
    if is_remote():
        from corral.cli.remote import RemoteBackend

        with RemoteBackend.connect(OPTIONS.server) as remote:
            yield remote
        return
    with context(enroll=enroll) as ctx:
        yield LocalBackend(ctx)


# -- a live table of machines and what each is doing ------------------------------------


class Board:
    """MACHINE / STATUS / SECONDS, updated in place on stderr."""

    def __init__(self, names: list[str], status: str) -> None:
        self.names = names
        self.began = time.monotonic()
        self.states = dict.fromkeys(names, status)
        self.took: dict[str, float] = {}
        self._live = Live(self.table(), console=err, refresh_per_second=4, transient=False)

    def table(self) -> Table:
        t = Table("MACHINE", "STATUS", "SECONDS", box=None)
        for n in self.names:
            seconds = self.took.get(n, time.monotonic() - self.began)
            state = self.states[n]
            style = ("green" if state in ("ready", "running", "created")
                     else "red" if state.startswith("failed") else "yellow")
            t.add_row(n, f"[{style}]{state}[/]", f"{seconds:5.1f}")
        return t

    def update(self, name: str, status: str) -> None:
        self.states[name] = status
        self.took[name] = time.monotonic() - self.began
        self._live.update(self.table())

    def __enter__(self) -> Board:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.update(self.table())
        self._live.__exit__(None, None, None)


# -- this host -------------------------------------------------------------------------


class LocalBackend:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def machines(self) -> list[Row]:
        return [machine_dict(lifecycle.status(self.ctx, m)) for m in self.ctx.store.list_machines()]

    def machine(self, name: str) -> Row:
        return machine_dict(lifecycle.status(self.ctx, self.ctx.store.get_machine(name)))

    def create_machines(
        self, spec: MachineSpec, count: int, *, wait: bool, timeout: float | None
    ) -> Batch:
        result = provision.create_machines(self.ctx, spec, count)
        names = [m.name for m in result.created]
        if wait and names:
            with Board(names, "booting") as board:
                provision.wait_ready(self.ctx, names, timeout or self.ctx.settings.ready_timeout,
                                     board.update)
        return Batch([self.machine(n) for n in names], dict(result.failed))

    def plan_placement(self, spec: MachineSpec, count: int) -> list[Row]:
        return [placement_dict(p) for p in provision.plan_placement(self.ctx, spec, count)]

    def start(self, name: str) -> None:
        lifecycle.start(self.ctx, name)

    def stop(self, name: str, timeout: float | None) -> bool:
        return lifecycle.stop(self.ctx, name, timeout or self.ctx.settings.stop_timeout)

    def reboot(self, name: str) -> None:
        lifecycle.reboot(self.ctx, name)

    def kill(self, name: str) -> None:
        lifecycle.kill(self.ctx, name)

    def delete_machine(self, name: str, *, force: bool) -> None:
        lifecycle.delete(self.ctx, name, force=force)

    def clone_machine(self, source: str, new: str, mode: CloneMode) -> Row:
        machine = lifecycle.clone(self.ctx, source, new, mode)
        return machine_dict(lifecycle.status(self.ctx, machine))

    def create_from_snapshot(
        self, ref: SnapshotRef, new: str, mode: CloneMode, *, start: bool, wait: bool,
        timeout: float | None,
    ) -> Row:
        snapshot_clone.create_from_snapshot(self.ctx, ref, new, mode=mode, start=start)
        if wait:
            with Board([new], "booting") as board:
                provision.wait_ready(self.ctx, [new], timeout or self.ctx.settings.ready_timeout,
                                     board.update)
        return self.machine(new)

    def images(self) -> list[Row]:
        return [image_dict(i) for i in self.ctx.store.list_images()]

    def image(self, name: str) -> Row:
        d = image_dict(self.ctx.store.get_image(name))
        d["used_by"] = self.ctx.store.machines_using_image(name)
        return d

    def import_image(self, req: ImportRequest, progress: Progress) -> Row:
        what = f"importing {req.file.name}"
        image = image_ops.import_image(
            self.ctx, req.file, name=req.name, declared=req.fmt, kernel=req.kernel,
            initrd=req.initrd, cmdline=req.cmdline, progress=lambda pct: progress(what, pct),
        )
        return image_dict(image)

    def delete_image(self, name: str) -> None:
        image_ops.delete_image(self.ctx, name)

    def capture_image(self, machine: str, name: str, *, seal: bool, progress: Progress) -> Row:
        from corral.ops import capture

        what = f"capturing {machine}"
        done = capture.capture_image(self.ctx, machine, name, seal=seal,
                                     progress=lambda pct: progress(what, pct))
        lines = done.report.lines() if done.report is not None else []
        return {**image_dict(done.image), "sealed": done.sealed, "seal_report": lines}

    def hosts(self) -> list[Row]:
        return [host_dict(h, self.ctx.store.host_claims(h.name))
                for h in self.ctx.store.list_hosts()]

    def host(self, name: str) -> Row:
        host = self.ctx.store.find_host(name)
        if host is None:
            raise NotFound("host", name, hint="'corral host list' shows the enrolled hosts.")
        return host_dict(host, self.ctx.store.host_claims(name))

    def add_host(self, req: HostRequest) -> Row:
        host = host_ops.add_host(
            self.ctx, req.name, req.uri, pool_path=req.pool_path or host_ops.DEFAULT_REMOTE_POOL,
            network=req.network, placement=req.placement, accelerator=req.accelerator)
        return self.host(host.name)

    def set_host_placement(self, name: str, placement: HostPlacement) -> Row:
        self.ctx.store.set_host_placement(name, placement)
        return self.host(name)

    def set_maintenance(self, name: str, on: bool) -> Row:
        host_ops.set_maintenance(self.ctx, name, on)
        return self.host(name)

    def remove_host(self, name: str) -> None:
        host_ops.remove_host(self.ctx, name)

    def check_hosts(self) -> tuple[list[Row], list[Row]]:
        changes = [{"host": c.host, "before": c.before.value, "after": c.after.value,
                    "note": c.note} for c in host_ops.check_health(self.ctx)]
        return changes, self.hosts()

    def explain_placement(self, spec: MachineSpec) -> Row:
        explanation = provision.explain_placement(self.ctx, spec)
        return {**explanation.to_dict(), "lines": explanation.lines()}

    def rebalance(self, max_moves: int) -> list[Row]:
        from corral.ops.placement import rebalance

        return [{"machine": m.machine, "source": m.source, "target": m.target,
                 "reason": m.reason, "spread_before": m.spread_before,
                 "spread_after": m.spread_after} for m in rebalance(self.ctx, max_moves)]

    def migrate(self, name: str, to: str | None, live: bool, progress: Progress) -> Row:
        from corral.ops import migrate

        what = f"moving {name}" + (" live" if live else "")
        self.ctx.on_progress = lambda pct: progress(what, pct)
        try:
            return move_dict(migrate.migrate(self.ctx, name, to=to, live=live))
        finally:
            self.ctx.on_progress = None

    def pool_usage(self, host: str | None) -> list[Row]:
        # The same keys as the API's PoolUsageOut: the dataclass's fields.
        return [asdict(u) for u in usage_ops.pool_usage(self.ctx, host)]

    def storage_pools(self) -> list[Row]:
        return [v.to_dict() for v in pool_ops.list_pools(self.ctx)]

    def storage_pool(self, name: str) -> Row:
        return pool_ops.show_pool(self.ctx, name).to_dict()

    def add_storage_pool(self, name: str, type_: str, path: str) -> Row:
        pool_ops.add_pool(self.ctx, name, type_, Path(path))
        return self.storage_pool(name)

    def remove_storage_pool(self, name: str) -> None:
        pool_ops.remove_pool(self.ctx, name)

    def snapshots(self, name: str) -> list[Row]:
        tree = snapshot_ops.tree(self.ctx, name)
        return [snapshot_dict(s, tree.current) for s in tree.snapshots]

    def create_snapshot(self, name: str, snapshot: str, description: str | None) -> Row:
        return snapshot_dict(snapshot_ops.create(self.ctx, name, snapshot, description),
                             snapshot)

    def revert_snapshot(self, name: str, snapshot: str) -> Row:
        return snapshot_dict(snapshot_ops.revert(self.ctx, name, snapshot), snapshot)

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        snapshot_ops.delete(self.ctx, name, snapshot)

    def evacuate(self, host: str, on_move: Callable[[Row], None]) -> list[Row]:
        from corral.ops import migrate

        moves = migrate.evacuate(self.ctx, host, lambda r: on_move(move_dict(r)))
        return [move_dict(r) for r in moves.outcomes]

    def carry_out_rebalance(self, max_moves: int, on_move: Callable[[Row], None]) -> list[Row]:
        from corral.ops import migrate

        moves = migrate.rebalance(self.ctx, max_moves, lambda r: on_move(move_dict(r)))
        return [move_dict(r) for r in moves.outcomes]

    def jobs(self, state: JobState | None, limit: int) -> list[Row]:
        return [job_dict(j) for j in self.ctx.store.list_jobs(state, limit=limit)]

    def job(self, job_id: int) -> Row:
        return job_dict(self.ctx.store.get_job(job_id))
