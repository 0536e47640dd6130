"""Added storage pools and owned bytes in the store, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from dataclasses import replace

import pytest

from corral.errors import Conflict, NotFound
from corral.model import Project, Quota, StoragePool, Usage
from corral.store import Store
from tests.unit.store.test_store import machine

POOL = StoragePool(name="fast", type="btrfs", host="local", path="/srv/fast")


def test_a_pool_is_recorded_once_by_name_and_by_path(store: Store) -> None:
    store.add_storage_pool(POOL)
    found = store.find_storage_pool("fast")
    assert found is not None and replace(found, created_at=None) == POOL
    assert found.created_at is not None  # added, unlike a host's own pool
    with pytest.raises(Conflict):
        store.add_storage_pool(replace(POOL, path="/srv/other"))
    with pytest.raises(Conflict):
        store.add_storage_pool(replace(POOL, name="other"))
    with pytest.raises(NotFound):
        store.add_storage_pool(replace(POOL, name="far", path="/srv/far", host="nowhere"))
    assert [p.name for p in store.list_storage_pools()] == ["fast"]
    assert store.list_storage_pools(host="elsewhere") == []


def test_a_pool_holding_a_disk_and_its_host_are_not_forgotten(store: Store) -> None:
    store.add_storage_pool(POOL)
    m = replace(machine("m1", "52:54:00:00:00:01", "u1"), storage_pool="fast")
    store.add_machine(m)
    assert store.get_machine("m1").storage_pool == "fast"
    with pytest.raises(Conflict, match="m1"):
        store.delete_storage_pool("fast")
    store.forget_machine("m1", "u1")
    with pytest.raises(Conflict, match="fast"):
        store.delete_host("local")
    store.delete_storage_pool("fast")
    assert store.find_storage_pool("fast") is None
    with pytest.raises(NotFound):
        store.delete_storage_pool("fast")


def test_project_disk_usage_counts_owned_bytes_at_least_the_claim(store: Store) -> None:
    project: Project = store.add_project("p", Quota(disk_bytes=1 << 30))
    small = replace(machine("a", "52:54:00:00:00:02", "ua"), project=project.name,
                    disk_bytes=10 << 30, disk_claim=100 << 20)
    store.add_machine(small)
    store.add_machine(replace(machine("b", "52:54:00:00:00:03", "ub"), project="p",
                              disk_bytes=10 << 30, disk_claim=100 << 20))
    assert store.project_usage("p").disk_bytes == 200 << 20  # claims, not 20 GiB virtual
    store.record_owned_bytes({"a": 700 << 20, "b": 5 << 20})
    assert store.get_machine("a").owned_bytes == 700 << 20
    assert store.project_usage("p").disk_bytes == (700 << 20) + (100 << 20)
    # the atomic check at insert time counts the same
    with pytest.raises(Conflict, match="disk quota"):
        store.add_machine(replace(machine("c", "52:54:00:00:00:04", "uc"), project="p",
                                  disk_bytes=10 << 30, disk_claim=300 << 20))
    assert store.project_usage("p") == Usage(2, 4, 1 << 30, (700 << 20) + (100 << 20))
