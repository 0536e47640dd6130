"""Soft placement-group policies: affinity prefers hosts holding more of the group's
machines, anti-affinity fewer. Hard policies are the group filter's job."""

from __future__ import annotations

from corral.model.states import GroupPolicy
from corral.scheduler.base import Weigher
from corral.scheduler.inventory import FloatArray, IndexArray, Inventory
from corral.scheduler.values import Request, Weighting


class GroupWeigher(Weigher):
    name = "group"

    def raw(
        self, inv: Inventory, req: Request, candidates: IndexArray, weighting: Weighting
    ) -> FloatArray | None:
        if req.group is None or req.policy is None or req.hard:
            return None
        counts = inv.group_counts(req.group)[candidates].astype(float)
        return -counts if req.policy is GroupPolicy.ANTI_AFFINITY else counts
