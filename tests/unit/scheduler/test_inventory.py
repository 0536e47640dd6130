from __future__ import annotations

import pytest

from corral.errors import Conflict, InsufficientResources, InvalidInput, NotFound
from corral.model.states import GroupPolicy
from corral.scheduler import Inventory, Overcommit, Resources
from corral.scheduler.inventory import CPU, DISK, MEMORY
from tests.unit.scheduler.build import GiB, host, request


def test_hosts_are_held_in_name_order() -> None:
    inv = Inventory([host("b"), host("c"), host("a")])
    assert inv.names == ("a", "b", "c")
    assert inv.index("c") == 2


def test_effective_capacity_is_capacity_times_ratio_minus_used() -> None:
    inv = Inventory([host("a", cpus=8, memory=16, disk=100, used=(3, 4, 10),
                          ratios=Overcommit(cpu=4.0, memory=1.5, disk=2.0))])
    assert inv.effective[CPU, 0] == 32
    assert inv.effective[MEMORY, 0] == 24 * GiB
    assert inv.effective[DISK, 0] == 200 * GiB
    assert inv.free[:, 0].tolist() == [29, 20 * GiB, 190 * GiB]


def test_claim_and_release_update_used_free_and_group_counts() -> None:
    inv = Inventory([host("a"), host("b")])
    req = request(cpus=2, memory=4, disk=20, group="web", policy=GroupPolicy.ANTI_AFFINITY)
    inv.claim("b", req)
    assert inv.view("b").used == Resources(2, 4 * GiB, 20 * GiB)
    assert dict(inv.view("b").groups) == {"web": 1}
    assert inv.group_counts("web").tolist() == [0, 1]
    assert inv.view("a").used == Resources(0, 0, 0)
    inv.release("b", req)
    assert inv.view("b").used == Resources(0, 0, 0)
    assert dict(inv.view("b").groups) == {}
    assert inv.free[MEMORY, 1] == 16 * GiB


def test_claim_beyond_free_changes_nothing() -> None:
    inv = Inventory([host("a", memory=4)])
    with pytest.raises(InsufficientResources, match="Host 'a' cannot take 'big'"):
        inv.claim("a", request("big", memory=5))
    assert inv.view("a").used == Resources(0, 0, 0)
    inv.claim("a", request("big", memory=5), force=True)
    assert inv.free[MEMORY, 0] == -1 * GiB


def test_release_of_a_claim_never_made_is_refused() -> None:
    inv = Inventory([host("a")])
    with pytest.raises(Conflict, match="holds no claim for 'web-1'"):
        inv.release("a", request())
    inv.claim("a", request(group="g"))
    with pytest.raises(Conflict):
        inv.release("a", request(group="other"))
    assert inv.view("a").used.cpus == 2


def test_unknown_host_and_duplicate_names() -> None:
    inv = Inventory([host("a")])
    with pytest.raises(NotFound, match="No host named 'zz'"):
        inv.claim("zz", request())
    with pytest.raises(InvalidInput, match="Host 'a' appears twice"):
        Inventory([host("a"), host("b"), host("a")])


def test_view_round_trips_the_static_parts() -> None:
    original = host("a", tags={"ssd"}, images={"debian"}, cpu_score=1.5, groups={"db": 2},
                    used=(1, 2, 3))
    assert Inventory([original]).view("a") == original


def test_copy_is_independent() -> None:
    inv = Inventory([host("a")])
    twin = inv.copy()
    twin.claim("a", request(group="g"))
    twin.add_image("a", "debian")
    assert inv.view("a").used == Resources(0, 0, 0)
    assert inv.group_counts("g").tolist() == [0]
    assert not inv.image_mask("debian").any()
    assert twin.image_mask("debian").tolist() == [True]


def test_values_are_validated() -> None:
    with pytest.raises(InvalidInput):
        Overcommit(memory=0)
    with pytest.raises(InvalidInput, match="group policy but no group"):
        request(policy=GroupPolicy.AFFINITY)
    with pytest.raises(InvalidInput):
        request(memory=-1)


def test_resources_add_and_subtract() -> None:
    a, b = Resources(1, 2, 3), Resources(4, 5, 6)
    assert a + b == Resources(5, 7, 9)
    assert b - a == Resources(3, 3, 3)
    assert Resources(1, GiB, 20 * GiB).describe() == "1 vCPU, 1.0 GiB memory, 20.0 GiB disk"
