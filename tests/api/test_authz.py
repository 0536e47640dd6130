"""The authorization matrix: every operation of the OpenAPI document × every kind of
caller. A new endpoint without a row here fails ``test_every_operation_has_a_row``.

Callers: admin; op1 (operator of p1, which owns the targets); op2 (operator of p2);
viewer (of p1); a revoked, an expired and no token. Another project's things are
invisible (404, not 403); a viewer's changes are 403; bad credentials are 401.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import PASSWORD, ROLES, Team, accepted_jobs, finish, small_qcow2
from tests.serving import Served

ANON = {"revoked": 401, "expired": 401, "anonymous": 401}


@dataclass
class World:
    served: Served
    team: Team
    machine: str
    job: int
    image: str
    qcow2: bytes
    token_ids: dict[str, str]
    names: dict[str, str] = field(default_factory=dict)

    def n(self, what: str, role: str) -> str:
        return self.served.name(f"{what}-{role}")


@pytest.fixture(scope="module")
def world(served: Served, team: Team, tmp_path_factory: pytest.TempPathFactory) -> World:
    qcow2 = small_qcow2(tmp_path_factory.mktemp("img"), "m.qcow2", "1M", "-o",
                        "cluster_size=512").read_bytes()
    machine = served.name("authz")
    with served.admin() as c:
        r = c.post("/machines", json={"name": machine, "image": "appliance", "project": "p1",
                                      "start": False})
        job = accepted_jobs(r)[0]["id"]
        finish(c, r)
        for role in ("admin", "op1"):
            finish(c, c.post("/machines", json={"name": served.name(f"del-{role}"),
                                                "image": "appliance", "project": "p1",
                                                "start": False}))
        for image in ("img-p1", "del-img-admin", "del-img-op1"):
            finish(c, c.post("/images", params={"name": image, "project": "p1"},
                             content=qcow2))
        c.post("/users", json={"name": "patch-me", "password": PASSWORD, "role": "viewer",
                               "projects": ["p1"]}).raise_for_status()
        c.post("/users", json={"name": "delete-me", "password": PASSWORD, "role": "viewer"}
               ).raise_for_status()
        c.post("/projects", json={"name": "empty-project"}).raise_for_status()
        for kept in ("kept", "del"):
            c.post("/pools", json={"name": served.name(f"pool-{kept}"), "type": "qcow2",
                                   "path": str(_pool_dir(served, kept))}).raise_for_status()
    token_ids = {}
    with team.client("op1") as op1:
        for role in ("admin", "op1", "other"):
            token_ids[role] = op1.post("/tokens", json={"name": f"for-{role}"}).json()["id"]
    return World(served, team, machine, job, "img-p1", qcow2, token_ids)


Call = Callable[[httpx.Client, World, str], httpx.Response]


def _pool_dir(served: Served, name: str) -> Path:
    """A directory of its own for a storage pool, beside (not in) the server's state."""
    path = served.settings.state_dir.parent / f"pools-{name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _add_pool(c: httpx.Client, w: World, role: str) -> httpx.Response:
    return c.post("/pools", json={"name": w.n("pool", role), "type": "qcow2",
                                  "path": str(_pool_dir(w.served, role))})


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    expect: dict[str, int]
    call: Call


def _simple(method: str, url: str | Callable[[World, str], str], **kw: Any) -> Call:
    def call(c: httpx.Client, w: World, role: str) -> httpx.Response:
        return c.request(method, url(w, role) if callable(url) else url, **kw)
    return call


def _everyone(status: int) -> dict[str, int]:
    return {"admin": status, "op1": status, "op2": status, "viewer": status, **ANON}


def _p1_reader(status: int = 200) -> dict[str, int]:
    return {"admin": status, "op1": status, "op2": 404, "viewer": status, **ANON}


def _p1_manager(status: int) -> dict[str, int]:
    return {"admin": status, "op1": status, "op2": 404, "viewer": 403, **ANON}


def _admin_only(status: int, others: int = 403) -> dict[str, int]:
    return {"admin": status, "op1": others, "op2": others, "viewer": others, **ANON}


def _login(path: str, extra: dict[str, Any]) -> Call:
    def call(c: httpx.Client, w: World, role: str) -> httpx.Response:
        return c.post(path, json={"name": w.team.users["op1"], "password": PASSWORD, **extra})
    return call


def _start_then_kill(c: httpx.Client, w: World, role: str) -> httpx.Response:
    r = c.post(f"/machines/{w.machine}/start")
    if r.status_code == 200:
        with w.served.admin() as admin:
            admin.post(f"/machines/{w.machine}/kill").raise_for_status()
    return r


def _upload(c: httpx.Client, w: World, role: str) -> httpx.Response:
    return c.post("/images", params={"name": f"up-{role}", "project": "p1"}, content=w.qcow2)


