"""Hosts and their storage pools: state, placement settings, capacity and claims.

Reading is for every caller; enrolling, changing, maintenance, evacuation, removal,
probing and health checks are for admins. A host's state and pool capacity come from
the store (health checks and probes keep them), never from this machine's filesystem:
a remote host's pool path is not here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response

from corral.api.deps import Caller, ServicesDep
from corral.api.problems import documented
from corral.api.schemas import (
    EvacuationAccepted,
    EvacuationMove,
    HealthChangeOut,
    HealthReport,
    HostCreate,
    HostOut,
    HostUpdate,
    Maintenance,
    Name,
    PoolCreate,
    PoolOut,
    PoolUsageOut,
)
from corral.api.services import JobWorker, Services
from corral.errors import Conflict
from corral.model import Host, HostPlacement, HostState, PowerState
from corral.ops import hosts as host_ops
from corral.ops import migrate as move_ops
from corral.ops import pools as pool_ops
from corral.ops import usage as usage_ops
from corral.ops.accounts import Principal
from corral.ops.context import Context
from corral.ops.hosts import DEFAULT_REMOTE_POOL
from corral.ops.migrate import ManyMoves, MoveFailure, MoveResult

_ACTIVE = frozenset({PowerState.RUNNING, PowerState.PAUSED, PowerState.BLOCKED})
"""Power states that move live (as ``ops.migrate`` decides when the move begins)."""

router = APIRouter(prefix="/hosts", tags=["hosts"],
                   responses=documented(400, 401, 403, 404, 422))
pools = APIRouter(prefix="/pools", tags=["hosts"], responses=documented(401))


def _out(svc: ServicesDep, host: Host) -> HostOut:
    ctx = svc.ctx
    return HostOut.of(host, claimed=ctx.store.host_claims(host.name), default=ctx.overcommit)


@router.get("", summary="Every enrolled host with its state, capacity and claims")
def list_hosts(_caller: Caller, svc: ServicesDep) -> list[HostOut]:
    return [_out(svc, h) for h in svc.ctx.store.list_hosts()]


@router.post(
    "", status_code=201, summary="Enrol a host by its libvirt URI, probing it (admins)",
    responses=documented(400, 409, 500, 503),
)
def add_host(body: HostCreate, caller: Caller, svc: ServicesDep) -> HostOut:
    """Connects, prepares the pool and network, and boots a probe guest to choose the
    accelerator and measure the CPU. Nothing is kept if the host cannot be reached."""
    caller.require_admin()
    placement = HostPlacement(
        tags=frozenset(body.tags), cpu_ratio=body.cpu_ratio, memory_ratio=body.memory_ratio,
        disk_ratio=body.disk_ratio,
    )
    host = host_ops.add_host(
        svc.ctx, body.name, body.uri, pool_path=body.pool_path or DEFAULT_REMOTE_POOL,
        network=body.network, placement=placement, accelerator=body.accelerator,
    )
    return _out(svc, host)


@router.post("/check", summary="Check every host's health now (admins)",
             responses=documented(500))
def check_hosts(caller: Caller, svc: ServicesDep) -> HealthReport:
    """Asks every host not in maintenance; marks those that do not answer down, and
    those that answer again up. Answers with the changes and every host."""
    caller.require_admin()
    changes = host_ops.check_health(svc.ctx)
    return HealthReport(
        changes=[HealthChangeOut(host=c.host, before=c.before, after=c.after, note=c.note)
                 for c in changes],
        hosts=[_out(svc, h) for h in svc.ctx.store.list_hosts()],
    )


@router.get("/{name}", summary="One host")
def get_host(name: Name, _caller: Caller, svc: ServicesDep) -> HostOut:
    return _out(svc, svc.ctx.store.get_host(name))


@router.patch("/{name}", summary="Change a host's tags and overcommit ratios (admins)")
def update_host(name: Name, body: HostUpdate, caller: Caller, svc: ServicesDep) -> HostOut:
    """Only the fields sent change; a ratio sent as null follows the global ratio again."""
    caller.require_admin()
    current = svc.ctx.store.get_host(name).placement
    sent = body.model_fields_set
    placement = replace(
        current,
        tags=frozenset(body.tags) if body.tags is not None else current.tags,
        cpu_ratio=body.cpu_ratio if "cpu_ratio" in sent else current.cpu_ratio,
        memory_ratio=body.memory_ratio if "memory_ratio" in sent else current.memory_ratio,
        disk_ratio=body.disk_ratio if "disk_ratio" in sent else current.disk_ratio,
    )
    return _out(svc, svc.ctx.store.set_host_placement(name, placement))


@router.put("/{name}/maintenance", summary="Put a host in maintenance, or take it out (admins)")
def set_maintenance(name: Name, body: Maintenance, caller: Caller,
                    svc: ServicesDep) -> HostOut:
    """A host in maintenance receives no new machines; its machines keep running."""
    caller.require_admin()
    return _out(svc, host_ops.set_maintenance(svc.ctx, name, body.on))


@router.post(
    "/{name}/evacuate", status_code=202,
    summary="Put a host in maintenance and move every machine on it elsewhere (admins)",
    responses=documented(409),
)
def evacuate(name: Name, caller: Caller, svc: ServicesDep) -> EvacuationAccepted:
    """The host is in maintenance when this answers; its machines then move one after
    another, running ones live and stopped ones cold, each to the host the scheduler
    picks at that moment (so each move sees the ones before it). Each move is a job;
    a move that cannot be made (no host can take the machine, say) is an event
    ``machine.move-failed`` on the machine, and the rest go on; the event
    ``host.evacuated`` says how it ended. A host with no machines only goes into
    maintenance. Refused (409) while another evacuation or rebalance is moving machines."""
    caller.require_admin()
    ctx = svc.ctx
    host = ctx.store.get_host(name)
    with many_moves(svc, f"evacuating host {name}") as start:
        if host.state is not HostState.MAINTENANCE:
            host_ops.set_maintenance(ctx, name, True)
        machines = [
            EvacuationMove(machine=m.name, project=m.project,
                           live=svc.sweeper.state(m.name) in _ACTIVE)
            for m in ctx.store.list_machines(name)
        ]
        if machines:
            start(_evacuate, ctx, name)
    return EvacuationAccepted(host=name, state=HostState.MAINTENANCE, machines=machines)


def _evacuate(ctx: Context, name: str) -> None:
    done = move_ops.evacuate(ctx, name, report_move(ctx, f"evacuating host {name}"))
    ctx.store.add_event("host.evacuated", name,
                        f"host {name} evacuated: {summary(done)}", None)


# One lock per server (its job worker); weak, so that a server's lock goes with it.
_moving: weakref.WeakKeyDictionary[JobWorker, threading.Lock] = weakref.WeakKeyDictionary()
_moving_guard = threading.Lock()


@contextmanager
def many_moves(svc: Services, what: str) -> Iterator[Callable[..., None]]:
    """One evacuation or rebalance at a time per server: two at once would plan moves of
    the same machines. Taken when the request arrives (409 if taken); ``start(fn,
    *args)`` hands the moves to the job worker, and the lock is released when ``fn``
    ends, or on leaving the block if nothing was started."""
    with _moving_guard:
        lock = _moving.setdefault(svc.worker, threading.Lock())
    if not lock.acquire(blocking=False):
        raise Conflict("Another evacuation or rebalance is moving machines now.",
                       hint="Wait until it ends (its event host.evacuated or "
                            "pool.rebalanced), then try again.")
    started = False

    def start(fn: Callable[..., None], *args: Any) -> None:
        nonlocal started

        def run() -> None:
            try:
                fn(*args)
            finally:
                lock.release()

        svc.worker.submit(what, run)
        started = True

    try:
        yield start
    finally:
        if not started:
            lock.release()


def report_move(ctx: Context, why: str) -> Callable[[MoveResult | MoveFailure], None]:
    """An ``on_move`` for many moves that records each refusal as an event on its
    machine: a move refused before its job began (no host can take the machine, say)
    would otherwise leave no trace but the server's log. Moves made have their job's
    events already."""
    def report(outcome: MoveResult | MoveFailure) -> None:
        if isinstance(outcome, MoveFailure):
            found = ctx.store.find_machine(outcome.machine)
            ctx.store.add_event(
                "machine.move-failed", outcome.machine,
                f"{why}: {outcome.machine} did not move: {outcome.error}",
                found.project if found is not None else None,
            )
    return report


def summary(done: ManyMoves) -> str:
    """How many moves were made, in a few words."""
    moved, total = len(done.moved), len(done.outcomes)
    if not done.failed:
        return f"{moved} machine{'' if moved == 1 else 's'} moved"
    return f"{moved} of {total} machines moved, {len(done.failed)} stayed (see their events)"


@router.delete(
    "/{name}", status_code=204, summary="Forget a host (admins)", responses=documented(409),
)
def remove_host(name: Name, caller: Caller, svc: ServicesDep) -> Response:
    """Refused (409) while machines are recorded on it, and for the local host. The
    host's pool and files stay where they are."""
    caller.require_admin()
    host_ops.remove_host(svc.ctx, name)
    return Response(status_code=204)


