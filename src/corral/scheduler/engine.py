"""The scheduler: filters, then weighers, then the best host; claims for batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib.metadata import entry_points
from typing import TypeVar, cast

import numpy as np

from corral.errors import DriverNotFound
from corral.scheduler.base import Filter, Refusal, Weigher
from corral.scheduler.explain import Explanation, HostVerdict, NoValidHost
from corral.scheduler.filters import BUILTIN_FILTERS
from corral.scheduler.inventory import BoolArray, FloatArray, IndexArray, Inventory
from corral.scheduler.values import Placement, Request, Weighting
from corral.scheduler.weighers import BUILTIN_WEIGHERS

FILTER_GROUP = "corral.scheduler.filters"
WEIGHER_GROUP = "corral.scheduler.weighers"

_T = TypeVar("_T", Filter, Weigher)


def _load(group: str, builtins: Iterable[type[_T]], kind: type,
          names: Sequence[str] | None) -> list[_T]:
    found: dict[str, _T] = {cls.name: cls() for cls in builtins}
    for ep in sorted(entry_points(group=group), key=lambda ep: ep.name):
        if ep.name in found:
            continue  # a built-in registered under its own name, or a plugin shadowing one
        loaded = ep.load()
        plugin = loaded() if isinstance(loaded, type) else loaded
        if not isinstance(plugin, kind):
            raise TypeError(f"{group} plugin '{ep.name}' is not a {kind.__name__}")
        found[ep.name] = cast("_T", plugin)
    if names is None:
        return list(found.values())
    missing = [n for n in names if n not in found]
    if missing:
        raise DriverNotFound(group, missing[0], list(found))
    return [found[n] for n in names]


def load_filters(names: Sequence[str] | None = None) -> list[Filter]:
    """The built-in filters in their order, then plugins of ``corral.scheduler.filters``
    by entry-point name; or exactly ``names``, in that order (DriverNotFound if one is
    unknown)."""
    return _load(FILTER_GROUP, BUILTIN_FILTERS, Filter, names)


def load_weighers(names: Sequence[str] | None = None) -> list[Weigher]:
    """As :func:`load_filters`, for ``corral.scheduler.weighers``."""
    return _load(WEIGHER_GROUP, BUILTIN_WEIGHERS, Weigher, names)


def _largest_first(reqs: Sequence[Request]) -> list[int]:
    return sorted(range(len(reqs)), key=lambda k: (
        -reqs[k].needs.memory_bytes, -reqs[k].needs.cpus, -reqs[k].needs.disk_bytes, k))


class Scheduler:
    """Places requests on an :class:`Inventory`; holds no state of its own between calls.

    ``filters`` and ``weighers`` default to the built-ins (not plugins: pass
    ``load_filters()`` and ``load_weighers()`` for those).
    """

    def __init__(
        self,
        filters: Sequence[Filter] | None = None,
        weighers: Sequence[Weigher] | None = None,
        weighting: Weighting | None = None,
    ) -> None:
        self.filters = tuple(filters) if filters is not None else tuple(
            cls() for cls in BUILTIN_FILTERS)
        self.weighers = tuple(weighers) if weighers is not None else tuple(
            cls() for cls in BUILTIN_WEIGHERS)
        self.weighting = weighting if weighting is not None else Weighting()

    def mask(self, inv: Inventory, req: Request, *, skip: int | None = None) -> BoolArray:
        """True for the hosts that pass every filter (``skip``: host index excluded)."""
        mask = self.filters[0].mask(inv, req) if self.filters else inv.every
        for flt in self.filters[1:]:
            mask = mask & flt.mask(inv, req)
        if skip is not None:
            mask = mask.copy()
            mask[skip] = False
        return mask

    def _weigh(self, inv: Inventory, req: Request,
               candidates: IndexArray) -> tuple[FloatArray, dict[str, FloatArray | None]]:
        totals = np.zeros(len(candidates), dtype=np.float64)
        parts: dict[str, FloatArray | None] = {}
        for weigher in self.weighers:
            multiplier = self.weighting.multiplier(weigher.name)
            raw = weigher.raw(inv, req, candidates, self.weighting) if multiplier else None
            part = None
            if raw is not None:
                low, high = raw.min(), raw.max()
                if high > low:
                    part = (raw - low) * (multiplier / (high - low))
                    totals += part
            parts[weigher.name] = part
        return totals, parts

    def place(self, inv: Inventory, req: Request) -> Placement:
        """The best host for ``req``; claims nothing. Raises NoValidHost with an
        explanation when every host is filtered out."""
        candidates = np.flatnonzero(self.mask(inv, req))
        if candidates.size == 0:
            raise NoValidHost(self.explain(inv, req))
        totals, parts = self._weigh(inv, req, candidates)
        best = int(np.argmax(totals))  # the first maximum: hosts are in name order
        return Placement(
            machine=req.name,
            host=inv.names[candidates[best]],
            score=float(totals[best]),
            scores={n: 0.0 if p is None else float(p[best]) for n, p in parts.items()},
        )

    def place_batch(
        self, inv: Inventory, reqs: Sequence[Request], *, claim: bool = True
    ) -> list[Placement]:
        """Place every request, each claimed before the next is placed, so capacity and
        anti-affinity hold across the batch. In pack mode the batch is placed largest
        first (first-fit-decreasing packs tighter than arrival order); the placements
        come back in request order either way.

        If one request cannot be placed, every claim of the batch is released (the
        inventory is as before) and NoValidHost names that machine, explained against
        the inventory as the batch had left it. With ``claim=False`` the claims are
        released after a successful batch too: a plan only.
        """
        order = (_largest_first(reqs) if self.weighting.mode == "pack"
                 else list(range(len(reqs))))
        placed: dict[int, Placement] = {}
        try:
            for k in order:
                placement = self.place(inv, reqs[k])
                inv.claim(placement.host, reqs[k])
                placed[k] = placement
        except BaseException:
            self._release(inv, reqs, placed)
            raise
        if not claim:
            self._release(inv, reqs, placed)
        return [placed[k] for k in range(len(reqs))]

    @staticmethod
    def _release(inv: Inventory, reqs: Sequence[Request], placed: dict[int, Placement]) -> None:
        for k, placement in reversed(placed.items()):
            inv.release(placement.host, reqs[k])

    def _hints(self, inv: Inventory, req: Request, masks: list[BoolArray],
               first: dict[int, Refusal]) -> list[str]:
        # Advice from the filters that alone keep some host out (it would fit but for
        # that one); when every host fails several, from each filter that removed hosts.
        if not masks:
            return []
        failing = [~mask for mask in masks]
        fail_count = np.sum(failing, axis=0)
        sole = [np.flatnonzero(f & (fail_count == 1)) for f in failing]
        chosen = [k for k, hosts in enumerate(sole) if hosts.size]
        if not chosen:
            named = {r.filter for r in first.values()}
            chosen = [k for k, flt in enumerate(self.filters) if flt.name in named]
        hints = []
        for k in chosen:
            hint = self.filters[k].hint(inv, req, np.flatnonzero(failing[k]).tolist())
            if hint is not None:
                hints.append(hint)
        return hints

    def explain(self, inv: Inventory, req: Request) -> Explanation:
        """Every filter's verdict on every host, and the weighers' on those that pass."""
        n = len(inv)
        masks = [flt.mask(inv, req) for flt in self.filters]
        alive = np.ones(n, dtype=np.bool_)
        removed: list[tuple[str, int]] = []
        first: dict[int, Refusal] = {}
        for flt, mask in zip(self.filters, masks, strict=True):
            gone = np.flatnonzero(alive & ~mask)
            removed.append((flt.name, int(gone.size)))
            for g in gone.tolist():
                first[g] = flt.refusal(inv, req, g)
            alive &= mask
        reasons: dict[tuple[str, str], tuple[Refusal, int]] = {}
        filter_order = {flt.name: k for k, flt in enumerate(self.filters)}
        for i in sorted(first, key=lambda i: (filter_order[first[i].filter], i)):
            refusal = first[i]
            key = (refusal.filter, refusal.key)
            reasons[key] = (reasons[key][0] if key in reasons else refusal,
                            reasons[key][1] + 1 if key in reasons else 1)
        hints = self._hints(inv, req, masks, first)
        candidates = np.flatnonzero(alive)
        verdicts: list[HostVerdict] = []
        if candidates.size:
            totals, parts = self._weigh(inv, req, candidates)
            for k, c in enumerate(candidates.tolist()):
                scores = {name: 0.0 if p is None else float(p[k]) for name, p in parts.items()}
                verdicts.append(HostVerdict(inv.names[c], True, scores=scores,
                                            total=float(totals[k])))
            verdicts.sort(key=lambda v: -(v.total or 0.0))  # stable: name order among ties
        for h in np.flatnonzero(~alive).tolist():
            refusals = tuple(flt.refusal(inv, req, h)
                             for flt, mask in zip(self.filters, masks, strict=True)
                             if not mask[h])
            verdicts.append(HostVerdict(inv.names[h], False, refusals=refusals))
        return Explanation(
            machine=req.name, needs=req.needs, hosts=n, removed=tuple(removed),
            reasons=tuple(reasons.values()), hints=tuple(hints), verdicts=tuple(verdicts),
        )
