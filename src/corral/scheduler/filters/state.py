"""Only hosts that are up take new machines: not down, not in maintenance."""

from __future__ import annotations

from collections.abc import Sequence

from corral.model.states import HostState
from corral.scheduler.base import Filter, Refusal
from corral.scheduler.inventory import STATE_CODES, BoolArray, Inventory
from corral.scheduler.values import Request

_DOWN = STATE_CODES[HostState.DOWN]


class StateFilter(Filter):
    name = "state"

    def mask(self, inv: Inventory, req: Request) -> BoolArray:
        return inv.up

    def refusal(self, inv: Inventory, req: Request, i: int) -> Refusal:
        if inv.state[i] == _DOWN:
            return Refusal(self.name, "down", "is down", "are down",
                           "down: the last health check could not reach it")
        return Refusal(self.name, "maintenance", "is in maintenance", "are in maintenance",
                       "in maintenance")

    def hint(self, inv: Inventory, req: Request, refused: Sequence[int]) -> str | None:
        return "Bring a host back up or out of maintenance."
