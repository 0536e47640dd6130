"""Placement: why a machine would go where it goes, and what a rebalance would move
(or moves)."""

from __future__ import annotations

from fastapi import APIRouter

from corral.api.deps import Caller, ServicesDep
from corral.api.problems import documented, explain_dict
from corral.api.routers.hosts import many_moves, report_move, summary
from corral.api.routers.machines import machine_spec
from corral.api.schemas import (
    ExplanationOut,
    MachineCreate,
    MoveOut,
    RebalanceAccepted,
    RebalancePlan,
    RebalanceRun,
)
from corral.ops import migrate as move_ops
from corral.ops import placement, provision
from corral.ops.context import Context
from corral.scheduler import Move

router = APIRouter(tags=["placement"], responses=documented(400, 401, 403, 404, 422))


@router.post("/placement/explain", summary="Every host's verdict for one machine",
             responses=documented(409, 503))
def explain(body: MachineCreate, caller: Caller, svc: ServicesDep) -> ExplanationOut:
    """The same body as ``POST /machines`` (one machine; count and dry_run are
    ignored): which hosts fit and with what scores, and why each other one is refused.
    Nothing is created or claimed."""
    spec = machine_spec(body, caller, svc.ctx)
    return ExplanationOut.model_validate(
        explain_dict(provision.explain_placement(svc.ctx, spec))
    )


@router.get("/pool/rebalance", summary="Moves that would even out the hosts' load (a plan)")
def rebalance(caller: Caller, svc: ServicesDep) -> RebalancePlan:
    """A dry run: migrations that would narrow the memory-use spread between hosts,
    under the same rules as placement. Nothing moves."""
    caller.require_admin()
    return RebalancePlan(moves=_moves(placement.rebalance(svc.ctx)))


@router.post("/pool/rebalance", status_code=202,
             summary="Carry out the rebalance plan, move by move (admins)",
             responses=documented(409))
def carry_out_rebalance(caller: Caller, svc: ServicesDep,
                        body: RebalanceRun | None = None) -> RebalanceAccepted:
    """Answers with the plan (as ``GET /pool/rebalance`` gives it, at most ``max_moves``
    moves), then carries it out one move after another: running machines live, stopped
    ones cold, each a job of its own; the event ``pool.rebalanced`` says how it ended.
    An empty plan moves nothing. Refused (409) while another rebalance or an evacuation
    is moving machines."""
    caller.require_admin()
    max_moves = (body or RebalanceRun()).max_moves
    with many_moves(svc, "rebalancing the pool") as start:
        moves = placement.rebalance(svc.ctx, max_moves)
        if moves:
            start(_rebalance, svc.ctx, moves)
    return RebalanceAccepted(moves=_moves(moves))


def _rebalance(ctx: Context, moves: list[Move]) -> None:
    # The plan the 202 showed, not a new one: what moves is what the caller saw.
    done = move_ops.rebalance(ctx, len(moves), report_move(ctx, "rebalancing the pool"),
                              plan=moves)
    ctx.store.add_event("pool.rebalanced", "pool", f"pool rebalanced: {summary(done)}", None)


def _moves(moves: list[Move]) -> list[MoveOut]:
    return [MoveOut(machine=m.machine, source=m.source, target=m.target, reason=m.reason,
                    spread_before=m.spread_before, spread_after=m.spread_after)
            for m in moves]
