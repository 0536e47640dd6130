"""A real Corral server for API and browser tests: its own state dir, libvirt pool and
isolated network, uvicorn on a free loopback port, and an admin token.

Everything it made (domains, pool, network, files) is removed on exit, even after a
failure. The server runs in a thread of the test process, on real HTTP.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from corral.config import Settings
from corral.images.appliance import ApplianceArtifacts
from corral.model import ImageFormat
from corral.ops import accounts
from corral.ops.context import Context
from corral.ops.images import import_image
from tests.libvirt_cleanup import remove_prefixed, remove_with_disks_under

CACHE = Path(__file__).resolve().parents[1] / "build" / "cache"
ADMIN_PASSWORD = "admin-password-for-tests"


@dataclass
class Served:
    url: str
    settings: Settings
    prefix: str
    admin_token: str

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def admin(self) -> httpx.Client:
        return self.client(self.admin_token)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"


def settings_for(root: Path, prefix: str, **overrides: Any) -> Settings:
    return Settings(
        **{
            "state_dir": root / "state",
            "pool_name": prefix,
            "network_name": prefix,
            "accelerator": "tcg",
            "ready_timeout": 120.0,
            "stop_timeout": 20.0,
            "appliance_cache_dir": CACHE,
            "admin_password": ADMIN_PASSWORD,
            "sweep_interval": 0.5,
            **overrides,
        }
    )


def import_appliance(settings: Settings, appliance: ApplianceArtifacts) -> None:
    with Context(settings) as ctx:
        import_image(
            ctx,
            appliance.disk,
            name="appliance",
            declared=ImageFormat.QCOW2,
            kernel=appliance.kernel,
            initrd=appliance.initrd,
            cmdline=appliance.cmdline,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(
    appliance: ApplianceArtifacts | None = None, **overrides: Any
) -> Iterator[Served]:
    """A served Corral with the first admin, and the appliance imported if given."""
    from corral.web.server import build_app

    prefix = f"cs{secrets.token_hex(3)}"
    root = Path("/var/tmp") / f"corral-test-{prefix}"
    root.mkdir(mode=0o755)
    settings = settings_for(root, prefix, **overrides)
    try:
        with Context(settings) as ctx:
            accounts.ensure_first_admin(ctx.store, ADMIN_PASSWORD)
            admin = accounts.issue_token(ctx.store, "admin", "tests").secret
        if appliance is not None:
            import_appliance(settings, appliance)
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(build_app(settings), host="127.0.0.1", port=port,
                           log_level="warning", lifespan="on")
        )
        thread = threading.Thread(target=server.run, name="corral-test-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        try:
            yield Served(f"http://127.0.0.1:{port}", settings, prefix, admin)
        finally:
            server.should_exit = True
            thread.join(timeout=60)
    finally:
        remove_with_disks_under("qemu:///system", str(root))
        remove_prefixed("qemu:///system", prefix)
        shutil.rmtree(root, ignore_errors=True)


def wait_for_job(client: httpx.Client, job_id: int, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").raise_for_status().json()
        if job["state"] not in ("pending", "running"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
        time.sleep(0.2)
