"""Real parts: libvirtd at qemu:///system, QEMU under TCG, SQLite files, the appliance.

Each test gets a Corral of its own (state dir, libvirt pool and isolated network named
after the test), and every domain, pool and network it made is removed afterwards,
even when the test fails. The appliance is built once per run and shared.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest

from corral.config import Settings
from corral.images.appliance import ApplianceArtifacts
from corral.ops.context import Context
from tests.libvirt_cleanup import remove_prefixed
from tests.serving import import_appliance

REPO = Path(__file__).resolve().parents[2]
CORRAL = str(Path(sys.executable).parent / "corral")
CACHE = REPO / "build" / "cache"


@dataclass
class CorralEnv:
    """One isolated Corral installation, driven in-process or through the CLI."""

    root: Path
    prefix: str
    env: dict[str, str] = field(default_factory=dict)

    def settings(self, **overrides: Any) -> Settings:
        return Settings(**{**self.settings_kwargs, **overrides})

    @property
    def settings_kwargs(self) -> dict[str, Any]:
        return {
            "state_dir": self.root / "state",
            "pool_name": self.prefix,
            "network_name": self.prefix,
            "accelerator": "tcg",
            "ready_timeout": 120.0,
            "stop_timeout": 30.0,
            "appliance_cache_dir": CACHE,
        }

    def context(self, **overrides: Any) -> Context:
        return Context(self.settings(**overrides))

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def run(
        self,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [CORRAL, *args],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env, **(env or {})},
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"corral {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)


@pytest.fixture
def corral_env() -> Iterator[CorralEnv]:
    prefix = f"ct{secrets.token_hex(3)}"
    root = Path("/var/tmp") / f"corral-test-{prefix}"
    root.mkdir(mode=0o755)
    env = CorralEnv(root=root, prefix=prefix)
    env.env = {f"CORRAL_{k.upper()}": str(v) for k, v in env.settings_kwargs.items()}
    env.env["CORRAL_CONFIG"] = str(root / "none.toml")
    try:
        yield env
    finally:
        remove_prefixed("qemu:///system", prefix)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def with_appliance(corral_env: CorralEnv, appliance: ApplianceArtifacts) -> CorralEnv:
    """A Corral env whose library holds the shared appliance as image 'appliance'."""
    import_appliance(corral_env.settings(), appliance)
    return corral_env


def libvirt_domain_names(prefix: str) -> set[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return {d.name() for d in conn.listAllDomains() if d.name().startswith(prefix)}
    finally:
        conn.close()
