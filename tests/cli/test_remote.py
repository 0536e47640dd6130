"""The CLI against a real Corral server on loopback: login, machines, images, logout.

One server for the module and one guest in all; the CLI runs as a subprocess whose
local state directory does not exist, so every answer must come over HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.images.appliance import ApplianceArtifacts
from tests.integration.conftest import CORRAL
from tests.serving import ADMIN_PASSWORD, Served, running_server

MACHINE_KEYS = {
    "name", "project", "state", "record", "host", "image", "clone", "uuid", "mac",
    "hostname", "instance_id", "cpus", "memory_bytes", "disk_path", "seed_path",
    "virtual_size", "owned_bytes", "shared_bytes", "adopted",
}


class Remote:
    def __init__(self, served: Served, root: Path) -> None:
        self.served = served
        self.root = root
        self.credentials = root / "credentials.json"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")},
            "CORRAL_CREDENTIALS": str(self.credentials),
            "CORRAL_CONFIG": str(root / "none.toml"),
            "CORRAL_STATE_DIR": str(root / "no-local-state"),
        }

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([CORRAL, *args], input=stdin, capture_output=True, text=True,
                              env=self.env, timeout=300, check=False)

    def ok(self, *args: str, stdin: str = "") -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, f"corral {' '.join(args)}: {result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "-o", "json"))

    def login(self) -> None:
        self.ok("login", "--server", self.served.url, "--user", "admin", "--password-stdin",
                stdin=ADMIN_PASSWORD + "\n")


@pytest.fixture(scope="module")
def served(appliance: ApplianceArtifacts) -> Iterator[Served]:
    with running_server(appliance) as s:
        yield s


@pytest.fixture
def remote(served: Served, tmp_path: Path) -> Iterator[Remote]:
    r = Remote(served, tmp_path)
    try:
        yield r
    finally:
        # Machines a failed test left go with the server (removed by its prefix).
        assert not (tmp_path / "no-local-state").exists(), "a command opened a local store"
        shutil.rmtree(tmp_path, ignore_errors=True)


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_login_machine_lifecycle_logout(remote: Remote, served: Served) -> None:
    remote.login()
    assert stat.S_IMODE(remote.credentials.stat().st_mode) == 0o600
    saved = json.loads(remote.credentials.read_text())
    assert saved["server"] == served.url and saved["user"] == "admin"
    token = saved["token"]

    name = served.name("web")
    created = remote.json("vm", "create", name, "--image", "appliance", "--wait")
    assert [m["name"] for m in created] == [name]
    assert created[0]["state"] == "running"
    assert set(created[0]) == MACHINE_KEYS

    listed = {m["name"]: m for m in remote.json("vm", "list")}
    assert listed[name]["state"] == "running"
    assert listed[name]["image"] == "appliance"
    assert set(listed[name]) == MACHINE_KEYS
    shown = remote.json("vm", "show", name)
    assert shown["uuid"] == created[0]["uuid"] and shown["owned_bytes"] > 0
    assert name in remote.ok("vm", "list")  # the table too

    missing = remote.run("vm", "show", "nope")
    assert missing.returncode == 3
    assert one_error(missing) == "error: No machine named 'nope'."
    running = remote.run("vm", "delete", name)  # running, and no --force
    assert running.returncode == 4
    one_error(running)

    assert "Powered off" in remote.ok("vm", "kill", name)
    clone = served.name("copy")
    assert remote.json("vm", "clone", name, clone)["state"] == "shut-off"
    assert "Deleted" in remote.ok("vm", "delete", "--force", name, clone)
    assert not {name, clone} & {m["name"] for m in remote.json("vm", "list")}

    jobs = remote.json("job", "list")
    kinds = {(j["kind"], j["target"]) for j in jobs}
    assert {("provision", name), ("clone", clone), ("delete", name)} <= kinds
    job = remote.json("job", "show", str(jobs[0]["id"]))
    assert job["state"] == "succeeded" and job["steps"]

    hosts = remote.json("host", "list")
    assert [h["name"] for h in hosts] == ["local"]
    assert remote.json("host", "show", "local")["accelerator"] == "tcg"

    assert "Logged out" in remote.ok("logout")
    assert not remote.credentials.exists()
    with served.client(token) as client:
        assert client.get("/auth/me").status_code == 401  # revoked, not just forgotten
    after = remote.run("--server", served.url, "vm", "list")
    assert after.returncode == 11
    one_error(after)


def test_images_upload_show_delete(remote: Remote, tmp_path: Path) -> None:
    remote.login()
    disk = tmp_path / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    name = "tiny-upload"
    imported = remote.run("image", "import", str(disk), "--name", name, "--format", "qcow2")
    assert imported.returncode == 0, imported.stderr
    assert f"Imported {name} (qcow2" in imported.stdout
    shown = remote.json("image", "show", name)
    assert shown["virtual_size"] == 16 << 20 and shown["used_by"] == []
    assert name in {i["name"] for i in remote.json("image", "list")}
    assert "appliance" in {i["name"] for i in remote.json("image", "list")}

    lie = remote.run("image", "import", str(disk), "--name", "liar", "--format", "raw")
    assert lie.returncode != 0
    one_error(lie)
    assert "liar" not in {i["name"] for i in remote.json("image", "list")}

    remote.ok("image", "delete", name)
    gone = remote.run("image", "show", name)
    assert gone.returncode == 3
    one_error(gone)
    remote.ok("logout")


def test_wrong_password_saves_nothing(remote: Remote, served: Served) -> None:
    result = remote.run("login", "--server", served.url, "--user", "admin", "--password-stdin",
                        stdin="not-the-password\n")
    assert result.returncode == 11
    assert "Wrong user name or password" in one_error(result)
    assert not remote.credentials.exists()
    no_creds = remote.run("--server", served.url, "image", "list")
    assert no_creds.returncode == 11
    one_error(no_creds)


def test_tokens_on_the_server(remote: Remote, served: Served) -> None:
    remote.login()
    created = remote.run("token", "create", "--name", "ci", "--expires", "1d")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    with served.client(secret) as client:
        assert client.get("/auth/me").json()["name"] == "admin"
    listed = {t["name"]: t for t in remote.json("token", "list")}
    assert listed["ci"]["expires_at"] is not None and listed["ci"]["revoked_at"] is None
    assert set(listed["ci"]) == {"id", "user", "name", "created_at", "expires_at", "revoked_at"}
    remote.ok("token", "revoke", listed["ci"]["id"])
    with served.client(secret) as client:
        assert client.get("/auth/me").status_code == 401
    # Users and projects are administered on the server's own host.
    users = remote.run("user", "list")
    assert users.returncode == 2
    assert "--local" in one_error(users)
    remote.ok("logout")


def test_pool_commands_over_the_server(remote: Remote, served: Served) -> None:
    remote.login()
    (local,) = [h for h in remote.json("host", "list") if h["name"] == "local"]
    assert local["state"] == "up" and local["claimed"]["machines"] >= 0
    name = served.name("placed")
    plan = remote.json("vm", "create", name, "--image", "appliance", "--dry-run")
    assert [(p["machine"], p["host"]) for p in plan] == [(name, "local")]

    assert "is maintenance" in remote.ok("host", "maintenance", "local", "on")
    try:
        refused = remote.run("vm", "create", name, "--image", "appliance", "--dry-run")
        assert refused.returncode == 4
        assert "1 is in maintenance" in " ".join(refused.stderr.split())
        explained = remote.ok("placement", "explain", name, "--image", "appliance")
        row = next(line for line in explained.splitlines() if line.startswith("local "))
        assert "refused" in row and "maintenance" in row
    finally:
        assert "is up" in remote.ok("host", "maintenance", "local", "off")
    refused = remote.run("host", "remove", "local")
    assert refused.returncode == 4 and "local host" in one_error(refused)
    assert "nothing to move" in remote.ok("pool", "rebalance", "--dry-run")
    assert "Nothing to move" in remote.ok("pool", "rebalance")
    assert "local: up" in remote.ok("host", "check")

    # moving a machine goes through the server's scheduler and jobs, with the same errors
    stopped = served.name("mover")
    remote.ok("vm", "create", stopped, "--image", "appliance", "--no-start")
    try:
        same = remote.run("vm", "migrate", stopped, "--to", "local")
        assert same.returncode != 0 and "already runs on host 'local'" in one_error(same)
        live = remote.run("vm", "migrate", stopped, "--live")
        assert live.returncode != 0 and "not running" in one_error(live)
        nowhere = remote.run("vm", "migrate", stopped)
        assert nowhere.returncode == 4 and "No host can take" in " ".join(nowhere.stderr.split())
    finally:
        remote.ok("vm", "delete", "--force", stopped)