@router.post("/{name}/probe", summary="Probe the host again (admins)",
             responses=documented(500, 503))
def probe_host(name: Name, caller: Caller, svc: ServicesDep) -> HostOut:
    caller.require_admin()
    svc.ctx.store.get_host(name)  # 404 before any connection
    return _out(svc, host_ops.probe(svc.ctx, name))


@pools.get("/usage", summary="What each pool, machine and image uses, read from the hosts "
                             "(admins)", responses=documented(403, 404, 422, 503))
def pool_usage(caller: Caller, svc: ServicesDep, host: Name | None = None) -> list[PoolUsageOut]:
    """Per pool: capacity, used, available and fill; per machine: virtual size, bytes it
    owns and bytes it shares with its base; per image: bytes its copy takes there."""
    caller.require_admin()
    return [PoolUsageOut.of(u) for u in usage_ops.pool_usage(svc.ctx, host)]


@pools.get("", summary="Every host's own storage pool, then the added ones")
def list_pools(caller: Caller, svc: ServicesDep) -> list[PoolOut]:
    seen = _visible_machines(caller, svc)
    return [_pool_out(seen, v) for v in pool_ops.list_pools(svc.ctx)]


@pools.get("/{name}", summary="One added storage pool", responses=documented(400, 404, 422))
def get_pool(name: Name, caller: Caller, svc: ServicesDep) -> PoolOut:
    return _pool_out(_visible_machines(caller, svc), pool_ops.show_pool(svc.ctx, name))


