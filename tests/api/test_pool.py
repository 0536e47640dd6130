"""Hosts, placement and the pool through the real API: uvicorn, real SQLite and the
local host on qemu:///system. No guest boots: every machine is made with start false."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.conftest import Team, finish, is_problem
from tests.serving import Served

UNREACHABLE = "qemu+tcp://127.0.0.1:1/system"


def _machine(served: Served, suffix: str, **extra: Any) -> dict[str, Any]:
    return {"name": served.name(suffix), "image": "appliance", "start": False,
            "memory_bytes": 128 << 20, **extra}


def _local(c: httpx.Client) -> dict[str, Any]:
    host: dict[str, Any] = c.get("/hosts/local").raise_for_status().json()
    return host


def _machine_count(c: httpx.Client) -> int:
    total: int = c.get("/machines", params={"limit": 1}).raise_for_status().json()["total"]
    return total


def test_hosts_show_state_capacity_and_claims(served: Served, team: Team) -> None:
    with served.admin() as c:
        hosts = c.get("/hosts").raise_for_status().json()
        assert [h["name"] for h in hosts] == ["local"]
        before = hosts[0]
        assert before["state"] == "up" and before["up"] is True
        assert before["state_note"] == "" and before["last_seen"] is not None
        assert before["capacity"]["threads"] >= 1
        assert before["capacity"]["memory_bytes"] > 0
        assert before["capacity"]["disk_bytes"] > 0
        assert before["cpu_ratio"] == served.settings.cpu_overcommit
        assert before["tags"] == [] and before["network"] == served.settings.network_name

        name = served.name("claim")
        finish(c, c.post("/machines", json=_machine(served, "claim", cpus=2)))
        try:
            after = _local(c)["claimed"]
            assert after["machines"] == before["claimed"]["machines"] + 1
            assert after["cpus"] == before["claimed"]["cpus"] + 2
            assert after["memory_bytes"] == before["claimed"]["memory_bytes"] + (128 << 20)
            assert after["disk_bytes"] > before["claimed"]["disk_bytes"]
            pools = c.get("/pools").raise_for_status().json()
            assert [(p["host"], p["claimed_bytes"]) for p in pools] == [
                ("local", after["disk_bytes"])]
            assert pools[0]["capacity_bytes"] == before["capacity"]["disk_bytes"]
            # The new sweeper reports the stopped machine's power state.
            assert c.get(f"/machines/{name}").json()["power"] == "shut-off"
        finally:
            finish(c, c.delete(f"/machines/{name}", params={"force": True}))
        assert _local(c)["claimed"] == before["claimed"]


def test_maintenance_refuses_with_an_explanation_until_it_is_off(served: Served,
                                                                 team: Team) -> None:
    with served.admin() as c:
        on = c.put("/hosts/local/maintenance", json={"on": True})
        assert on.status_code == 200, on.text
        assert on.json()["state"] == "maintenance" and on.json()["up"] is False
        try:
            refused = is_problem(c.post("/machines", json=_machine(served, "held")), 409)
            assert "maintenance" in refused["detail"]
            explanation = refused["explanation"]
            assert explanation["summary"] == refused["detail"]
            assert "maintenance" in explanation["summary"]
            assert explanation["best"] is None and explanation["hosts"] == 1
            [verdict] = explanation["verdicts"]
            assert verdict["host"] == "local" and not verdict["passed"]
            assert verdict["refusals"][0]["key"] == "maintenance"
            assert explanation["lines"][0].startswith("HOST")
            assert c.get(f"/machines/{served.name('held')}").status_code == 404
            # Health checks leave a host in maintenance alone.
            assert c.post("/hosts/check").raise_for_status().json()["changes"] == []
            assert _local(c)["state"] == "maintenance"
        finally:
            off = c.put("/hosts/local/maintenance", json={"on": False})
        assert off.status_code == 200 and off.json()["state"] == "up"
        name = served.name("held")
        finish(c, c.post("/machines", json=_machine(served, "held")))
        assert c.get(f"/machines/{name}").json()["host"] == "local"
        finish(c, c.delete(f"/machines/{name}", params={"force": True}))


def test_dry_run_places_and_creates_nothing(served: Served, team: Team) -> None:
    with served.admin() as c:
        before = _machine_count(c)
        claimed = _local(c)["claimed"]
        r = c.post("/machines", json=_machine(served, "dry", count=2, dry_run=True))
        assert r.status_code == 200, r.text
        placements = r.json()["placements"]
        assert [p["machine"] for p in placements] == [served.name("dry-1"),
                                                      served.name("dry-2")]
        assert {p["host"] for p in placements} == {"local"}
        assert all(isinstance(p["score"], float) and isinstance(p["scores"], dict)
                   for p in placements)
        assert _machine_count(c) == before
        assert _local(c)["claimed"] == claimed
        assert c.get(f"/machines/{served.name('dry-1')}").status_code == 404
    with team.client("op1") as op1:  # operators may plan in their own project
        r = op1.post("/machines", json=_machine(served, "dry-op", project="p1", dry_run=True))
        assert r.status_code == 200 and r.json()["placements"][0]["host"] == "local"


def test_explain_gives_every_hosts_verdict(served: Served, team: Team) -> None:
    with served.admin() as c:
        r = c.post("/placement/explain", json=_machine(served, "why", fast=True))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["machine"] == served.name("why") and body["best"] == "local"
        assert body["hosts"] == 1 and body["passed"] == 1
        assert body["needs"]["memory_bytes"] == 128 << 20
        assert "'local' scores best" in body["summary"]
        [verdict] = body["verdicts"]
        assert verdict["host"] == "local" and verdict["passed"]
        assert isinstance(verdict["total"], float) and verdict["refusals"] == []
        assert body["lines"][1].startswith("local") and "fits" in body["lines"][1]

        # A tag no host carries: refused, and the verdict says why.
        r = c.post("/placement/explain", json=_machine(served, "why", tags=["gpu"]))
        body = r.raise_for_status().json()
        assert body["best"] is None and not body["verdicts"][0]["passed"]
        assert body["verdicts"][0]["refusals"][0]["filter"] == "tags"
        refused = is_problem(c.post("/machines", json=_machine(served, "why", tags=["gpu"])),
                             409)
        assert refused["explanation"]["verdicts"][0]["refusals"][0]["filter"] == "tags"
        assert c.get(f"/machines/{served.name('why')}").status_code == 404

        # Tags and ratios set on the host are what placement and the listing see.
        patched = c.patch("/hosts/local", json={"tags": ["gpu"], "cpu_ratio": 2.0})
        assert patched.status_code == 200, patched.text
        assert patched.json()["tags"] == ["gpu"] and patched.json()["cpu_ratio"] == 2.0
        try:
            r = c.post("/placement/explain", json=_machine(served, "why", tags=["gpu"]))
            assert r.raise_for_status().json()["best"] == "local"
        finally:
            reset = c.patch("/hosts/local", json={"tags": [], "cpu_ratio": None})
        assert reset.json()["tags"] == []
        assert reset.json()["cpu_ratio"] == served.settings.cpu_overcommit

        assert c.get("/pool/rebalance").raise_for_status().json() == {"moves": []}


def test_only_admins_change_hosts(served: Served, team: Team) -> None:
    changes = [
        ("POST", "/hosts", {"name": "intruder", "uri": UNREACHABLE}),
        ("PATCH", "/hosts/local", {"tags": ["mine"]}),
        ("PUT", "/hosts/local/maintenance", {"on": True}),
        ("DELETE", "/hosts/local", None),
        ("POST", "/hosts/check", None),
        ("POST", "/hosts/local/probe", None),
    ]
    for role in ("viewer", "op1"):
        with team.client(role) as c:
            assert c.get("/hosts").status_code == 200
            for method, path, body in changes:
                is_problem(c.request(method, path, json=body), 403)
            is_problem(c.get("/pool/rebalance"), 403)
            is_problem(c.post("/machines", json=_machine(
                served, "pinned", project="p1", host="local")), 403)
    with served.admin() as c:
        assert _local(c)["state"] == "up" and _local(c)["tags"] == []


def test_an_unreachable_host_is_not_enrolled(served: Served, team: Team) -> None:
    with served.admin() as c:
        r = c.post("/hosts", json={"name": "far-away", "uri": UNREACHABLE, "tags": ["ssd"]})
        problem = is_problem(r, 503)
        assert "127.0.0.1:1" in problem["detail"]
        assert "\n" not in problem["detail"] and "Traceback" not in problem["detail"]
        assert [h["name"] for h in c.get("/hosts").json()] == ["local"]
        is_problem(c.get("/hosts/far-away"), 404)

        is_problem(c.post("/hosts", json={"name": "local", "uri": "qemu:///system"}), 422)
        is_problem(c.delete("/hosts/local"), 409)  # the local host stays
        is_problem(c.delete("/hosts/far-away"), 404)
        is_problem(c.put("/hosts/far-away/maintenance", json={"on": True}), 404)