def _copy_of_snapshot(c: httpx.Client, w: World, role: str) -> httpx.Response:
    r = c.post(f"/machines/{w.machine}/snapshots/s-{role}/clone",
               json={"name": w.n("from-snap", role), "start": False})
    if r.status_code == 202:
        finish(c, r)
    return r


def _capture(c: httpx.Client, w: World, role: str) -> httpx.Response:
    # Waited for: the rows after it start the machine, whose disk the capture reads.
    r = c.post("/images/capture", json={"machine": w.machine, "name": w.n("cap", role)})
    if r.status_code == 202:
        finish(c, r)
    return r


def _m(w: World, _role: str) -> str:
    return f"/machines/{w.machine}"


ROWS = [
    Row("POST", "/auth/session", {r: 200 for r in ROLES}, _login("/auth/session", {})),
    Row("POST", "/auth/token", {r: 201 for r in ROLES}, _login("/auth/token", {})),
    Row("DELETE", "/auth/session", _everyone(204), _simple("DELETE", "/auth/session")),
    Row("GET", "/auth/me", _everyone(200), _simple("GET", "/auth/me")),
    Row("GET", "/hosts", _everyone(200), _simple("GET", "/hosts")),
    Row("GET", "/hosts/{name}", _everyone(200), _simple("GET", "/hosts/local")),
    Row("POST", "/hosts/{name}/probe", _admin_only(200), _simple("POST", "/hosts/local/probe")),
    Row("POST", "/hosts", _admin_only(503), _simple("POST", "/hosts", json={
        "name": "unreachable", "uri": "qemu+tcp://127.0.0.1:1/system"})),
    Row("PATCH", "/hosts/{name}", _admin_only(200),
        _simple("PATCH", "/hosts/local", json={"tags": []})),
    Row("PUT", "/hosts/{name}/maintenance", _admin_only(200),
        _simple("PUT", "/hosts/local/maintenance", json={"on": False})),
    Row("DELETE", "/hosts/{name}", _admin_only(409), _simple("DELETE", "/hosts/local")),
    # Evacuating the only host would put it in maintenance: an admin asks for one that
    # does not exist (404), which still shows the role is allowed.
    Row("POST", "/hosts/{name}/evacuate", _admin_only(404),
        _simple("POST", "/hosts/no-such-host/evacuate")),
    Row("POST", "/hosts/check", _admin_only(200), _simple("POST", "/hosts/check")),
    Row("POST", "/placement/explain", _p1_manager(200), lambda c, w, r: c.post(
        "/placement/explain", json={"name": w.n("why", r), "image": "appliance",
                                    "project": "p1"})),
    Row("GET", "/pool/rebalance", _admin_only(200), _simple("GET", "/pool/rebalance")),
    # One host: the plan is empty, so nothing moves.
    Row("POST", "/pool/rebalance", _admin_only(202),
        _simple("POST", "/pool/rebalance", json={"max_moves": 1})),
    Row("GET", "/pools", _everyone(200), _simple("GET", "/pools")),
    Row("GET", "/pools/usage", _admin_only(200), _simple("GET", "/pools/usage")),
    Row("POST", "/pools", _admin_only(201), _add_pool),
    Row("GET", "/pools/{name}", _everyone(200),
        _simple("GET", lambda w, r: f"/pools/{w.served.name('pool-kept')}")),
    Row("DELETE", "/pools/{name}", _admin_only(204),
        _simple("DELETE", lambda w, r: f"/pools/{w.served.name('pool-del')}")),
    Row("GET", "/images", _everyone(200), _simple("GET", "/images")),
    Row("GET", "/images/{name}", _p1_reader(), _simple("GET", "/images/img-p1")),
    Row("POST", "/images", _p1_manager(202), _upload),
    Row("DELETE", "/images/{name}", _p1_manager(204), _simple(
        "DELETE", lambda w, r: f"/images/del-img-{r}" if r in ("admin", "op1") else
        "/images/img-p1")),
    Row("POST", "/images/capture", _p1_manager(202), _capture),
    Row("GET", "/machines", _everyone(200), _simple("GET", "/machines")),
    Row("POST", "/machines", _p1_manager(202), lambda c, w, r: c.post("/machines", json={
        "name": w.n("new", r), "image": "appliance", "project": "p1", "start": False})),
    Row("GET", "/machines/{name}", _p1_reader(), _simple("GET", _m)),
    Row("DELETE", "/machines/{name}", _p1_manager(202), _simple(
        "DELETE", lambda w, r: f"/machines/{w.served.name('del-' + r)}"
        if r in ("admin", "op1") else f"/machines/{w.machine}")),
    Row("POST", "/machines/{name}/start", _p1_manager(200), _start_then_kill),
    Row("POST", "/machines/{name}/stop", _p1_manager(200),
        _simple("POST", lambda w, r: f"/machines/{w.machine}/stop")),
    Row("POST", "/machines/{name}/reboot", _p1_manager(409),  # allowed, but it is off
        _simple("POST", lambda w, r: f"/machines/{w.machine}/reboot")),
    Row("POST", "/machines/{name}/kill", _p1_manager(200),
        _simple("POST", lambda w, r: f"/machines/{w.machine}/kill")),
    Row("POST", "/machines/{name}/clone", _p1_manager(202), lambda c, w, r: c.post(
        f"/machines/{w.machine}/clone", json={"name": w.n("clone", r)})),
    # Moving machines between hosts is for admins; to the host it is on: 400, nothing moves.
    Row("POST", "/machines/{name}/migrate", {**_admin_only(400), "op2": 404},
        lambda c, w, r: c.post(f"/machines/{w.machine}/migrate", json={"to": "local"})),
    # Snapshots: each manager takes one, reverts to it ...
    Row("GET", "/machines/{name}/snapshots", _p1_reader(),
        _simple("GET", lambda w, r: f"/machines/{w.machine}/snapshots")),
    Row("POST", "/machines/{name}/snapshots", _p1_manager(201), lambda c, w, r: c.post(
        f"/machines/{w.machine}/snapshots", json={"name": f"s-{r}"})),
    Row("POST", "/machines/{name}/snapshots/{snapshot}/revert", _p1_manager(200),
        _simple("POST", lambda w, r: f"/machines/{w.machine}/snapshots/s-{r}/revert")),
    # ... makes a stopped machine of it (the job is waited for: the snapshot goes next) ...
    Row("POST", "/machines/{name}/snapshots/{snapshot}/clone", _p1_manager(202),
        _copy_of_snapshot),
    # ... and deletes it.
    Row("DELETE", "/machines/{name}/snapshots/{snapshot}", _p1_manager(204),
        _simple("DELETE", lambda w, r: f"/machines/{w.machine}/snapshots/s-{r}")),
    Row("GET", "/jobs", _everyone(200), _simple("GET", "/jobs")),
    Row("GET", "/jobs/{job_id}", _p1_reader(), _simple("GET", lambda w, r: f"/jobs/{w.job}")),
    Row("GET", "/jobs/{job_id}/stream", _p1_reader(),
        _simple("GET", lambda w, r: f"/jobs/{w.job}/stream")),
    Row("GET", "/events", _everyone(200), _simple("GET", "/events")),
    Row("GET", "/events/stream", _everyone(200),
        _simple("GET", "/events/stream", params={"seconds": 0.2})),
    Row("GET", "/audit", _admin_only(200), _simple("GET", "/audit")),
    Row("GET", "/users", _admin_only(200), _simple("GET", "/users")),
    Row("POST", "/users", _admin_only(201), lambda c, w, r: c.post("/users", json={
        "name": f"made-by-{r}", "password": PASSWORD, "role": "viewer"})),
    Row("GET", "/users/{name}", {"admin": 200, "op1": 404, "op2": 404, "viewer": 200, **ANON},
        _simple("GET", lambda w, r: f"/users/{w.team.users['viewer']}")),
    Row("PATCH", "/users/{name}", _admin_only(200, 404),
        _simple("PATCH", "/users/patch-me", json={"role": "operator"})),
    Row("DELETE", "/users/{name}", _admin_only(204), _simple("DELETE", "/users/delete-me")),
    Row("GET", "/projects", _everyone(200), _simple("GET", "/projects")),
    Row("POST", "/projects", _admin_only(201), lambda c, w, r: c.post("/projects", json={
        "name": f"by-{r}"})),
    Row("GET", "/projects/{name}", _p1_reader(), _simple("GET", "/projects/p1")),
    Row("PUT", "/projects/{name}/quota", {"admin": 200, "op1": 403, "op2": 404, "viewer": 403,
                                          **ANON},
        _simple("PUT", "/projects/p1/quota", json={})),
    Row("DELETE", "/projects/{name}", _admin_only(204, 404),
        _simple("DELETE", "/projects/empty-project")),
    Row("GET", "/tokens", _everyone(200), _simple("GET", "/tokens")),
    Row("POST", "/tokens", _everyone(201), _simple("POST", "/tokens", json={"name": "more"})),
    Row("DELETE", "/tokens/{token_id}", {"admin": 200, "op1": 200, "op2": 404, "viewer": 404,
                                         **ANON},
        _simple("DELETE", lambda w, r: f"/tokens/{w.token_ids.get(r, w.token_ids['other'])}")),
]


def test_every_operation_has_a_row(served: Served) -> None:
    with served.client() as c:
        document = c.get("/openapi.json").json()
    operations = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item if method in ("get", "post", "put", "patch", "delete")}
    assert operations == {(row.method, row.path) for row in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.method} {r.path}" for r in ROWS])
def test_matrix(world: World, row: Row) -> None:
    got = {}
    for role in ROLES:
        with world.team.client(role) as c:
            got[role] = row.call(c, world, role).status_code
    assert got == row.expect
