"""Claims: a machine's record is its claim on a host, checked with the host row locked;
a batch is claimed whole or not at all. Copies of images on hosts have one copier."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from corral.errors import Conflict, NotFound
from corral.model import HostPlacement, HostState, Overcommit, Step, StepState
from corral.store import Store
from corral.store.repository import ClaimedJob, ClaimRefused
from tests.unit.store.test_store import HOST, image, machine

GLOBAL = Overcommit(cpu=4.0, memory=1.0, disk=1.0)


@pytest.fixture
def store(store_url: str) -> Store:
    s = Store(store_url)
    # 2 threads, 24 GiB, a 100 GiB pool; memory may be promised up to 2 GiB here
    s.put_host(replace(HOST, disk_bytes=100 << 30))
    s.set_host_placement("local", HostPlacement(memory_ratio=(2 << 30) / (24 << 30)))
    s.add_image(image())
    return s


def job(name: str, n: int, memory: int = 512 << 20) -> ClaimedJob:
    m = replace(machine(name, f"52:54:00:00:00:{n:02x}", f"00000000-0000-0000-0000-{n:012d}"),
                cpus=1, memory_bytes=memory, disk_claim=1 << 30)
    return ClaimedJob("provision", m, [Step("machine.record", StepState.DONE, {})])


def test_claims_fill_a_host_to_its_ratio_and_no_further(store: Store) -> None:
    store.create_claimed_jobs([job(f"m{i}", i) for i in range(4)], "owner", GLOBAL)
    assert store.host_claims("local").memory_bytes == 2 << 30
    with pytest.raises(ClaimRefused) as refused:
        store.create_claimed_jobs([job("m4", 4)], "owner", GLOBAL)
    assert refused.value.message == (
        "Host 'local' has no room left for 'm4': 2.0 GiB of 2.0 GiB memory claimed, "
        "512.0 MiB asked."
    )
    assert store.find_machine("m4") is None


def test_a_batch_is_claimed_whole_or_not_at_all(store: Store) -> None:
    with pytest.raises(ClaimRefused):
        store.create_claimed_jobs([job(f"m{i}", i) for i in range(5)], "owner", GLOBAL)
    assert store.list_machines() == []
    assert store.list_jobs(None, limit=10) == []


def test_cpu_and_disk_claims_count_too(store: Store) -> None:
    store.set_host_placement("local", HostPlacement(cpu_ratio=0.5))
    store.create_claimed_jobs([job("a", 1)], "owner", GLOBAL)  # 1 vCPU of 2 threads × 0.5
    with pytest.raises(ClaimRefused, match="vCPUs"):
        store.create_claimed_jobs([job("b", 2)], "owner", GLOBAL)
    store.set_host_placement("local", HostPlacement(disk_ratio=0.015))  # 1.5 GiB of pool
    with pytest.raises(ClaimRefused, match="disk"):
        store.create_claimed_jobs([job("b", 2)], "owner", GLOBAL)


def test_concurrent_claims_never_overcommit(store_url: str, store: Store) -> None:
    """Eight writers, each with its own connection, race for room for four machines."""
    won: list[str] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        own = Store(store_url)
        try:
            own.create_claimed_jobs([job(f"r{i}", i)], "owner", GLOBAL)
            with lock:
                won.append(f"r{i}")
        except ClaimRefused:
            pass
        finally:
            own.close()

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 4
    assert store.host_claims("local").memory_bytes == 2 << 30


def test_forgetting_a_machine_releases_its_claim(store: Store) -> None:
    (created,) = store.create_claimed_jobs([job("a", 1)], "owner", GLOBAL)
    assert created.steps[0].state is StepState.DONE
    a = store.get_machine("a")
    store.forget_machine("a", a.identity.uuid)
    assert store.host_claims("local").memory_bytes == 0


def test_a_host_holding_machines_cannot_be_deleted(store: Store) -> None:
    store.create_claimed_jobs([job("a", 1)], "owner", GLOBAL)
    with pytest.raises(Conflict, match="still holds machines: a"):
        store.delete_host("local")
    with pytest.raises(NotFound):
        store.delete_host("nowhere")


def test_host_state_and_placement_survive_a_new_probe(store: Store) -> None:
    store.set_host_state("local", HostState.MAINTENANCE, "set by an operator")
    store.put_host(replace(HOST, cpu_score=123.4))
    again = store.get_host("local")
    assert again.state is HostState.MAINTENANCE and again.cpu_score == 123.4
    assert again.placement.memory_ratio == pytest.approx(2 / 24)


def test_one_copier_per_image_and_host(store: Store) -> None:
    alive = {"p1"}
    first = store.take_host_image("local", "base", "/pool/b.qcow2", "p1",
                                  unless_owner=lambda o: o in alive)
    second = store.take_host_image("local", "base", "/pool/b.qcow2", "p2",
                                   unless_owner=lambda o: o in alive)
    assert first.owner == second.owner == "p1"  # p2 waits for p1's copy
    store.host_image_progress("local", "base", 64 << 20)
    alive.clear()  # p1 died: p2 takes over where it stopped
    third = store.take_host_image("local", "base", "/pool/b.qcow2", "p2",
                                  unless_owner=lambda o: o in alive)
    assert third.owner == "p2" and third.bytes_done == 64 << 20
    assert store.pool_snapshot()[0].images == frozenset()  # not present until verified
    store.host_image_present("local", "base")
    assert store.pool_snapshot()[0].images == frozenset({"base"})
    assert store.host_image("local", "base").owner is None
