"""vCPUs, memory and disk, each against the host's capacity × its overcommit ratio,
minus what the machines already on it claimed."""

from __future__ import annotations

from collections.abc import Sequence

from corral.model.units import format_size
from corral.scheduler.base import Filter, Refusal
from corral.scheduler.inventory import BoolArray, Inventory
from corral.scheduler.values import Request

_WHAT = ("vCPUs", "memory", "disk")
_KEYS = ("vcpus", "memory", "disk")


def _amount(row: int, value: int) -> str:
    return str(value) if row == 0 else format_size(value)


def _wants(req: Request) -> tuple[int, int, int]:
    return req.needs.cpus, req.needs.memory_bytes, req.needs.disk_bytes


class CapacityFilter(Filter):
    name = "capacity"

    def mask(self, inv: Inventory, req: Request) -> BoolArray:
        mask = inv.every
        for row, want in enumerate(_wants(req)):
            if want > 0:  # asking for none of it fits even an overcommitted host
                mask = mask & (inv.free[row] >= want)
        return mask

    def refusal(self, inv: Inventory, req: Request, i: int) -> Refusal:
        lacking = [row for row, want in enumerate(_wants(req)) if 0 < want > inv.free[row, i]]
        details = []
        for row in lacking:
            want = _wants(req)[row]
            free, eff = int(inv.free[row, i]), int(inv.effective[row, i])
            detail = (f"{_WHAT[row]}: needs {_amount(row, want)}, {_amount(row, max(free, 0))}"
                      f" free of {_amount(row, eff)}")
            ratio = float(inv.ratios[row, i])
            if ratio != 1.0:
                detail += f" ({_amount(row, int(inv.capacity[row, i]))} × {ratio:g})"
            details.append(detail)
        first = lacking[0]
        return Refusal(self.name, _KEYS[first], f"lacks {_WHAT[first]}", f"lack {_WHAT[first]}",
                       "; ".join(details))

    def hint(self, inv: Inventory, req: Request, refused: Sequence[int]) -> str | None:
        wants = _wants(req)
        lacking = [row for row in range(3)
                   if any(0 < wants[row] > inv.free[row, i] for i in refused)]
        for row in lacking:
            largest = int(inv.effective[row].max()) if len(inv) else 0
            if wants[row] > largest:
                return (f"No host has {_amount(row, wants[row])} {_WHAT[row]} even when empty"
                        f" (the largest has {_amount(row, largest)}); ask for less, or add a"
                        " bigger host.")
        what = " and ".join(_WHAT[row] for row in lacking)
        return f"Free {what} on a host (stop or delete machines), or add a host."
