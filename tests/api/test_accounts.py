"""Users, roles, projects, tokens and quotas; mass assignment refused."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.conftest import PASSWORD, Team, finish, is_problem
from tests.serving import Served, wait_for_job


def test_tokens_of_each_kind(served: Served, team: Team) -> None:
    for role in ("op1", "op2", "viewer"):
        with team.client(role) as c:
            assert c.get("/auth/me").json()["name"] == team.users[role]
    for role in ("revoked", "expired", "anonymous"):
        with team.client(role) as c:
            r = c.get("/auth/me")
            is_problem(r, 401)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    with served.client() as anon:
        is_problem(anon.get("/auth/me", headers={"Authorization": "Bearer corral_x_y"}), 401)
        is_problem(anon.get("/auth/me", headers={"Authorization": "Bearer nonsense"}), 401)
        is_problem(anon.post("/auth/token", json={"name": team.users["op1"],
                                                  "password": "wrong-password"}), 401)
    with team.client("op1") as c:
        mine = {t["name"] for t in c.get("/tokens").json()}
        assert {"cli", "soon-revoked", "short"} <= mine
        assert all(t["user"] == team.users["op1"] for t in c.get("/tokens").json())
        new = c.post("/tokens", json={"name": "ci", "expires_in": 3600}).json()
        assert new["token"].startswith("corral_") and new["expires_at"] is not None
        with served.client(new["token"]) as fresh:
            assert fresh.get("/auth/me").status_code == 200
            assert c.delete(f"/tokens/{new['id']}").json()["revoked_at"] is not None
            is_problem(fresh.get("/auth/me"), 401)  # revocation takes effect at once
        assert "secret" not in str(c.get("/tokens").json())
    with team.client("op2") as other:  # someone else's token: not found
        is_problem(other.delete(f"/tokens/{new['id']}"), 404)


def test_quota_refuses_machines_vcpus_memory_and_disk(served: Served) -> None:
    with served.admin() as c:
        c.post("/projects", json={"name": "pq", "quota": {
            "machines": 2, "cpus": 2, "memory_bytes": 256 << 20, "disk_bytes": 1 << 30,
        }}).raise_for_status()

        def create(suffix: str, **spec: object) -> httpx.Response:
            return c.post("/machines", json={"name": served.name(suffix), "image": "appliance",
                                             "project": "pq", "start": False,
                                             "memory_bytes": 128 << 20, **spec})

        for spec, what in (
            ({"count": 3}, "machines"),
            ({"cpus": 2, "count": 2}, "vCPUs"),
            ({"memory_bytes": 512 << 20}, "memory"),
            # a full copy owns its whole size at once; a linked clone only its claim
            ({"disk_bytes": 2 << 30, "clone": "full"}, "disk"),
        ):
            problem = is_problem(create("q", **spec), 409)
            assert f"{what} quota" in problem["detail"], problem
        finish(c, create("q1"))
        finish(c, create("q2"))
        is_problem(create("q3"), 409)
        problem = is_problem(c.post(f"/machines/{served.name('q1')}/clone",
                                    json={"name": served.name("q1-copy")}), 409)
        assert "machines quota" in problem["detail"]
        usage = c.get("/projects/pq").json()["usage"]
        assert usage["machines"] == 2 and usage["memory_bytes"] == 256 << 20
        for suffix in ("q1", "q2"):
            finish(c, c.delete(f"/machines/{served.name(suffix)}"))


def test_disk_quota_counts_what_disks_own_at_least_their_claim(served: Served) -> None:
    """A linked clone counts its claim (its room to grow), not the base it shares; once
    its guest writes more than that, what it owns counts."""
    with served.admin() as c:
        size = c.get("/images/appliance").json()["virtual_size"]
        claim = int(size * served.settings.linked_clone_growth)
        quota = size * 3 // 4  # two claims fit; one full copy would not
        c.post("/projects", json={"name": "pd", "quota": {"disk_bytes": quota}}
               ).raise_for_status()

        def create(suffix: str) -> httpx.Response:
            return c.post("/machines", json={"name": served.name(suffix), "image": "appliance",
                                             "project": "pd", "start": False})

        finish(c, create("d1"))
        assert c.get("/projects/pd").json()["usage"]["disk_bytes"] == claim
        disk = c.get(f"/machines/{served.name('d1')}").json()["disk_path"]
        # the guest's writes, made offline: enough that what the overlay owns plus a new
        # claim passes the quota, though two claims alone would not
        written = (quota - claim // 2) // (64 << 10) * (64 << 10)
        try:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {written}", disk],
                           check=True, capture_output=True)
            problem = is_problem(create("d2"), 409)
            assert "disk quota" in problem["detail"], problem
            used = c.get("/projects/pd").json()["usage"]["disk_bytes"]
            assert written <= used < quota
        finally:
            finish(c, c.delete(f"/machines/{served.name('d1')}"))
        finish(c, create("d3"))  # the room is back
        finish(c, c.delete(f"/machines/{served.name('d3')}"))


def test_quota_holds_under_concurrent_creations(served: Served) -> None:
    quota = 3
    with served.admin() as c:
        c.post("/projects", json={"name": "pc", "quota": {"machines": quota}}
               ).raise_for_status()
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        with served.admin() as w:
            while not stop.is_set():
                seen.append(w.get("/projects/pc").json()["usage"]["machines"])
                time.sleep(0.01)

    def create(i: int) -> httpx.Response:
        with served.admin() as mine:
            return mine.post("/machines", json={
                "name": served.name(f"race{i}"), "image": "appliance", "project": "pc",
                "start": False,
            })

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(create, range(8)))
        accepted = [r.json()["jobs"][0]["id"] for r in answers if r.status_code == 202]
        assert all(r.status_code in (202, 409) for r in answers), [r.text for r in answers]
        with served.admin() as c:
            finals = [wait_for_job(c, job)["state"] for job in accepted]
    finally:
        stop.set()
        watcher.join()
    assert finals.count("succeeded") <= quota
    assert max(seen) <= quota
    with served.admin() as c:
        machines = c.get("/machines", params={"project": "pc"}).json()
        assert machines["total"] == finals.count("succeeded") <= quota
        for m in machines["items"]:
            finish(c, c.delete(f"/machines/{m['name']}"))


@pytest.mark.parametrize("field", [
    {"owner": "admin"}, {"uuid": "00000000-0000-0000-0000-000000000000"},
    {"disk_path": "/etc/shadow"}, {"created_at": "2020-01-01T00:00:00Z"},
    {"mac": "52:54:00:00:00:01"}, {"record_state": "ready"},
])
def test_mass_assignment_is_refused(team: Team, field: dict[str, str]) -> None:
    with team.client("op1") as c:
        body = {"name": team.served.name("mass"), "image": "appliance", "project": "p1",
                "start": False, **field}
        problem = is_problem(c.post("/machines", json=body), 422)
        assert any(e["type"] == "extra_forbidden" for e in problem["errors"])
        assert c.get("/machines", params={"prefix": team.served.name("mass")}
                     ).json()["total"] == 0


def test_host_and_project_are_not_a_way_in(team: Team) -> None:
    name = team.served.name("sneak")
    with team.client("op1") as c:
        is_problem(c.post("/machines", json={"name": name, "image": "appliance",
                                             "project": "p1", "host": "local",
                                             "start": False}), 403)
        is_problem(c.post("/machines", json={"name": name, "image": "appliance",
                                             "project": "p2", "start": False}), 404)
        is_problem(c.post("/machines/x/clone", json={"name": name, "project": "p2"}), 422)
        is_problem(c.patch(f"/users/{team.users['op1']}", json={"role": "admin"}), 403)
        is_problem(c.patch(f"/users/{team.users['op1']}", json={"projects": ["p2"]}), 403)
        is_problem(c.post("/users", json={"name": "mallory", "password": PASSWORD,
                                          "role": "admin"}), 403)
    with team.client("viewer") as v:
        is_problem(v.post("/machines", json={"name": name, "image": "appliance",
                                             "project": "p1", "start": False}), 403)
    with team.client("op1") as c:
        assert c.get("/machines", params={"prefix": name}).json()["total"] == 0
        assert c.get("/auth/me").json()["role"] == "operator"


def test_the_last_admin_stays_an_admin(served: Served) -> None:
    with served.admin() as admin:
        r = admin.patch("/users/admin", json={"role": "viewer"})
        assert r.status_code == 409, r.text
        assert "last admin" in r.json()["detail"]
        assert admin.get("/users/admin").json()["role"] == "admin"
        second = "admin-two"
        admin.post("/users", json={"name": second, "password": "another-long-password",
                                   "role": "admin"}).raise_for_status()
        try:
            r = admin.patch(f"/users/{second}", json={"role": "viewer"})
            assert r.status_code == 200, r.text  # another admin remains
        finally:
            admin.delete(f"/users/{second}")


def test_changing_ones_password_needs_the_current_one_and_ends_other_sessions(
    served: Served,
) -> None:
    name, new = "pw-changer", "a-brand-new-password"
    with served.admin() as admin:
        admin.post("/users", json={"name": name, "password": PASSWORD, "role": "viewer"}
                   ).raise_for_status()
    try:
        with served.client() as anon:
            api_token = anon.post("/auth/token", json={"name": name, "password": PASSWORD}
                                  ).json()["token"]
        with served.client() as browser:  # another session, e.g. a stolen one
            browser.post("/auth/session", json={"name": name, "password": PASSWORD}
                         ).raise_for_status()
            with served.client(api_token) as me:
                for current in (None, "not-the-password"):
                    body = {"password": new, **({"current_password": current} if current else {})}
                    r = me.patch(f"/users/{name}", json=body)
                    assert r.status_code == 403, r.text
                r = me.patch(f"/users/{name}",
                             json={"password": new, "current_password": PASSWORD})
                assert r.status_code == 200, r.text
                assert me.get("/auth/me").status_code == 200  # API tokens stay
            assert browser.get("/auth/me").status_code == 401  # the session is over
        with served.client() as anon:
            assert anon.post("/auth/token", json={"name": name, "password": new}
                             ).status_code == 201
    finally:
        with served.admin() as admin:
            admin.delete(f"/users/{name}")
