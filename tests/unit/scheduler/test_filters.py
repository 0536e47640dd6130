from __future__ import annotations

from corral.model.states import GroupPolicy, HostState
from corral.scheduler import Inventory, Overcommit, Request
from corral.scheduler.base import Filter
from corral.scheduler.filters import (
    CapacityFilter,
    GroupFilter,
    PlatformFilter,
    StateFilter,
    TagFilter,
)
from tests.unit.scheduler.build import GiB, host, request


def passing(flt: Filter, inv: Inventory, req: Request) -> list[str]:
    mask = flt.mask(inv, req)
    assert mask.shape == (len(inv),)
    return [name for name, ok in zip(inv.names, mask.tolist(), strict=True) if ok]


def test_state_keeps_only_hosts_that_are_up() -> None:
    inv = Inventory([host("a"), host("b", state=HostState.DOWN),
                     host("c", state=HostState.MAINTENANCE)])
    flt = StateFilter()
    assert passing(flt, inv, request()) == ["a"]
    assert flt.refusal(inv, request(), 1).singular == "is down"
    assert flt.refusal(inv, request(), 2).plural == "are in maintenance"


def test_platform_requires_arch_and_accelerator_only_when_asked() -> None:
    inv = Inventory([host("a"), host("b", arch="aarch64"), host("c", accelerator="tcg"),
                     host("d", arch="aarch64", accelerator="tcg")])
    flt = PlatformFilter()
    assert passing(flt, inv, request()) == ["a", "b", "c", "d"]
    assert passing(flt, inv, request(arch="aarch64")) == ["b", "d"]
    assert passing(flt, inv, request(accelerator="kvm")) == ["a", "b"]
    assert passing(flt, inv, request(arch="x86_64", accelerator="kvm")) == ["a"]
    assert passing(flt, inv, request(arch="riscv64")) == []
    req = request(arch="x86_64", accelerator="kvm")
    assert flt.refusal(inv, req, 1).detail == "aarch64, not x86_64"
    assert flt.refusal(inv, req, 2).detail == "accelerator tcg, not kvm"


def test_tags_must_all_be_present() -> None:
    inv = Inventory([host("a", tags={"ssd"}), host("b", tags={"ssd", "gpu"}), host("c")])
    flt = TagFilter()
    assert passing(flt, inv, request()) == ["a", "b", "c"]
    assert passing(flt, inv, request(tags={"ssd"})) == ["a", "b"]
    assert passing(flt, inv, request(tags={"ssd", "gpu"})) == ["b"]
    assert passing(flt, inv, request(tags={"nvme"})) == []
    assert flt.refusal(inv, request(tags={"ssd", "gpu"}), 2).singular == "lacks tags 'gpu', 'ssd'"
    assert flt.refusal(inv, request(tags={"ssd", "gpu"}), 0).plural == "lack tag 'gpu'"


def test_capacity_checks_each_resource_against_ratio_and_claims() -> None:
    inv = Inventory([
        host("a", cpus=1, memory=16),  # 1 thread × 4 = 4 vCPUs
        host("b", memory=4, used=(0, 1, 0)),  # 3 GiB free
        host("c", memory=4, ratios=Overcommit(memory=1.5)),  # 6 GiB effective
        host("d", disk=10),
        host("e", cpus=2, memory=8, used=(4, 0, 0), ratios=Overcommit(cpu=2.5)),  # 1 vCPU free
    ])
    flt = CapacityFilter()
    assert passing(flt, inv, request(cpus=4, memory=4, disk=10)) == ["a", "c", "d"]
    assert passing(flt, inv, request(cpus=5, memory=1, disk=1)) == ["b", "c", "d"]
    assert passing(flt, inv, request(cpus=1, memory=6, disk=1)) == ["a", "c", "d", "e"]
    assert passing(flt, inv, request(cpus=1, memory=1, disk=11)) == ["a", "b", "c", "e"]
    refusal = flt.refusal(inv, request(cpus=2, memory=8, disk=20), 2)
    assert refusal.key == "memory"
    assert refusal.detail == "memory: needs 8.0 GiB, 6.0 GiB free of 6.0 GiB (4.0 GiB × 1.5)"
    both = flt.refusal(inv, request(cpus=2, memory=4, disk=20), 4)
    assert both.key == "vcpus"
    assert both.detail == "vCPUs: needs 2, 1 free of 5 (2 × 2.5)"


def test_capacity_refuses_a_request_bigger_than_any_host() -> None:
    inv = Inventory([host("a", memory=16), host("b", memory=32)])
    flt = CapacityFilter()
    req = request(memory=33)
    assert passing(flt, inv, req) == []
    assert flt.hint(inv, req, [0, 1]) == (
        "No host has 33.0 GiB memory even when empty (the largest has 32.0 GiB);"
        " ask for less, or add a bigger host.")
    assert flt.hint(inv, request(memory=20), [0]) == (
        "Free memory on a host (stop or delete machines), or add a host.")


def test_capacity_lets_a_zero_need_through_an_overcommitted_host() -> None:
    inv = Inventory([host("a", disk=10, used=(0, 0, 12))])
    assert inv.free[2, 0] == -2 * GiB
    assert passing(CapacityFilter(), inv, request(disk=0)) == ["a"]
    assert passing(CapacityFilter(), inv, request(disk=1)) == []


def test_hard_anti_affinity_avoids_every_host_of_the_group() -> None:
    inv = Inventory([host("a", groups={"web": 1}), host("b"), host("c", groups={"db": 2})])
    flt = GroupFilter()
    anti = request(group="web", policy=GroupPolicy.ANTI_AFFINITY)
    assert passing(flt, inv, anti) == ["b", "c"]
    assert flt.refusal(inv, anti, 0).detail == "runs 1 machine of anti-affinity group 'web'"
    soft = request(group="web", policy=GroupPolicy.ANTI_AFFINITY, hard=False)
    assert passing(flt, inv, soft) == ["a", "b", "c"]


def test_hard_affinity_sticks_to_the_group_once_it_has_a_host() -> None:
    inv = Inventory([host("a"), host("b", groups={"db": 2}), host("c")])
    flt = GroupFilter()
    assert passing(flt, inv, request(group="db", policy=GroupPolicy.AFFINITY)) == ["b"]
    assert passing(flt, inv, request(group="new", policy=GroupPolicy.AFFINITY)) == ["a", "b", "c"]
    assert passing(flt, inv, request(group="db")) == ["a", "b", "c"]  # no policy
    refusal = flt.refusal(inv, request(group="db", policy=GroupPolicy.AFFINITY), 0)
    assert refusal.plural == "are not where group 'db' runs"
