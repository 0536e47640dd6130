"""The built-in filters, in the order they run: a host is counted, in explanations,
by the first filter that removes it."""

from __future__ import annotations

from corral.scheduler.filters.capacity import CapacityFilter
from corral.scheduler.filters.group import GroupFilter
from corral.scheduler.filters.platform import PlatformFilter
from corral.scheduler.filters.state import StateFilter
from corral.scheduler.filters.tags import TagFilter

BUILTIN_FILTERS = (StateFilter, PlatformFilter, TagFilter, CapacityFilter, GroupFilter)

__all__ = [
    "BUILTIN_FILTERS",
    "CapacityFilter",
    "GroupFilter",
    "PlatformFilter",
    "StateFilter",
    "TagFilter",
]
