"""The architecture and accelerator a request requires, if any."""

from __future__ import annotations

from collections.abc import Sequence

from corral.scheduler.base import Filter, Refusal
from corral.scheduler.inventory import BoolArray, Inventory
from corral.scheduler.values import Request


class PlatformFilter(Filter):
    name = "platform"

    def mask(self, inv: Inventory, req: Request) -> BoolArray:
        if req.arch is None:
            if req.accelerator is None:
                return inv.every
            return inv.accel_mask(req.accelerator)
        if req.accelerator is None:
            return inv.arch_mask(req.arch)
        return inv.arch_mask(req.arch) & inv.accel_mask(req.accelerator)

    def refusal(self, inv: Inventory, req: Request, i: int) -> Refusal:
        arch, accelerator = inv.host_platform(i)
        if req.arch is not None and arch != req.arch:
            return Refusal(self.name, f"arch:{req.arch}", f"is not {req.arch}",
                           f"are not {req.arch}", f"{arch}, not {req.arch}")
        return Refusal(self.name, f"accelerator:{req.accelerator}",
                       f"lacks {req.accelerator}", f"lack {req.accelerator}",
                       f"accelerator {accelerator}, not {req.accelerator}")

    def hint(self, inv: Inventory, req: Request, refused: Sequence[int]) -> str | None:
        wanted = " with ".join(x for x in (req.arch, req.accelerator) if x is not None)
        return f"Add a {wanted} host."
