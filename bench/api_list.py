"""GET /machines?limit=100 with 10,000 machines in the store, one server process.

wrk drives the real server (uvicorn, one worker, SQLite) over loopback with a bearer
token, at 4 and at 16 connections. The server reuses a page while the store is
unchanged (SQLite's data_version), so it is measured with the store quiet, and with
another process committing 20 and 200 times a second; at 200 nearly every request
is a miss. Baselines, run by this same benchmark: (1) the same page read straight from
SQLite with the stdlib and encoded as JSON, in this process; (2) uvicorn serving the
same page's bytes from memory, the HTTP floor on this machine.
Goal: at least 2,000 requests/s with p99 under 10 ms.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from bench._env import row
from corral.config import Settings
from corral.ops import accounts
from corral.ops.context import Context
from corral.store.tables import MachineRow
from tests.libvirt_cleanup import remove_prefixed

MACHINES = 10_000
DURATION = "10s"
PAGE = "/machines?limit=100"
_WRITER = """
import time
from corral.store import Store
store = Store({url!r})
while True:
    store.add_event("bench.tick", "bench", "a commit that changes the store", None)
    time.sleep({pause})
"""

_SERVE = """
import uvicorn
from corral.config import load_settings
from corral.web.server import build_app
uvicorn.run(build_app(load_settings()), host="127.0.0.1", port={port}, log_level="warning",
            access_log=False)
"""
_FLOOR = """
import uvicorn
body = open({body!r}, "rb").read()
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]}})
    await send({{"type": "http.response.body", "body": body}})
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning", access_log=False)
"""


def _fill(ctx: Context) -> None:
    """10,000 machine records in one transaction (the store's API writes one per call)."""
    now = datetime.now()
    rows = [
        {
            "name": f"m{i:05d}", "uuid": str(uuid.uuid4()), "mac": f"52:54:00:{i >> 16 & 255:02x}:"
            f"{i >> 8 & 255:02x}:{i & 255:02x}", "hostname": f"m{i:05d}",
            "instance_id": f"i-{i:05d}", "host": "local", "image": None, "cpus": 1,
            "memory_bytes": 256 << 20, "clone_mode": "linked", "disk_path": f"/nowhere/{i}",
            "seed_path": None, "record_state": "ready", "managed": True, "ssh_keys": [],
            "created_at": now, "project": "default", "disk_bytes": 1 << 30,
        }
        for i in range(MACHINES)
    ]
    with ctx.store.engine.begin() as conn:
        conn.execute(MachineRow.__table__.insert(), rows)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(code: str, env: dict[str, str], port: int) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wrk(url: str, token: str | None, connections: int) -> tuple[float, float]:
    """Requests per second, and p99 latency in ms."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{DURATION}", "--latency", url]
    if token:
        cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    subprocess.run([*cmd[:-1], "-d2s", url], check=True, capture_output=True)  # warm-up
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p99 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rps, p99


def _raw_page(db: Path) -> tuple[float, bytes]:
    """The same page with sqlite3 and json in this process: ops/s, and one body."""
    conn = sqlite3.connect(db)
    query = ("SELECT name, project, host, image, cpus, memory_bytes, disk_bytes, clone_mode, "
             "uuid, mac, hostname, record_state, managed, created_at FROM machines "
             "ORDER BY name LIMIT 100")
    cols = [c.strip() for c in query.split("SELECT")[1].split("FROM")[0].split(",")]
    n, began = 0, time.perf_counter()
    body = b""
    while time.perf_counter() - began < 3:
        items = [dict(zip(cols, r, strict=True)) for r in conn.execute(query)]
        body = json.dumps({"items": items, "next": items[-1]["name"], "total": MACHINES}).encode()
        n += 1
    conn.close()
    return n / (time.perf_counter() - began), body


def run() -> None:
    prefix = f"cb{secrets.token_hex(3)}"
    root = Path("/var/tmp") / f"corral-bench-{prefix}"
    root.mkdir(mode=0o755)
    env = {"CORRAL_STATE_DIR": str(root / "state"), "CORRAL_POOL_NAME": prefix,
           "CORRAL_NETWORK_NAME": prefix, "CORRAL_ACCELERATOR": "tcg",
           "CORRAL_CONFIG": str(root / "none.toml")}
    settings = Settings(state_dir=root / "state", pool_name=prefix, network_name=prefix,
                        accelerator="tcg")
    try:
        with Context(settings) as ctx:
            from corral.ops.hosts import local_host

            local_host(ctx)
            _fill(ctx)
            accounts.ensure_first_admin(ctx.store, "bench-password-123")
            token = accounts.issue_token(ctx.store, "admin", "bench").secret
        raw_rate, body = _raw_page(root / "state" / "corral.db")
        (root / "page.json").write_bytes(body)

        results: dict[str, tuple[float, float]] = {}
        port = _port()
        url = f"http://127.0.0.1:{port}{PAGE}"
        with _server(_SERVE.format(port=port), env, port):
            for c in (4, 16):
                results[f"quiet store, -c{c}"] = _wrk(url, token, c)
            for rate in (20, 200):
                with _writer(settings.db_url, rate):
                    results[f"{rate} commits/s elsewhere, -c4"] = _wrk(url, token, 4)
        floor_port = _port()
        with _server(_FLOOR.format(port=floor_port, body=str(root / "page.json")), env,
                     floor_port):
            floor = _wrk(f"http://127.0.0.1:{floor_port}{PAGE}", None, 16)
    finally:
        remove_prefixed(settings.host_uri, prefix)
        shutil.rmtree(root, ignore_errors=True)

    print(f"  {MACHINES:,} machines; wrk for {DURATION} per line; one server process;"
          " goal >= 2,000 req/s with p99 < 10 ms")
    for label, (rps, p99) in results.items():
        row(f"Corral, {label}", f"{rps:,.0f} req/s",
            f"p99 {p99:.2f} ms; {rps / raw_rate:.2f}x baseline, {rps / floor[0]:.2f}x floor")
    row("baseline: same page, sqlite3 + json in-process", f"{raw_rate:,.0f} /s")
    row("floor: uvicorn serving the page from memory, -c16", f"{floor[0]:,.0f} req/s",
        f"p99 {floor[1]:.2f} ms")


@contextmanager
def _writer(url: str, per_second: int) -> Iterator[None]:
    code = _WRITER.format(url=url, pause=1 / per_second)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)
