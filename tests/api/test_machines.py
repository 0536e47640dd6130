"""Machines, jobs, events, the audit log and problem documents, through the real API:
httpx against uvicorn, real SQLite, real libvirt. One guest boots; the rest stay off."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import Team, accepted_jobs, finish, is_problem, wait_power
from tests.serving import Served, wait_for_job


def test_create_power_clone_delete(served: Served, team: Team) -> None:
    name = served.name("vm")
    with served.admin() as c:
        jobs = finish(c, c.post("/machines", json={"name": name, "image": "appliance",
                                                   "memory_bytes": 128 << 20}))
        assert [j["target"] for j in jobs] == [name]
        assert [s["state"] for s in jobs[0]["steps"]] == ["done"] * len(jobs[0]["steps"])
        wait_power(c, name, "running")
        got = c.get(f"/machines/{name}").json()
        assert got["project"] == "default" and got["image"] == "appliance"
        assert got["record_state"] == "ready" and got["usage"]["virtual_size"] > 0

        is_problem(c.post(f"/machines/{name}/start"), 409)  # already running
        is_problem(c.post(f"/machines/{name}/clone", json={"name": served.name("c0")}), 409)
        is_problem(c.delete(f"/machines/{name}"), 409)  # running, no force
        assert c.post(f"/machines/{name}/reboot").status_code == 200
        r = c.post(f"/machines/{name}/kill")
        assert r.status_code == 200 and r.json()["power"] == "shut-off", r.text
        is_problem(c.post(f"/machines/{name}/reboot"), 409)  # not running
        r = c.post(f"/machines/{name}/stop", params={"timeout": 1})
        assert r.status_code == 200 and r.json()["power"] == "shut-off"

        copy = served.name("vm-copy")
        finish(c, c.post(f"/machines/{name}/clone", json={"name": copy}))
        cloned = c.get(f"/machines/{copy}").json()
        assert cloned["power"] == "shut-off" and cloned["uuid"] != got["uuid"]
        assert cloned["mac"] != got["mac"]

        for target in (name, copy):
            finish(c, c.delete(f"/machines/{target}"))
            is_problem(c.get(f"/machines/{target}"), 404)

        events = c.get("/events", params={"target": name}).json()["items"]
        assert {"machine.rebooted", "machine.powered-off"} <= {e["kind"] for e in events}


def test_batch_create_lists_and_pages(served: Served, team: Team) -> None:
    base = served.name("batch")
    with team.client("op1") as c:
        r = c.post("/machines", json={"name": base, "image": "appliance", "count": 3,
                                      "start": False, "project": "p1"})
        jobs = finish(c, r)
        names = [f"{base}-{i}" for i in (1, 2, 3)]
        assert [j["target"] for j in jobs] == names
        for n in names:
            m = c.get(f"/machines/{n}").json()
            assert m["project"] == "p1" and m["power"] == "shut-off"

        seen: list[str] = []
        after = None
        while True:
            params: dict[str, str | int] = {"limit": 2, "prefix": base}
            if after:
                params["after"] = after
            page = c.get("/machines", params=params).json()
            assert page["total"] == 3
            seen += [m["name"] for m in page["items"]]
            after = page["next"]
            if after is None:
                break
        assert seen == names

        assert c.get("/machines", params={"prefix": base, "project": "p1"}).json()["total"] == 3
        assert c.get("/machines", params={"prefix": base, "project": "p2"}).json()["total"] == 0
        assert c.get("/machines", params={"prefix": base, "image": "appliance",
                                          "state": "ready", "host": "local"}).json()["total"] == 3
        assert c.get("/machines", params={"prefix": base, "image": "none"}).json()["total"] == 0
        is_problem(c.get("/machines", params={"limit": 0}), 422)

    with team.client("op2") as other:  # another project's machines are not listed
        assert other.get("/machines", params={"prefix": base}).json()["total"] == 0
    with served.admin() as admin:
        assert admin.get("/machines", params={"prefix": base}).json()["total"] == 3
        for n in names:
            finish(admin, admin.delete(f"/machines/{n}"))


def test_job_stream_follows_a_job_to_its_end(served: Served) -> None:
    name = served.name("sse")
    with served.admin() as c:
        (job,) = accepted_jobs(c.post("/machines", json={"name": name, "image": "appliance",
                                                         "start": False}))
        states = []
        with c.stream("GET", f"/jobs/{job['id']}/stream") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    assert event == "job"
                    states.append(json.loads(line.removeprefix("data: "))["state"])
        assert states[-1] == "succeeded"
        assert wait_for_job(c, job["id"])["state"] == "succeeded"
        listed = c.get("/jobs", params={"target": name}).json()["items"]
        assert [j["id"] for j in listed] == [job["id"]]
        finish(c, c.delete(f"/machines/{name}"))


def test_audit_records_who_what_status_and_is_admin_only(served: Served, team: Team) -> None:
    with team.client("op1") as c:
        r = c.post("/machines", json={"name": served.name("nope"), "image": "no-such-image",
                                      "project": "p1", "start": False})
        is_problem(r, 404)
        is_problem(c.get("/audit"), 403)
    with team.client("viewer") as v:
        is_problem(v.get("/audit"), 403)
    with served.admin() as admin:
        entries = admin.get("/audit", params={"actor": team.users["op1"]}).json()["items"]
        assert any(e["action"] == "POST /machines" and e["target"] == "/machines"
                   and e["status"] == 404 for e in entries), entries
        anyone = admin.get("/audit", params={"limit": 500}).json()["items"]
        assert any(e["actor"] == "admin" and e["action"] == "POST /projects"
                   and e["status"] == 201 for e in anyone)
        assert all(not e["action"].startswith("GET ") for e in anyone)


@pytest.mark.parametrize(("role", "method", "path", "body", "status"), [
    ("admin", "DELETE", "/users/admin", None, 400),
    ("anonymous", "GET", "/machines", None, 401),
    ("revoked", "GET", "/auth/me", None, 401),
    ("viewer", "POST", "/machines", {"name": "x", "image": "appliance", "project": "p1"}, 403),
    ("admin", "GET", "/machines/no-such-machine", None, 404),
    ("admin", "GET", "/no/such/route", None, 404),
    ("admin", "POST", "/projects", {"name": "p1"}, 409),
    ("admin", "POST", "/projects", {"name": "Not A Name"}, 422),
    ("admin", "POST", "/machines", b"{not json", 422),
    ("admin", "GET", "/jobs/99999999999999999999", None, 422),
])
def test_problem_documents(team: Team, role: str, method: str, path: str,
                           body: object, status: int) -> None:
    with team.client(role) as c:
        if isinstance(body, bytes):
            r = c.request(method, path, content=body,
                          headers={"content-type": "application/json"})
        else:
            r = c.request(method, path, json=body)
    problem = is_problem(r, status)
    if status == 422 and path != "/machines":
        assert problem["errors"], problem
