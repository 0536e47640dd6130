"""Hard placement-group policies: affinity keeps a group on the host(s) already holding
it; anti-affinity puts each of its machines on a host holding none of the others."""

from __future__ import annotations

from collections.abc import Sequence

from corral.model.states import GroupPolicy
from corral.scheduler.base import Filter, Refusal
from corral.scheduler.inventory import BoolArray, Inventory
from corral.scheduler.values import Request


class GroupFilter(Filter):
    name = "group"

    def mask(self, inv: Inventory, req: Request) -> BoolArray:
        if req.group is None or req.policy is None or not req.hard:
            return inv.every
        counts = inv.group_counts(req.group)
        if req.policy is GroupPolicy.ANTI_AFFINITY:
            nothing: BoolArray = counts == 0
            return nothing
        holding = counts > 0
        return holding if holding.any() else inv.every

    def refusal(self, inv: Inventory, req: Request, i: int) -> Refusal:
        group = req.group
        if req.policy is GroupPolicy.ANTI_AFFINITY:
            count = int(inv.group_counts(str(group))[i])
            machines = "machine" if count == 1 else "machines"
            return Refusal(self.name, f"anti-affinity:{group}",
                           f"already runs a machine of group '{group}'",
                           f"already run a machine of group '{group}'",
                           f"runs {count} {machines} of anti-affinity group '{group}'")
        return Refusal(self.name, f"affinity:{group}", f"is not where group '{group}' runs",
                       f"are not where group '{group}' runs",
                       f"holds no machine of affinity group '{group}'")

    def hint(self, inv: Inventory, req: Request, refused: Sequence[int]) -> str | None:
        if req.policy is GroupPolicy.ANTI_AFFINITY:
            return f"Add a host, or make group '{req.group}' soft."
        return f"Free capacity where group '{req.group}' runs, or make the group soft."
