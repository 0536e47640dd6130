"""The pool of hosts as numpy arrays, so that one decision over thousands costs microseconds.

An :class:`Inventory` is built once from :class:`HostView` values and then kept current
in place by :meth:`Inventory.claim` and :meth:`Inventory.release`. Hosts are held in
name order, so the first of equal scores is the host whose name sorts first: ties are
broken deterministically, by name.

Filters and weighers read the public arrays (one entry per host, in :attr:`names`
order) and must never write to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from corral.errors import Conflict, InsufficientResources, InvalidInput, NotFound
from corral.model.states import HostState
from corral.scheduler.values import HostView, Request, Resources

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]

STATE_CODES: Final = {HostState.UP: 0, HostState.DOWN: 1, HostState.MAINTENANCE: 2}
CPU, MEMORY, DISK = 0, 1, 2
"""Rows of :attr:`Inventory.capacity`, :attr:`~Inventory.effective`, ``used`` and ``free``."""


def _readonly(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False
    return array


class Inventory:
    """Hosts as columns of arrays; ``claim``/``release`` update them in place.

    Public arrays (read-only by contract): ``state`` (int8, :data:`STATE_CODES`),
    ``capacity``/``effective``/``used``/``free`` (int64, shape ``(3, n)``: rows
    :data:`CPU`, :data:`MEMORY`, :data:`DISK`; effective = floor(capacity × ratio),
    free = effective − used, negative when the store overcommitted), ``ratios``
    (float64, ``(3, n)``), ``cpu_score`` (float64, NaN when unmeasured).
    """

    def __init__(self, hosts: Iterable[HostView]) -> None:
        views = sorted(hosts, key=lambda h: h.name)
        self.names: tuple[str, ...] = tuple(h.name for h in views)
        self._index = {name: i for i, name in enumerate(self.names)}
        if len(self._index) != len(views):
            twice = next(a for a, b in zip(self.names, self.names[1:], strict=False) if a == b)
            raise InvalidInput(f"Host '{twice}' appears twice in the inventory.")
        n = len(views)
        self._views = views  # the static parts; used and groups live in the arrays
        self.state = np.array([STATE_CODES[h.state] for h in views], dtype=np.int8)
        self.up: BoolArray = _readonly(self.state == 0)
        self.every: BoolArray = _readonly(np.ones(n, dtype=np.bool_))
        self._arch_codes, self.arch = self._encode([h.arch for h in views])
        self._accel_codes, self.accel = self._encode([h.accelerator for h in views])
        self.capacity: IntArray = np.array(
            [[h.capacity.cpus, h.capacity.memory_bytes, h.capacity.disk_bytes] for h in views],
            dtype=np.int64,
        ).reshape(n, 3).T.copy()
        self.ratios: FloatArray = np.array(
            [[h.ratios.cpu, h.ratios.memory, h.ratios.disk] for h in views], dtype=np.float64
        ).reshape(n, 3).T.copy()
        self.effective: IntArray = np.floor(self.capacity * self.ratios).astype(np.int64)
        self.used: IntArray = np.array(
            [[h.used.cpus, h.used.memory_bytes, h.used.disk_bytes] for h in views],
            dtype=np.int64,
        ).reshape(n, 3).T.copy()
        self.free: IntArray = self.effective - self.used
        self.cpu_score: FloatArray = np.array(
            [np.nan if h.cpu_score is None else h.cpu_score for h in views], dtype=np.float64
        )
        self._tags = self._presence(views, lambda h: h.tags)
        self._images = self._presence(views, lambda h: h.images)
        self._host_groups: list[dict[str, int]] = [
            {g: c for g, c in h.groups.items() if c > 0} for h in views
        ]
        self._groups: dict[str, IntArray] = {}
        for i, groups in enumerate(self._host_groups):
            for group, count in groups.items():
                self._group_array(group)[i] = count
        self._none: BoolArray = _readonly(np.zeros(n, dtype=np.bool_))
        self._no_counts: IntArray = _readonly(np.zeros(n, dtype=np.int64))

    @staticmethod
    def _encode(values: list[str]) -> tuple[dict[str, int], npt.NDArray[np.int16]]:
        codes: dict[str, int] = {}
        array = np.array([codes.setdefault(v, len(codes)) for v in values], dtype=np.int16)
        return codes, array

    @staticmethod
    def _presence(views: list[HostView], of: Any) -> dict[str, BoolArray]:
        found: dict[str, BoolArray] = {}
        for i, h in enumerate(views):
            for item in of(h):
                if item not in found:
                    found[item] = np.zeros(len(views), dtype=np.bool_)
                found[item][i] = True
        return found

    def _group_array(self, group: str) -> IntArray:
        array = self._groups.get(group)
        if array is None:
            array = self._groups[group] = np.zeros(len(self.names), dtype=np.int64)
        return array

    # -- reading -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    def index(self, host: str) -> int:
        try:
            return self._index[host]
        except KeyError:
            raise NotFound("host", host) from None

    def arch_mask(self, arch: str) -> BoolArray:
        code = self._arch_codes.get(arch)
        return self._none if code is None else self.arch == code

    def accel_mask(self, accelerator: str) -> BoolArray:
        code = self._accel_codes.get(accelerator)
        return self._none if code is None else self.accel == code

    def tag_mask(self, tag: str) -> BoolArray:
        """True where the host carries ``tag`` (a shared array: do not write to it)."""
        return self._tags.get(tag, self._none)

    def image_mask(self, image: str) -> BoolArray:
        """True where ``image`` is already in the host's pool (shared: do not write)."""
        return self._images.get(image, self._none)

    def group_counts(self, group: str) -> IntArray:
        """The group's machines on each host (shared: do not write)."""
        return self._groups.get(group, self._no_counts)

    def host_tags(self, i: int) -> frozenset[str]:
        return self._views[i].tags

    def host_platform(self, i: int) -> tuple[str, str]:
        """Host ``i``'s (arch, accelerator)."""
        return self._views[i].arch, self._views[i].accelerator

    def view(self, host: str) -> HostView:
        """The host as it is now, with its current claims and group counts."""
        i = self.index(host)
        return replace(
            self._views[i],
            used=Resources(*(int(v) for v in self.used[:, i])),
            groups=MappingProxyType(dict(self._host_groups[i])),
        )

    def views(self) -> list[HostView]:
        return [self.view(name) for name in self.names]

    # -- changing ----------------------------------------------------------------------

    def claim(self, host: str, req: Request, *, force: bool = False) -> None:
        """Reserve ``req.needs`` on ``host`` and count it in its group.

        Raises InsufficientResources, changing nothing, if the host lacks any resource
        (unless ``force``: recording what already exists may overcommit). Not
        idempotent: every claim must be matched by exactly one :meth:`release`.
        """
        i = self.index(host)
        needs = req.needs
        wants = (needs.cpus, needs.memory_bytes, needs.disk_bytes)
        free = self.free
        if not force and (
            wants[0] > free[0, i] or wants[1] > free[1, i] or wants[2] > free[2, i]
        ):
            raise InsufficientResources(
                f"Host '{host}' cannot take '{req.name}' ({needs.describe()}).",
                hint="Place the machine again; the inventory changed.",
            )
        for row, amount in enumerate(wants):
            self.used[row, i] += amount
            free[row, i] -= amount
        if req.group is not None:
            self._group_array(req.group)[i] += 1
            groups = self._host_groups[i]
            groups[req.group] = groups.get(req.group, 0) + 1

    def release(self, host: str, req: Request) -> None:
        """Give back what :meth:`claim` reserved for ``req`` on ``host``.

        Raises Conflict, changing nothing, if the host holds less than that claim.
        """
        i = self.index(host)
        needs = req.needs
        wants = (needs.cpus, needs.memory_bytes, needs.disk_bytes)
        held = self._host_groups[i].get(req.group, 0) if req.group is not None else 1
        if held < 1 or any(self.used[row, i] < amount for row, amount in enumerate(wants)):
            raise Conflict(f"Host '{host}' holds no claim for '{req.name}' to release.")
        for row, amount in enumerate(wants):
            self.used[row, i] -= amount
            self.free[row, i] += amount
        if req.group is not None:
            self._groups[req.group][i] -= 1
            groups = self._host_groups[i]
            if groups[req.group] == 1:
                del groups[req.group]
            else:
                groups[req.group] -= 1

    def add_image(self, host: str, image: str) -> None:
        """Record that ``image`` is now in the host's pool (after a copy)."""
        i = self.index(host)
        if image not in self._images:
            self._images[image] = np.zeros(len(self.names), dtype=np.bool_)
        self._images[image][i] = True
        self._views[i] = replace(self._views[i], images=self._views[i].images | {image})

    def copy(self) -> Inventory:
        """An independent inventory in the same state (for plans that try moves)."""
        twin = object.__new__(Inventory)
        twin.__dict__.update(self.__dict__)
        twin._views = list(self._views)
        twin.used = self.used.copy()
        twin.free = self.free.copy()
        twin._images = {k: v.copy() for k, v in self._images.items()}
        twin._groups = {k: v.copy() for k, v in self._groups.items()}
        twin._host_groups = [dict(g) for g in self._host_groups]
        return twin
