"""Placement as an operation: the store's pool becomes the scheduler's inventory, and
the scheduler's choices become claims (see ``Store.create_claimed_jobs``)."""

from __future__ import annotations

from dataclasses import replace

from corral.errors import InvalidInput
from corral.model import Image, Machine, MachineSpec, PlacementHints
from corral.ops.context import Context
from corral.scheduler import (
    HostView,
    Inventory,
    Move,
    Request,
    Resources,
    Scheduler,
    Weighting,
    load_filters,
    load_weighers,
    rebalance_plan,
)
from corral.store.repository import HostLoad


def scheduler(ctx: Context, mode: str | None = None) -> Scheduler:
    s = ctx.settings
    weighting = Weighting(mode=mode or s.placement,  # type: ignore[arg-type]
                          multipliers=s.weigher_multipliers)
    return Scheduler(load_filters(), load_weighers(), weighting)


def inventory(ctx: Context, only: str | None = None, *, exclude: str | None = None) -> Inventory:
    """Every enrolled host as the scheduler sees it now (or just ``only``; never
    ``exclude``, the host a machine moves away from)."""
    local_images = frozenset(i.name for i in ctx.store.list_images())
    views = [
        host_view(ctx, load, local_images)
        for load in ctx.store.pool_snapshot()
        if (only is None or load.host.name == only) and load.host.name != exclude
    ]
    if only is not None and not views:
        ctx.store.get_host(only)  # NotFound, with its hint
    return Inventory(views)


def host_view(ctx: Context, load: HostLoad, local_images: frozenset[str]) -> HostView:
    h = load.host
    # The local host clones straight from the library: every image is there.
    images = local_images if h.name == ctx.settings.host_name else load.images
    return HostView(
        name=h.name,
        capacity=Resources(h.facts.cpus, h.facts.memory_bytes, h.disk_bytes),
        state=h.state,
        arch=h.facts.arch,
        accelerator=h.accelerator.value,
        ratios=h.placement.ratios(ctx.overcommit),
        used=Resources(load.used.cpus, load.used.memory_bytes, load.used.disk_bytes),
        tags=h.placement.tags,
        cpu_score=h.cpu_score,
        images=images,
        groups=load.groups,
    )


def request(name: str, spec: MachineSpec, image: Image, claim: int) -> Request:
    h = spec.placement
    return Request(
        name=name,
        needs=Resources(spec.cpus, spec.memory_bytes, claim),
        image=image.name,
        arch=image.arch,
        accelerator=image.accelerator.value if image.accelerator else None,
        tags=h.tags,
        group=h.group,
        policy=h.policy,
        hard=h.hard,
        fast=h.fast,
    )


def machine_request(m: Machine, image: Image | None) -> Request:
    """A recorded machine as a request, to place it again (rebalance plans)."""
    h = m.placement
    return Request(
        name=m.name,
        needs=Resources(m.cpus, m.memory_bytes, m.disk_claim),
        image=m.image,
        arch=image.arch if image else None,
        accelerator=image.accelerator.value if image and image.accelerator else None,
        tags=h.tags, group=h.group, policy=h.policy, hard=h.hard, fast=h.fast,
    )


def group_hints(ctx: Context, hints: PlacementHints) -> PlacementHints:
    """The hints with the group's policy: a group keeps what its first machine gave it."""
    if hints.group is None:
        if hints.policy is not None:
            raise InvalidInput("An affinity policy needs a group: add --group NAME.")
        return hints
    existing = ctx.store.group_policy(hints.group)
    if existing is None:
        if hints.policy is None:
            raise InvalidInput(
                f"Placement group '{hints.group}' is new: say --affinity or --anti-affinity."
            )
        return hints
    if hints.policy is not None and (hints.policy, hints.hard) != (existing.policy,
                                                                    existing.hard):
        strength = "hard" if existing.hard else "soft"
        raise InvalidInput(
            f"Placement group '{hints.group}' is {strength} "
            f"{existing.policy.value if existing.policy else 'without policy'}; "
            "a machine cannot join it with another policy.",
            hint="Leave out the policy to join the group as it is, or use a new group.",
        )
    return replace(hints, policy=existing.policy, hard=existing.hard)


def rebalance(ctx: Context, max_moves: int = 50) -> list[Move]:
    """Migrations that would narrow the load spread between hosts, under the same rules
    as placement: ``corral pool rebalance --dry-run``. Moves nothing."""
    images = {i.name: i for i in ctx.store.list_images()}
    placements = [
        (m.name, m.host, machine_request(m, images.get(m.image) if m.image else None))
        for m in ctx.store.list_machines()
    ]
    return rebalance_plan(inventory(ctx), placements, scheduler(ctx), max_moves=max_moves)
