"""The values the scheduler reads and returns: frozen, typed, and free of I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from corral.errors import InvalidInput
from corral.model.host import Overcommit
from corral.model.states import GroupPolicy, HostState
from corral.model.units import format_size


@dataclass(frozen=True, slots=True)
class Resources:
    """vCPUs (or hardware threads), memory and disk, in units and bytes."""

    cpus: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpus + other.cpus,
            self.memory_bytes + other.memory_bytes,
            self.disk_bytes + other.disk_bytes,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.cpus - other.cpus,
            self.memory_bytes - other.memory_bytes,
            self.disk_bytes - other.disk_bytes,
        )

    def describe(self) -> str:
        """``2 vCPUs, 4.0 GiB memory, 20.0 GiB disk``."""
        vcpus = "1 vCPU" if self.cpus == 1 else f"{self.cpus} vCPUs"
        return (
            f"{vcpus}, {format_size(self.memory_bytes)} memory, "
            f"{format_size(self.disk_bytes)} disk"
        )


@dataclass(frozen=True, slots=True)
class HostView:
    """What the scheduler knows of one host at one instant.

    ``capacity`` is physical (threads, memory, storage-pool bytes); ``used`` is the sum
    of the claims of the machines already on it; ``groups`` counts, per placement
    group, the group's machines on this host.
    """

    name: str
    capacity: Resources
    state: HostState = HostState.UP
    arch: str = "x86_64"
    accelerator: str = "kvm"
    ratios: Overcommit = field(default_factory=Overcommit)
    used: Resources = field(default_factory=Resources)
    tags: frozenset[str] = frozenset()
    cpu_score: float | None = None
    images: frozenset[str] = frozenset()
    groups: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Request:
    """One machine to place.

    ``arch``/``accelerator`` None accept any host; ``tags`` must all be on the host.
    ``hard`` makes the group policy a filter; soft makes it only a weigher preference.
    ``fast`` asks for the host with the fastest single thread.
    """

    name: str
    needs: Resources
    image: str | None = None
    arch: str | None = None
    accelerator: str | None = None
    tags: frozenset[str] = frozenset()
    group: str | None = None
    policy: GroupPolicy | None = None
    hard: bool = True
    fast: bool = False

    def __post_init__(self) -> None:
        needs = self.needs
        if min(needs.cpus, needs.memory_bytes, needs.disk_bytes) < 0:
            raise InvalidInput(f"Machine '{self.name}' asks for a negative amount.")
        if self.policy is not None and self.group is None:
            raise InvalidInput(
                f"Machine '{self.name}' has a group policy but no group.",
                hint="Name the placement group, or drop the policy.",
            )


DEFAULT_MULTIPLIERS: Mapping[str, float] = MappingProxyType(
    # cpu_score only counts for fast requests, and then it should win: 10 outweighs
    # everything else together (2.5), unless two hosts are nearly as fast.
    {"memory": 1.0, "cpu_score": 10.0, "image": 0.5, "group": 1.0}
)


@dataclass(frozen=True, slots=True)
class Weighting:
    """How hosts that pass every filter are ranked.

    ``spread`` prefers the most free memory, ``pack`` the least that still fits.
    ``multipliers`` override :data:`DEFAULT_MULTIPLIERS` by weigher name; a weigher
    named nowhere gets 1.0.
    """

    mode: Literal["spread", "pack"] = "spread"
    multipliers: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("spread", "pack"):
            raise InvalidInput(
                f"'{self.mode}' is not a weighting mode.", hint="Use spread or pack."
            )

    def multiplier(self, weigher: str) -> float:
        if weigher in self.multipliers:
            return self.multipliers[weigher]
        return DEFAULT_MULTIPLIERS.get(weigher, 1.0)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a machine goes: the host, its total score and each weigher's share of it."""

    machine: str
    host: str
    score: float
    scores: Mapping[str, float]
