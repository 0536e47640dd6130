"""Single-thread speed, for requests that ask to be fast; an unmeasured host counts as
the slowest measured one."""

from __future__ import annotations

import numpy as np

from corral.scheduler.base import Weigher
from corral.scheduler.inventory import FloatArray, IndexArray, Inventory
from corral.scheduler.values import Request, Weighting


class CpuScoreWeigher(Weigher):
    name = "cpu_score"

    def raw(
        self, inv: Inventory, req: Request, candidates: IndexArray, weighting: Weighting
    ) -> FloatArray | None:
        if not req.fast:
            return None
        scores = inv.cpu_score[candidates]
        unmeasured = np.isnan(scores)
        if unmeasured.all():
            return None
        if unmeasured.any():
            scores = np.where(unmeasured, np.nanmin(scores), scores)
        return scores
