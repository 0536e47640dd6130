"""The read cache is exact: a hit is only possible while nothing has been committed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from corral.api.services import ReadCache
from corral.errors import TooManyRequests
from corral.model import Quota
from corral.store import Store


def test_data_version_moves_when_another_connection_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    reader, writer = Store(url), Store(url)
    try:
        before = reader.data_version()
        assert before is not None
        reader.list_projects()  # reading changes nothing
        assert reader.data_version() == before
        writer.add_project("p1", Quota())
        after = reader.data_version()
        assert after != before
        reader.add_project("p2", Quota())  # a commit through this same store, too
        assert reader.data_version() != after
    finally:
        reader.close()
        writer.close()


def test_no_version_means_no_caching(store_url: str) -> None:
    store = Store(store_url)
    try:
        version = store.data_version()
        assert (version is None) == store_url.startswith("postgresql")
    finally:
        store.close()


def test_cache_hits_only_at_the_same_version_and_evicts_the_oldest() -> None:
    cache = ReadCache(size=2)
    cache.put("a", 1, "page a")
    assert cache.get("a", 1) == "page a"
    assert cache.get("a", 2) is None
    cache.put("b", 1, "page b")
    cache.get("a", 1)  # a is now the most recently used
    cache.put("c", 1, "page c")
    assert cache.get("b", 1) is None
    assert cache.get("a", 1) == "page a"
    assert cache.get("c", 1) == "page c"
    cache.put("d", 2, "page d")  # a new version: the old entries can never hit again
    assert len(cache._entries) == 1


def test_login_throttle_forgets_stale_names() -> None:
    from corral.api.services import LoginThrottle

    throttle = LoginThrottle(attempts=2, window=0.05, remembered=10)
    for i in range(10):
        throttle.begin(f"user:guess{i}")
    time.sleep(0.06)
    throttle.begin("user:fresh")
    assert set(throttle._failures) == {"user:fresh"}
    throttle.begin("user:fresh")
    with pytest.raises(TooManyRequests):
        throttle.begin("user:fresh")


def test_a_success_forgets_the_users_failures_but_not_the_addresss() -> None:
    from corral.api.services import LoginThrottle

    throttle = LoginThrottle(attempts=3, window=60)
    throttle.begin("user:a", "addr:x")  # a failure: it stays counted
    stamp = throttle.begin("user:a", "addr:x")
    throttle.succeeded(stamp, "user:a", "addr:x")
    assert "user:a" not in throttle._failures
    assert len(throttle._failures["addr:x"]) == 1
    throttle.begin("user:b", "addr:x")
    throttle.begin("user:c", "addr:x")
    with pytest.raises(TooManyRequests):  # three failures from one address
        throttle.begin("user:d", "addr:x")
