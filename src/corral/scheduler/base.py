"""The two contracts of placement, after OpenStack Nova: a filter answers one question
about every host at once; a weigher returns one number per candidate host, and the
scheduler normalises and multiplies.

Both are stateless and pure: they read the :class:`Inventory` and the :class:`Request`
and change neither. Third parties register theirs in the entry-point groups
``corral.scheduler.filters`` and ``corral.scheduler.weighers`` (a class with a
no-argument constructor, or an instance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from corral.scheduler.inventory import BoolArray, FloatArray, IndexArray, Inventory
from corral.scheduler.values import Request, Weighting


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one filter refuses one host.

    Hosts refused for the same ``key`` by the same filter are counted together in an
    explanation's summary, which reads "1 {singular}" or "3 {plural}"; ``detail`` is
    the host's own figures.
    """

    filter: str
    key: str
    singular: str
    plural: str
    detail: str


class Filter(ABC):
    """Removes the hosts that cannot take a request, and says why."""

    name: ClassVar[str]

    @abstractmethod
    def mask(self, inv: Inventory, req: Request) -> BoolArray:
        """True for every host that may take ``req``; one entry per host, in
        ``inv.names`` order. The result may be a shared array: never write to it."""

    @abstractmethod
    def refusal(self, inv: Inventory, req: Request, i: int) -> Refusal:
        """Why host ``i`` fails; called only where :meth:`mask` is False."""

    def hint(self, inv: Inventory, req: Request, refused: Sequence[int]) -> str | None:
        """One sentence on what a person can do about the hosts this filter refuses
        (``refused``, indices, not empty), or None."""
        return None


class Weigher(ABC):
    """Ranks the hosts that passed every filter: bigger is better."""

    name: ClassVar[str]

    @abstractmethod
    def raw(
        self, inv: Inventory, req: Request, candidates: IndexArray, weighting: Weighting
    ) -> FloatArray | None:
        """One number per candidate (indices into the inventory), or None when this
        weigher has no opinion on ``req``. The scheduler normalises the numbers to
        [0, 1] over the candidates (min-max; all equal gives 0) and multiplies them by
        ``weighting.multiplier(self.name)``."""
