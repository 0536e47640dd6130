from __future__ import annotations

from typing import Any

import pytest

from corral.errors import DriverNotFound, InsufficientResources
from corral.model.states import GroupPolicy, HostState
from corral.scheduler import (
    Filter,
    Inventory,
    NoValidHost,
    Refusal,
    Request,
    Resources,
    Scheduler,
    Weighting,
    engine,
    load_filters,
    load_weighers,
)
from corral.scheduler.inventory import BoolArray
from tests.unit.scheduler.build import GiB, host, request


def test_place_does_not_claim() -> None:
    inv = Inventory([host("a"), host("b", memory=32)])
    placement = Scheduler().place(inv, request())
    assert (placement.machine, placement.host) == ("web-1", "b")
    assert inv.view("b").used == Resources(0, 0, 0)


def test_place_raises_no_valid_host_with_the_explanation() -> None:
    inv = Inventory([host("a", state=HostState.DOWN)])
    with pytest.raises(NoValidHost) as caught:
        Scheduler().place(inv, request())
    assert isinstance(caught.value, InsufficientResources)
    assert caught.value.machine == "web-1"
    assert caught.value.explanation.removed[0] == ("state", 1)
    assert caught.value.http_status == 409


def test_batch_anti_affinity_puts_one_per_host_and_a_fourth_fails() -> None:
    inv = Inventory([host("a"), host("b"), host("c")])
    group = {"group": "web", "policy": GroupPolicy.ANTI_AFFINITY}
    reqs = [request(f"web-{k}", **group) for k in (1, 2, 3)]
    placements = Scheduler().place_batch(inv, reqs)
    assert sorted(p.host for p in placements) == ["a", "b", "c"]
    assert [p.machine for p in placements] == ["web-1", "web-2", "web-3"]
    assert inv.group_counts("web").tolist() == [1, 1, 1]
    with pytest.raises(NoValidHost) as caught:
        Scheduler().place_batch(inv, [request("web-4", **group)])
    assert str(caught.value) == (
        "No host can take 'web-4' (2 vCPUs, 4.0 GiB memory, 20.0 GiB disk): of 3 hosts,"
        " 3 already run a machine of group 'web'. Add a host, or make group 'web' soft.")


def test_a_failed_batch_releases_its_claims_and_names_the_machine() -> None:
    inv = Inventory([host("a", memory=8), host("b", memory=8)])
    reqs = [request("m1", memory=6), request("m2", memory=6), request("m3", memory=6)]
    with pytest.raises(NoValidHost) as caught:
        Scheduler().place_batch(inv, reqs)
    assert caught.value.machine == "m3"
    # explained against the inventory as the batch had left it
    assert "of 2 hosts, 2 lack memory" in caught.value.message
    assert inv.view("a").used == Resources(0, 0, 0)
    assert inv.view("b").used == Resources(0, 0, 0)


def test_batch_without_claim_is_a_plan_only() -> None:
    inv = Inventory([host("a", memory=8), host("b", memory=8)])
    reqs = [request("m1", memory=6), request("m2", memory=6)]
    placements = Scheduler().place_batch(inv, reqs, claim=False)
    assert sorted(p.host for p in placements) == ["a", "b"]  # capacity held within the batch
    assert inv.free[1].tolist() == [8 * GiB, 8 * GiB]


def test_pack_batch_places_largest_first_and_returns_request_order() -> None:
    # online best fit in arrival order needs 3 hosts (2+2, 6, 6);
    # largest first needs 2 (6+2, 6+2)
    inv = Inventory([host(name, memory=8) for name in ("a", "b", "c")])
    reqs = [request("s1", memory=2), request("s2", memory=2), request("l1", memory=6),
            request("l2", memory=6)]
    pack = Scheduler(weighting=Weighting(mode="pack"))
    placements = pack.place_batch(inv, reqs)
    assert [p.machine for p in placements] == ["s1", "s2", "l1", "l2"]
    assert len({p.host for p in placements}) == 2
    inv2 = Inventory([host(name, memory=8) for name in ("a", "b", "c")])
    online = set()
    for req in reqs:
        placement = pack.place(inv2, req)
        inv2.claim(placement.host, req)
        online.add(placement.host)
    assert len(online) == 3


def test_spread_batch_keeps_arrival_order() -> None:
    # largest first would put l on a and s on b
    inv = Inventory([host("a", memory=10), host("b", memory=9)])
    placements = Scheduler().place_batch(inv, [request("s", memory=2), request("l", memory=8)])
    assert [(p.machine, p.host) for p in placements] == [("s", "a"), ("l", "b")]


class OnlyHost(Filter):
    name = "only"

    def __init__(self, host: str = "b") -> None:
        self.host = host

    def mask(self, inv: Inventory, req: Request) -> BoolArray:
        mask = inv.every.copy()
        mask[:] = False
        mask[inv.index(self.host)] = True
        return mask

    def refusal(self, inv: Inventory, req: Request, i: int) -> Refusal:
        return Refusal(self.name, "other", "is not b", "are not b", "not b")


class FakeEntryPoint:
    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value

    def load(self) -> Any:
        return self.value


def test_load_filters_returns_builtins_then_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(group: str) -> list[FakeEntryPoint]:
        if group == "corral.scheduler.filters":
            return [FakeEntryPoint("only", OnlyHost), FakeEntryPoint("state", object)]
        return []

    monkeypatch.setattr(engine, "entry_points", fake)
    filters = load_filters()
    assert [f.name for f in filters] == ["state", "platform", "tags", "capacity", "group",
                                         "only"]
    assert [w.name for w in load_weighers()] == ["memory", "cpu_score", "image", "group"]
    chosen = load_filters(["only", "state"])
    assert [f.name for f in chosen] == ["only", "state"]
    inv = Inventory([host("a"), host("b"), host("c")])
    assert Scheduler(filters=filters).place(inv, request()).host == "b"
    with pytest.raises(DriverNotFound, match=r"No corral\.scheduler\.filters plugin named 'x'"):
        load_filters(["x"])


def test_a_plugin_that_is_not_a_filter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "entry_points",
                        lambda group: [FakeEntryPoint("bad", object())])
    with pytest.raises(TypeError, match="plugin 'bad' is not a Filter"):
        load_filters()
