"""Why a machine goes where it goes, or why it goes nowhere."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.errors import InsufficientResources
from corral.scheduler.base import Refusal
from corral.scheduler.values import Resources


@dataclass(frozen=True, slots=True)
class HostVerdict:
    """One host's outcome: the refusal of every filter it failed, or its weigher scores
    (already multiplied) and their total."""

    host: str
    passed: bool
    refusals: tuple[Refusal, ...] = ()
    scores: Mapping[str, float] = field(default_factory=dict)
    total: float | None = None


def _hosts(n: int) -> str:
    return "1 host" if n == 1 else f"{n:,} hosts"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


@dataclass(frozen=True, slots=True)
class Explanation:
    """The scheduler's reasoning for one request over one inventory.

    ``removed`` gives, for every filter in order, how many hosts it removed first
    (a host failing several filters counts once, for the first). ``reasons`` groups
    those hosts by the first filter's refusal key, in filter order then first
    appearance. ``verdicts`` lists the passing hosts best first, then the others by
    name.
    """

    machine: str
    needs: Resources
    hosts: int
    removed: tuple[tuple[str, int], ...]
    reasons: tuple[tuple[Refusal, int], ...]
    hints: tuple[str, ...]
    verdicts: tuple[HostVerdict, ...]

    @property
    def passed(self) -> int:
        return self.hosts - sum(count for _, count in self.removed)

    @property
    def best(self) -> str | None:
        return self.verdicts[0].host if self.verdicts and self.verdicts[0].passed else None

    def summary(self) -> str:
        """One sentence: the request, the hosts and what removed each of them."""
        what = f"'{self.machine}' ({self.needs.describe()})"
        if self.best is not None:
            return (f"{self.passed:,} of {_hosts(self.hosts)} can take {what}; "
                    f"'{self.best}' scores best.")
        if self.hosts == 0:
            return f"No host can take {what}: there are no hosts."
        parts = [f"{n:,} {r.singular if n == 1 else r.plural}" for r, n in self.reasons]
        return f"No host can take {what}: of {_hosts(self.hosts)}, {_join(parts)}."

    def hint(self) -> str | None:
        """What a person can do, one sentence per filter that removed hosts."""
        if self.best is not None:
            return None
        if self.hosts == 0:
            return "Add a host."
        return " ".join(self.hints) or None

    def lines(self) -> list[str]:
        """The per-host breakdown as a plain-text table, header first."""
        width = max([4, *(len(v.host) for v in self.verdicts)])
        out = [f"{'HOST':<{width}}  {'RESULT':<7}  {'SCORE':>7}  WHY"]
        for v in self.verdicts:
            if v.passed:
                why = ", ".join(f"{name} {score:.2f}" for name, score in v.scores.items())
                score = f"{v.total:7.2f}"
            else:
                why = "; ".join(f"{r.filter}: {r.detail}" for r in v.refusals)
                score = f"{'-':>7}"
            out.append(f"{v.host:<{width}}  {'fits' if v.passed else 'refused':<7}  {score}  {why}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Stable keys for JSON."""
        return {
            "machine": self.machine,
            "needs": {
                "cpus": self.needs.cpus,
                "memory_bytes": self.needs.memory_bytes,
                "disk_bytes": self.needs.disk_bytes,
            },
            "hosts": self.hosts,
            "passed": self.passed,
            "best": self.best,
            "summary": self.summary(),
            "hint": self.hint(),
            "removed": [{"filter": name, "hosts": n} for name, n in self.removed],
            "verdicts": [
                {
                    "host": v.host,
                    "passed": v.passed,
                    "total": v.total,
                    "scores": dict(v.scores),
                    "refusals": [
                        {"filter": r.filter, "key": r.key, "detail": r.detail}
                        for r in v.refusals
                    ],
                }
                for v in self.verdicts
            ],
        }


class NoValidHost(InsufficientResources):
    """No host passes every filter for a machine; ``explanation`` says why, host by host."""

    def __init__(self, explanation: Explanation) -> None:
        super().__init__(explanation.summary(), hint=explanation.hint())
        self.explanation = explanation
        self.machine = explanation.machine
