"""Browser sessions (cookie + CSRF), the login throttle, and secrets kept out of logs.

A server of its own: the throttle counts failures per client address, and every
test here logs in from 127.0.0.1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.store import Store
from tests.api.conftest import PASSWORD, finish, is_problem, small_qcow2
from tests.serving import ADMIN_PASSWORD, Served, running_server


@pytest.fixture(scope="module")
def bare() -> Iterator[Served]:
    with running_server() as served:
        with served.admin() as c:
            c.post("/users", json={"name": "sam", "password": PASSWORD, "role": "operator",
                                   "projects": ["default"]}).raise_for_status()
        yield served


def _cookie_attributes(header: str) -> dict[str, str]:
    parts = [p.strip() for p in header.split(";")]
    return {p.split("=", 1)[0].lower(): (p.split("=", 1)[1] if "=" in p else "")
            for p in parts[1:]}


def test_session_cookie_and_csrf(bare: Served) -> None:
    with bare.client() as anon:
        r = anon.post("/auth/session", json={"name": "sam", "password": PASSWORD})
    assert r.status_code == 200, r.text
    header = r.headers["set-cookie"]
    assert header.startswith("corral_session=corral_")
    attributes = _cookie_attributes(header)
    assert "httponly" in attributes and "secure" in attributes
    assert attributes["samesite"].lower() == "strict"
    session = header.split(";")[0].split("=", 1)[1]
    csrf = r.json()["csrf_token"]
    assert csrf and csrf not in session

    cookie = {"Cookie": f"corral_session={session}"}
    with bare.client() as c:
        assert c.get("/auth/me", headers=cookie).json()["name"] == "sam"
        is_problem(c.post("/tokens", json={"name": "x"}, headers=cookie), 403)
        is_problem(c.post("/tokens", json={"name": "x"},
                          headers={**cookie, "X-CSRF-Token": "forged"}), 403)
        r = c.post("/tokens", json={"name": "x"}, headers={**cookie, "X-CSRF-Token": csrf})
        assert r.status_code == 201, r.text
        assert c.delete("/auth/session", headers={**cookie, "X-CSRF-Token": csrf}
                        ).status_code == 204
        is_problem(c.get("/auth/me", headers=cookie), 401)  # logged out for good


def test_secrets_never_reach_logs_or_audit(
    bare: Served, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    server_loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error",
                                                     "uvicorn.access")]
    levels = [lg.level for lg in server_loggers]
    for lg in server_loggers:  # uvicorn's loggers do not propagate to the root
        lg.addHandler(caplog.handler)
        lg.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    secrets = [ADMIN_PASSWORD, PASSWORD, "wrong-password-123", "new-password-456"]
    try:
        with bare.client() as anon:
            r = anon.post("/auth/session", json={"name": "sam", "password": PASSWORD})
            secrets += [r.headers["set-cookie"].split(";")[0].split("=", 1)[1],
                        r.json()["csrf_token"]]
            token = anon.post("/auth/token", json={"name": "sam", "password": PASSWORD}
                              ).json()["token"]
            secrets.append(token)
            is_problem(anon.post("/auth/token", json={"name": "sam",
                                                      "password": "wrong-password-123"}), 401)
        with bare.client(token) as c:
            made = c.post("/tokens", json={"name": "more"}).json()["token"]
            secrets.append(made)
            with bare.client(made) as m:
                assert m.get("/auth/me").status_code == 200
            c.patch("/users/sam", json={"password": "new-password-456",
                                        "current_password": PASSWORD}).raise_for_status()
            image = small_qcow2(tmp_path, "s.qcow2", "1M").read_bytes()
            finish(c, c.post("/images", params={"name": "sam-image"}, content=image))
        with bare.admin() as admin:
            admin.post("/users", json={"name": "sue", "password": PASSWORD,
                                       "role": "viewer"}).raise_for_status()
            audit = admin.get("/audit", params={"limit": 500}).text
    finally:
        for lg, level in zip(server_loggers, levels, strict=True):
            lg.removeHandler(caplog.handler)
            lg.setLevel(level)

    store = Store(bare.settings.db_url)
    try:
        rows = [repr(a) for a in store.list_audit(limit=10_000)]
    finally:
        store.close()
    out, err = capfd.readouterr()
    # The test's own HTTP client (httpx, httpcore) logs what it received; not the server.
    server_side = [caplog.handler.format(rec) for rec in caplog.records
                   if not rec.name.startswith(("httpx", "httpcore"))]
    assert any(rec.name.startswith("uvicorn") for rec in caplog.records)
    everything = "\n".join([*server_side, audit, *rows, out, err])
    for secret in secrets:
        assert secret not in everything
        if secret.startswith("corral_"):  # its secret part alone, which may hold "_" too
            token_secret = secret.removeprefix("corral_").partition("_")[2]
            assert token_secret not in everything


def test_login_throttle() -> None:
    with running_server() as fresh, fresh.client() as anon:  # no failures counted yet
        for _ in range(5):
            is_problem(anon.post("/auth/token", json={"name": "admin",
                                                      "password": "not-the-password"}), 401)
        r = anon.post("/auth/token", json={"name": "admin", "password": "not-the-password"})
        is_problem(r, 429)
        assert 0 < int(r.headers["Retry-After"]) <= 60
        right = anon.post("/auth/token", json={"name": "admin", "password": ADMIN_PASSWORD})
        is_problem(right, 429)  # throttled: even the right password is refused
        is_problem(anon.post("/auth/session", json={"name": "admin",
                                                    "password": ADMIN_PASSWORD}), 429)
