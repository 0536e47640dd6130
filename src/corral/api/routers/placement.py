"""Placement: why a machine would go where it goes, and what a rebalance would move."""

from __future__ import annotations

from fastapi import APIRouter

from corral.api.deps import Caller, ServicesDep
from corral.api.problems import documented, explain_dict
from corral.api.routers.machines import machine_spec
from corral.api.schemas import ExplanationOut, MachineCreate, MoveOut, RebalancePlan
from corral.ops import placement, provision

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
    return RebalancePlan(moves=[
        MoveOut(machine=m.machine, source=m.source, target=m.target, reason=m.reason,
                spread_before=m.spread_before, spread_after=m.spread_after)
        for m in placement.rebalance(svc.ctx)
    ])
