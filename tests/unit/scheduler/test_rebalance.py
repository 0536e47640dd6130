from __future__ import annotations

from collections.abc import Sequence

from corral.model.states import GroupPolicy, HostState
from corral.scheduler import Inventory, Move, Request, Scheduler, rebalance_plan
from corral.scheduler.inventory import MEMORY
from tests.unit.scheduler.build import host, request

Placed = list[tuple[str, str, Request]]


def build(hosts: Sequence[tuple[str, int]], machines: Placed,
          **kw: HostState) -> Inventory:
    inv = Inventory([host(name, memory=memory, cpus=64, state=kw.get(name, HostState.UP))
                     for name, memory in hosts])
    for _, where, req in machines:
        inv.claim(where, req)
    return inv


def spread(inv: Inventory) -> float:
    u = inv.used[MEMORY][inv.up] / inv.effective[MEMORY][inv.up]
    return float(u.max() - u.min())


def apply(inv: Inventory, machines: Placed, moves: list[Move]) -> dict[str, str]:
    where = {m: h for m, h, _ in machines}
    reqs = {m: r for m, _, r in machines}
    for move in moves:
        assert where[move.machine] == move.source
        inv.release(move.source, reqs[move.machine])
        inv.claim(move.target, reqs[move.machine])
        where[move.machine] = move.target
    return where


def test_moves_from_the_most_loaded_host_narrow_the_spread_and_change_nothing() -> None:
    machines: Placed = [(f"m{k}", "a", request(f"m{k}", memory=4)) for k in range(4)]
    inv = build([("a", 16), ("b", 16), ("c", 16)], machines)
    moves = rebalance_plan(inv, machines, Scheduler())
    assert inv.used[MEMORY].tolist() == [16 << 30, 0, 0]  # a plan only
    assert [(m.machine, m.source, m.target) for m in moves] == [
        ("m0", "a", "b"), ("m1", "a", "c")]
    assert moves[0].spread_before == 1.0
    assert moves[0].spread_after == 0.75
    assert moves[1].spread_after == 0.25
    assert moves[0].reason == (
        "'a' is the most loaded host (100% of its memory); moving 'm0' to 'b' narrows the"
        " spread from 100% to 75%.")
    apply(inv, machines, moves)
    assert spread(inv) == 0.25


def test_a_balanced_pool_needs_no_move() -> None:
    machines: Placed = [("x", "a", request("x", memory=4)), ("y", "b", request("y", memory=4))]
    inv = build([("a", 16), ("b", 16)], machines)
    assert rebalance_plan(inv, machines, Scheduler()) == []


def test_max_moves_bounds_the_plan() -> None:
    machines: Placed = [(f"m{k}", "a", request(f"m{k}", memory=1, disk=1)) for k in range(16)]
    inv = build([("a", 16), ("b", 16)], machines)
    assert len(rebalance_plan(inv, machines, Scheduler())) == 8
    assert len(rebalance_plan(inv, machines, Scheduler(), max_moves=3)) == 3


def test_hosts_that_are_not_up_are_neither_measured_nor_targets() -> None:
    machines: Placed = [(f"m{k}", "a", request(f"m{k}", memory=4)) for k in range(2)]
    inv = build([("a", 16), ("b", 16), ("c", 16)], machines, c=HostState.MAINTENANCE)
    moves = rebalance_plan(inv, machines, Scheduler())
    assert [(m.machine, m.target) for m in moves] == [("m0", "b")]


def anti_affinity_case(group: str | None) -> tuple[Inventory, Placed]:
    policy = GroupPolicy.ANTI_AFFINITY if group else None
    machines: Placed = [
        ("web-1", "a", request("web-1", memory=4, group=group, policy=policy)),
        ("x", "a", request("x", memory=8)),
        ("web-2", "b", request("web-2", memory=1, group=group, policy=policy)),
        ("y", "c", request("y", memory=2)),
    ]
    return build([("a", 16), ("b", 16), ("c", 16)], machines), machines


def test_without_a_group_the_best_move_joins_the_emptiest_host() -> None:
    inv, machines = anti_affinity_case(None)
    moves = rebalance_plan(inv, machines, Scheduler())
    assert (moves[0].machine, moves[0].target) == ("web-1", "b")


def test_rebalancing_never_breaks_anti_affinity() -> None:
    inv, machines = anti_affinity_case("web")
    moves = rebalance_plan(inv, machines, Scheduler())
    assert moves, "some move still narrows the spread"
    assert (moves[0].machine, moves[0].target) == ("web-1", "c")
    before = spread(inv)
    where = apply(inv, machines, moves)
    assert where["web-1"] != where["web-2"]
    assert inv.group_counts("web").max() == 1
    assert spread(inv) < before
    assert all(m.spread_after < m.spread_before for m in moves)
