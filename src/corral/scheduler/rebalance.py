"""Rebalancing plans: which machines to move so that memory use evens out across hosts.

Pure: a plan is computed on a copy of the inventory; nothing moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from corral.scheduler.engine import Scheduler
from corral.scheduler.inventory import MEMORY, FloatArray, IndexArray, Inventory
from corral.scheduler.values import Request

_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Move:
    """Move ``machine`` from ``source`` to ``target``; the memory-utilisation spread
    (max − min of used / effective memory over the hosts that are up) goes from
    ``spread_before`` to ``spread_after``."""

    machine: str
    source: str
    target: str
    reason: str
    spread_before: float
    spread_after: float


def _spreads(u: FloatArray, positions: IndexArray, values: FloatArray) -> FloatArray:
    """The spread of ``u`` if ``u[positions[k]]`` became ``values[k]``, for every k."""
    order = np.argsort(u, kind="stable")
    low1, low2, high1, high2 = order[0], order[1], order[-1], order[-2]
    high_rest = np.where(positions == high1, u[high2], u[high1])
    low_rest = np.where(positions == low1, u[low2], u[low1])
    result: FloatArray = np.maximum(high_rest, values) - np.minimum(low_rest, values)
    return result


def rebalance_plan(
    inv: Inventory,
    placements: Sequence[tuple[str, str, Request]],
    scheduler: Scheduler,
    *,
    max_moves: int = 50,
) -> list[Move]:
    """A greedy plan of at most ``max_moves`` moves, each narrowing the spread.

    ``placements`` are (machine, host, request) for the machines that may move; their
    claims must be in ``inv``. Each step takes the most loaded host that is up, and of
    its machines the one whose move narrows the spread most, to a host that passes
    every filter of ``scheduler`` for that machine with its own claim released from
    the source (so hard anti-affinity and capacity hold after every move). The plan
    stops when no move narrows the spread. ``inv`` is not changed.
    """
    work = inv.copy()
    where = {machine: (host, req) for machine, host, req in placements}
    effective = work.effective[MEMORY].astype(float)
    considered = work.up & (work.effective[MEMORY] > 0)
    hosts = np.flatnonzero(considered)
    moves: list[Move] = []
    if hosts.size < 2:
        return moves
    while len(moves) < max_moves:
        u = work.used[MEMORY][hosts] / effective[hosts]
        before = float(u.max() - u.min())
        source_i = int(hosts[int(np.argmax(u))])
        source = work.names[source_i]
        best: tuple[float, str, int] | None = None
        for machine in sorted(m for m, (h, _) in where.items() if h == source):
            req = where[machine][1]
            memory = req.needs.memory_bytes
            if memory == 0:
                continue  # moving it changes no one's memory use
            work.release(source, req)
            try:
                targets = np.flatnonzero(scheduler.mask(work, req, skip=source_i) & considered)
                if targets.size:
                    now = work.used[MEMORY][hosts] / effective[hosts]
                    after = (work.used[MEMORY][targets] + memory) / effective[targets]
                    spreads = _spreads(now, np.searchsorted(hosts, targets), after)
                    k = int(np.argmin(spreads))
                    if best is None or spreads[k] < best[0] - _EPSILON:
                        best = (float(spreads[k]), machine, int(targets[k]))
            finally:
                work.claim(source, req, force=True)
        if best is None or best[0] >= before - _EPSILON:
            break
        spread, machine, target_i = best
        req = where[machine][1]
        target = work.names[target_i]
        load = float(u.max())
        work.release(source, req)
        work.claim(target, req, force=True)
        where[machine] = (target, req)
        moves.append(Move(
            machine=machine, source=source, target=target,
            reason=(f"'{source}' is the most loaded host ({load:.0%} of its memory); moving"
                    f" '{machine}' to '{target}' narrows the spread from {before:.0%} to"
                    f" {spread:.0%}."),
            spread_before=before, spread_after=spread,
        ))
    return moves
