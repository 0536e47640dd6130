"""A bonus where the request's image is already in the host's pool: no copy to wait for."""

from __future__ import annotations

from corral.scheduler.base import Weigher
from corral.scheduler.inventory import FloatArray, IndexArray, Inventory
from corral.scheduler.values import Request, Weighting


class ImageWeigher(Weigher):
    name = "image"

    def raw(
        self, inv: Inventory, req: Request, candidates: IndexArray, weighting: Weighting
    ) -> FloatArray | None:
        if req.image is None:
            return None
        return inv.image_mask(req.image)[candidates].astype(float)
