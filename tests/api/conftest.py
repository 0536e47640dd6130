"""Fixtures for the REST API tests: a real server per module and a team of callers.

The team: projects ``p1`` and ``p2``; an operator of each, a viewer of ``p1``, and
tokens for each, plus a revoked and an expired token (both of p1's operator).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.images.appliance import ApplianceArtifacts
from corral.ops import accounts
from corral.store import Store
from tests.serving import ADMIN_PASSWORD, Served, running_server, wait_for_job

PASSWORD = "a-long-enough-password"
ROLES = ("admin", "op1", "op2", "viewer", "revoked", "expired", "anonymous")


@dataclass
class Team:
    served: Served
    tokens: dict[str, str | None]
    """Role name → bearer token (None for the anonymous caller)."""
    users: dict[str, str]
    """Role name → user name, for the roles that are users."""
    passwords: dict[str, str]

    def client(self, role: str) -> httpx.Client:
        return self.served.client(self.tokens[role])


def make_team(served: Served, suffix: str = "") -> Team:
    """Create p1, p2 and the users through the API; log each in for a token."""
    p1, p2 = f"p1{suffix}", f"p2{suffix}"
    users = {"admin": "admin", "op1": f"op-one{suffix}", "op2": f"op-two{suffix}",
             "viewer": f"viewer-one{suffix}"}
    with served.admin() as admin:
        for project in (p1, p2):
            admin.post("/projects", json={"name": project}).raise_for_status()
        for role, name, projects in (
            ("operator", users["op1"], [p1]),
            ("operator", users["op2"], [p2]),
            ("viewer", users["viewer"], [p1]),
        ):
            admin.post("/users", json={"name": name, "password": PASSWORD, "role": role,
                                       "projects": projects}).raise_for_status()
    tokens: dict[str, str | None] = {"admin": served.admin_token, "anonymous": None}
    with served.client() as anon:
        for role in ("op1", "op2", "viewer"):
            r = anon.post("/auth/token", json={"name": users[role], "password": PASSWORD})
            tokens[role] = r.raise_for_status().json()["token"]
        revoked = anon.post("/auth/token", json={"name": users["op1"], "password": PASSWORD,
                                                 "token_name": "soon-revoked"})
    revoked.raise_for_status()
    with served.client(tokens["op1"]) as op1:
        op1.delete(f"/tokens/{revoked.json()['id']}").raise_for_status()
    tokens["revoked"] = revoked.json()["token"]
    store = Store(served.settings.db_url)
    try:
        tokens["expired"] = accounts.issue_token(
            store, users["op1"], "short", expires_in=timedelta(milliseconds=300)
        ).secret
    finally:
        store.close()
    time.sleep(0.4)
    return Team(served, tokens, users,
                {"admin": ADMIN_PASSWORD, **{r: PASSWORD for r in ("op1", "op2", "viewer")}})


@pytest.fixture(scope="module")
def served(appliance: ApplianceArtifacts) -> Iterator[Served]:
    with running_server(appliance) as s:
        yield s


@pytest.fixture(scope="module")
def team(served: Served) -> Team:
    return make_team(served)


def small_qcow2(directory: Path, name: str = "small.qcow2", size: str = "1M",
                *extra: str) -> Path:
    path = directory / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size],
                   check=True)
    return path


def accepted_jobs(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 202, response.text
    jobs: list[dict[str, Any]] = response.json()["jobs"]
    return jobs


def finish(client: httpx.Client, response: httpx.Response) -> list[dict[str, Any]]:
    """Wait for every job of a 202 answer; all must succeed."""
    done = [wait_for_job(client, job["id"]) for job in accepted_jobs(response)]
    for job in done:
        assert job["state"] == "succeeded", job
    return done


def wait_power(client: httpx.Client, name: str, power: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = client.get(f"/machines/{name}").raise_for_status().json()["power"]
        if got == power:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} is {got}, not {power}, after {timeout} s")
        time.sleep(0.2)


def is_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 problem document with this status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body
