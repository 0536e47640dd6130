"""Small hand-made hosts and requests for the scheduler's tests."""

from __future__ import annotations

from collections.abc import Mapping

from corral.model.states import GroupPolicy, HostState
from corral.scheduler import HostView, Overcommit, Request, Resources

GiB = 1 << 30


def host(
    name: str,
    *,
    cpus: int = 8,
    memory: int = 16,
    disk: int = 100,
    used: tuple[int, int, int] = (0, 0, 0),
    state: HostState = HostState.UP,
    arch: str = "x86_64",
    accelerator: str = "kvm",
    ratios: Overcommit | None = None,
    tags: frozenset[str] | set[str] = frozenset(),
    cpu_score: float | None = None,
    images: frozenset[str] | set[str] = frozenset(),
    groups: Mapping[str, int] | None = None,
) -> HostView:
    """A host with ``memory`` and ``disk`` in GiB (``used`` too: cpus, GiB, GiB)."""
    return HostView(
        name=name,
        capacity=Resources(cpus, memory * GiB, disk * GiB),
        state=state,
        arch=arch,
        accelerator=accelerator,
        ratios=ratios or Overcommit(),
        used=Resources(used[0], used[1] * GiB, used[2] * GiB),
        tags=frozenset(tags),
        cpu_score=cpu_score,
        images=frozenset(images),
        groups=dict(groups or {}),
    )


def request(
    name: str = "web-1",
    *,
    cpus: int = 2,
    memory: int = 4,
    disk: int = 20,
    image: str | None = None,
    arch: str | None = None,
    accelerator: str | None = None,
    tags: frozenset[str] | set[str] = frozenset(),
    group: str | None = None,
    policy: GroupPolicy | None = None,
    hard: bool = True,
    fast: bool = False,
) -> Request:
    """A request with ``memory`` and ``disk`` in GiB."""
    return Request(
        name=name,
        needs=Resources(cpus, memory * GiB, disk * GiB),
        image=image,
        arch=arch,
        accelerator=accelerator,
        tags=frozenset(tags),
        group=group,
        policy=policy,
        hard=hard,
        fast=fast,
    )