@pools.delete("/{name}", status_code=204, summary="Forget an added storage pool (admins)",
              responses=documented(400, 403, 404, 409, 422))
def remove_pool(name: Name, caller: Caller, svc: ServicesDep) -> Response:
    """Refused (409) while a machine's disk is in it. Corral deletes its copies of images
    there; the directory and anything else in it stay."""
    caller.require_admin()
    pool_ops.remove_pool(svc.ctx, name)
    return Response(status_code=204)


def _visible_machines(caller: Principal, svc: ServicesDep) -> set[str]:
    return {m.name for m in svc.ctx.store.list_machines() if caller.can_read(m.project)}


def _pool_out(seen: set[str], view: pool_ops.PoolView) -> PoolOut:
    """Only the machines the caller may see (``seen``) are named."""
    out = view.to_dict()
    return PoolOut(**{**out, "machines": [n for n in out["machines"] if n in seen]})


@pools.post("", status_code=201, summary="Add a storage pool of a type (admins)",
            responses=documented(400, 403, 409, 422))
def add_pool(body: PoolCreate, caller: Caller, svc: ServicesDep) -> PoolOut:
    """A directory on the server's host, managed by the ``corral.storage`` plugin of
    ``type``; refused if the filesystem cannot serve that type."""
    caller.require_admin()
    pool_ops.add_pool(svc.ctx, body.name, body.type, Path(body.path))
    return _pool_out(_visible_machines(caller, svc), pool_ops.show_pool(svc.ctx, body.name))
