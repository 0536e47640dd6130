"""Free memory: spread prefers the most, pack the least that still fits."""

from __future__ import annotations

import numpy as np

from corral.scheduler.base import Weigher
from corral.scheduler.inventory import MEMORY, FloatArray, IndexArray, Inventory
from corral.scheduler.values import Request, Weighting


class MemoryWeigher(Weigher):
    name = "memory"

    def raw(
        self, inv: Inventory, req: Request, candidates: IndexArray, weighting: Weighting
    ) -> FloatArray:
        free: FloatArray = inv.free[MEMORY][candidates].astype(np.float64)
        return -free if weighting.mode == "pack" else free
