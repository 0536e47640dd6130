"""CLI tests: the ``corral`` command as a subprocess, with its own state and credentials.

``cli_env`` is an isolated installation (see ``tests/integration/conftest.py``) whose
saved credentials live in its own directory, so no test reads or writes
``~/.config/corral``; ``CORRAL_SERVER`` from the caller's environment is dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.conftest import CorralEnv
from tests.integration.conftest import corral_env as corral_env  # the fixture, re-exported


@pytest.fixture
def cli_env(corral_env: CorralEnv) -> Iterator[CorralEnv]:
    corral_env.env["CORRAL_CREDENTIALS"] = str(corral_env.root / "credentials.json")
    saved = os.environ.pop("CORRAL_SERVER", None)
    try:
        yield corral_env
    finally:
        if saved is not None:
            os.environ["CORRAL_SERVER"] = saved
