"""Moving machines through the real API: migrate, evacuate and rebalance, their 202
bodies, the problems of impossible moves, and who may ask.

The first tests use the local host alone (no guest boots: every machine is made with
start false). The last one enrols a second libvirtd, h20 at 127.0.0.20 (tests/multihost.py;
no other test uses that address; enrolment boots its few-second probe), and moves
stopped machines between it and the local host for real.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import Team, finish, is_problem
from tests.libvirt_cleanup import remove_prefixed
from tests.multihost import TestHost, connection, start_hosts, stop_hosts
from tests.serving import Served, wait_for_job

ADDRESS = 20  # 127.0.0.20: this module's alone (the console's test uses 127.0.0.21)


def _create(c: httpx.Client, served: Served, suffix: str, **extra: Any) -> str:
    name = served.name(suffix)
    finish(c, c.post("/machines", json={"name": name, "image": "appliance", "start": False,
                                        "memory_bytes": 128 << 20, "project": "p1",
                                        **extra}))
    return name


def _delete(c: httpx.Client, *names: str) -> None:
    for name in names:
        r = c.delete(f"/machines/{name}", params={"force": True})
        if r.status_code == 202:
            finish(c, r)


def _last_event(c: httpx.Client) -> int:
    items = c.get("/events", params={"limit": 1}).raise_for_status().json()["items"]
    return int(items[0]["id"]) if items else 0


def _wait_event(c: httpx.Client, target: str, kind: str, after: int,
                timeout: float = 300) -> dict[str, Any]:
    """The first event ``kind`` on ``target`` after event id ``after``."""
    deadline = time.monotonic() + timeout
    while True:
        page = c.get("/events", params={"target": target, "after": after, "limit": 500})
        for event in page.raise_for_status().json()["items"]:
            if event["kind"] == kind:
                found: dict[str, Any] = event
                return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no event {kind} on {target} after {timeout} s")
        time.sleep(0.3)


def _host_of(c: httpx.Client, name: str) -> str:
    host: str = c.get(f"/machines/{name}").raise_for_status().json()["host"]
    return host


def _moves(c: httpx.Client, name: str) -> list[dict[str, Any]]:
    jobs = c.get("/jobs", params={"target": name}).raise_for_status().json()["items"]
    return [j for j in jobs if j["kind"].startswith("migrate")]


# -- one host ----------------------------------------------------------------------------


def test_impossible_moves_are_problems_and_change_nothing(served: Served, team: Team) -> None:
    with served.admin() as c:
        name = _create(c, served, "stays")
        try:
            refused = is_problem(c.post(f"/machines/{name}/migrate", json={"live": True}), 409)
            assert refused["detail"].startswith(
                f"Machine '{name}' is not running, so it cannot move live.")
            assert "\n" not in refused["detail"] and "Traceback" not in refused["detail"]

            same = is_problem(c.post(f"/machines/{name}/migrate", json={"to": "local"}), 400)
            assert same["detail"].startswith(f"Machine '{name}' already runs on host 'local'.")

            nowhere = is_problem(c.post(f"/machines/{name}/migrate", json={"to": "nowhere"}),
                                 404)
            assert "'nowhere'" in nowhere["detail"]

            # The scheduler's choice, with no other host: every host's verdict comes back.
            alone = is_problem(c.post(f"/machines/{name}/migrate", json={}), 409)
            assert alone["detail"].startswith(f"No host can take '{name}'")
            assert alone["explanation"]["hosts"] == 0  # the source is not a candidate

            is_problem(c.post(f"/machines/{name}/migrate", json={"live": "maybe"}), 422)
            is_problem(c.post(f"/machines/{name}/migrate", json={"host": "local"}), 422)
            is_problem(c.post("/machines/no-such-machine/migrate", json={}), 404)

            assert _host_of(c, name) == "local"
            assert _moves(c, name) == []  # refused before any job was written

            is_problem(c.post("/hosts/nowhere/evacuate"), 404)
            assert c.get("/hosts/local").json()["state"] == "up"

            # One host: the load is as even as it gets; nothing to carry out.
            r = c.post("/pool/rebalance", json={"max_moves": 10})
            assert r.status_code == 202, r.text
            assert r.json() == {"moves": []}
            assert c.post("/pool/rebalance").status_code == 202  # the body is optional
            is_problem(c.post("/pool/rebalance", json={"max_moves": 0}), 422)
            is_problem(c.post("/pool/rebalance", json={"max_moves": 5, "dry_run": True}), 422)
        finally:
            _delete(c, name)


def test_only_admins_move_machines(served: Served, team: Team) -> None:
    with served.admin() as c:
        name = _create(c, served, "mine")
    try:
        calls = [
            ("POST", f"/machines/{name}/migrate", {}),
            ("POST", "/hosts/local/evacuate", None),
            ("POST", "/pool/rebalance", {"max_moves": 1}),
        ]
        for role in ("op1", "viewer", "op2"):
            with team.client(role) as c:
                for method, path, body in calls:
                    expected = 404 if role == "op2" and path.startswith("/machines") else 403
                    is_problem(c.request(method, path, json=body), expected)
        with team.client("anonymous") as c:
            for method, path, body in calls:
                is_problem(c.request(method, path, json=body), 401)
        with served.admin() as c:
            assert c.get("/hosts/local").json()["state"] == "up"
            assert _moves(c, name) == []
    finally:
        with served.admin() as c:
            _delete(c, name)


def test_an_evacuation_with_nowhere_to_go_says_so_per_machine(served: Served,
                                                               team: Team) -> None:
    with served.admin() as c:
        name = _create(c, served, "stuck")
        try:
            since = _last_event(c)
            r = c.post("/hosts/local/evacuate")
            assert r.status_code == 202, r.text
            assert r.json() == {"host": "local", "state": "maintenance", "machines": [
                {"machine": name, "project": "p1", "live": False}]}
            assert c.get("/hosts/local").json()["state"] == "maintenance"  # at once

            ended = _wait_event(c, "local", "host.evacuated", since)
            assert ended["message"] == ("host local evacuated: 0 of 1 machines moved, "
                                        "1 stayed (see their events)")
            failed = _wait_event(c, name, "machine.move-failed", since)
            assert failed["project"] == "p1"
            assert failed["message"].startswith(
                f"evacuating host local: {name} did not move: No host can take '{name}'")
            assert _host_of(c, name) == "local"
        finally:
            c.put("/hosts/local/maintenance", json={"on": False}).raise_for_status()
            _delete(c, name)
    with team.client("op1") as op1:  # the machine's project sees why it stayed
        events = op1.get("/events", params={"target": name}).json()["items"]
        assert "machine.move-failed" in {e["kind"] for e in events}
        assert op1.get("/events", params={"target": "local"}).json()["items"] == []


# -- two hosts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h20(served: Served) -> Iterator[TestHost]:
    """A second host, enrolled through the API with a pool of its own."""
    root = served.settings.state_dir.parent
    [host] = start_hosts(root, 1, first_address=ADDRESS)
    try:
        with served.admin() as c:
            r = c.post("/hosts", json={"name": host.name, "uri": host.uri,
                                       "pool_path": str(root / f"{host.name}-pool"),
                                       # Its own bridge: the hosts share one kernel.
                                       "network": f"{served.prefix}-{host.name}",
                                       "accelerator": "tcg"})
            assert r.status_code == 201, r.text
        yield host
    finally:
        try:
            if not host.running:  # it died: back up, so that what it holds can be removed
                host.start()
            with served.admin() as c:
                left = c.get("/machines", params={"host": host.name}).json()["items"]
                _delete(c, *[m["name"] for m in left])
                c.delete(f"/hosts/{host.name}")
        finally:
            try:  # its network is a bridge in the one kernel every host shares
                remove_prefixed(host.uri, served.prefix)
            finally:
                stop_hosts([host])


def _domains(host: TestHost) -> set[str]:
    with connection(host.uri) as conn:
        return {d.name() for d in conn.listAllDomains(0)}


def test_rebalance_then_evacuate_move_machines_for_real(served: Served, team: Team,
                                                        h20: TestHost) -> None:
    with served.admin() as c:
        names = [_create(c, served, f"bal-{i}", host="h20") for i in (1, 2)]
        try:
            assert {_host_of(c, n) for n in names} == {"h20"}
            plan = c.get("/pool/rebalance").raise_for_status().json()["moves"]
            assert len(plan) == 1 and plan[0]["source"] == "h20"
            assert plan[0]["target"] == "local" and plan[0]["machine"] in names

            since = _last_event(c)
            r = c.post("/pool/rebalance", json={"max_moves": 5})
            assert r.status_code == 202, r.text
            assert r.json()["moves"] == plan
            ended = _wait_event(c, "pool", "pool.rebalanced", since)
            assert ended["message"] == "pool rebalanced: 1 machine moved"
            moved = plan[0]["machine"]
            [job] = _moves(c, moved)
            assert (job["kind"], job["state"]) == ("migrate", "succeeded")
            assert _host_of(c, moved) == "local"
            assert moved not in _domains(h20)
            [stayed] = [n for n in names if n != moved]

            since = _last_event(c)
            r = c.post("/hosts/h20/evacuate")
            assert r.status_code == 202, r.text
            assert r.json() == {"host": "h20", "state": "maintenance", "machines": [
                {"machine": stayed, "project": "p1", "live": False}]}
            # While it moves (a cold move takes a good second; this asks in milliseconds),
            # no other evacuation or rebalance may plan moves of the same machines.
            busy = is_problem(c.post("/pool/rebalance"), 409)
            assert busy["detail"].startswith("Another evacuation or rebalance is moving")
            ended = _wait_event(c, "h20", "host.evacuated", since)
            assert ended["message"] == "host h20 evacuated: 1 machine moved"
            [job] = _moves(c, stayed)
            assert wait_for_job(c, job["id"])["state"] == "succeeded"
            assert {_host_of(c, n) for n in names} == {"local"}
            host = c.get("/hosts/h20").json()
            assert host["state"] == "maintenance" and host["claimed"]["machines"] == 0
            assert _domains(h20) == set()
            assert not list(Path(served.settings.state_dir.parent / "h20-pool").glob(
                f"{served.prefix}-*"))

            # An empty host: only maintenance, nothing is started.
            r = c.post("/hosts/h20/evacuate")
            assert r.status_code == 202 and r.json()["machines"] == []
        finally:
            _delete(c, *names)
            c.put("/hosts/h20/maintenance", json={"on": False})
