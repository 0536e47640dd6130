"""Placement: the most fitting host for each machine, and the reason for every refusal.

Pure: no I/O, no libvirt, no database. The caller builds an :class:`Inventory` from
:class:`HostView` values (what the store and libvirt say of each host), then asks a
:class:`Scheduler`::

    inv = Inventory(host_views)
    scheduler = Scheduler(load_filters(), load_weighers(), Weighting(mode="spread"))
    placement = scheduler.place(inv, Request("web-1", Resources(2, 4 << 30, 20 << 30)))
    inv.claim(placement.host, request)          # reserve, in memory
    scheduler.place_batch(inv, requests)        # all or nothing, claimed as it goes
    scheduler.explain(inv, request).lines()     # every host's verdict
    rebalance_plan(inv, placements, scheduler)  # moves that even out memory use

Filters run in order — state (up, not down or in maintenance), platform (required
arch and accelerator), tags (all of the request's), capacity (vCPUs, memory and disk
against capacity × overcommit ratio minus claims), group (hard affinity and
anti-affinity) — each a vectorised :meth:`Filter.mask` over every host at once. The
weighers — memory (spread: most free; pack: least free that fits), cpu_score (fast
requests only), image (already in the host's pool), group (soft policies) — each
return one number per candidate; numbers are normalised to [0, 1] over the candidates
and multiplied by :attr:`Weighting.multipliers`, and the best total wins, the first
host by name among equals.

When no host passes, :class:`NoValidHost` (an InsufficientResources) carries an
:class:`Explanation`: its ``summary()`` is the error's sentence, e.g. ::

    No host can take 'web-1' (2 vCPUs, 4.0 GiB memory, 20.0 GiB disk): of 5 hosts,
    1 is down, 2 lack tag 'ssd' and 2 lack memory.

Third parties add filters and weighers through the entry-point groups
``corral.scheduler.filters`` and ``corral.scheduler.weighers``.
"""

from corral.model.host import Overcommit
from corral.scheduler.base import Filter, Refusal, Weigher
from corral.scheduler.engine import Scheduler, load_filters, load_weighers
from corral.scheduler.explain import Explanation, HostVerdict, NoValidHost
from corral.scheduler.inventory import Inventory
from corral.scheduler.rebalance import Move, rebalance_plan
from corral.scheduler.values import (
    DEFAULT_MULTIPLIERS,
    HostView,
    Placement,
    Request,
    Resources,
    Weighting,
)

__all__ = [
    "DEFAULT_MULTIPLIERS",
    "Explanation",
    "Filter",
    "HostVerdict",
    "HostView",
    "Inventory",
    "Move",
    "NoValidHost",
    "Overcommit",
    "Placement",
    "Refusal",
    "Request",
    "Resources",
    "Scheduler",
    "Weigher",
    "Weighting",
    "load_filters",
    "load_weighers",
    "rebalance_plan",
]
