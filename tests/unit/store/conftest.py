"""A store with the local host and one image, on each database of ``store_url``."""

from __future__ import annotations

import pytest

from corral.store import Store
from tests.unit.store.test_store import HOST, image


@pytest.fixture
def store(store_url: str) -> Store:
    s = Store(store_url)
    s.put_host(HOST)
    s.add_image(image())
    return s
