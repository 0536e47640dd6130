"""corral user|project|token against the local store, through the real command."""

from __future__ import annotations

import json
import os
import subprocess

from corral.ops import accounts
from tests.integration.conftest import CORRAL, CorralEnv

PASSWORD = "a-password-long-enough"


def run(env: CorralEnv, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([CORRAL, *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **env.env}, timeout=120, check=False)


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error as the user sees it: exactly one line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_users_from_add_to_delete(cli_env: CorralEnv) -> None:
    env = cli_env
    assert run(env, "project", "add", "web").returncode == 0
    added = run(env, "user", "add", "root-admin", "--role", "admin", "--password-stdin",
                stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    # Not a terminal: the password comes from standard input even without the flag.
    added = run(env, "user", "add", "bob", "--role", "operator", "--project", "web",
                stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert "bob" in added.stdout

    listed = {u["name"]: u for u in env.json("user", "list")}
    assert set(listed) == {"root-admin", "bob"}
    assert listed["bob"]["role"] == "operator"
    assert listed["bob"]["projects"] == ["web"]
    assert set(listed["bob"]) == {"name", "role", "projects", "created_at"}
    assert env.json("user", "show", "bob")["tokens"] == 0

    with env.context() as ctx:
        assert accounts.authenticate(ctx.store, "bob", PASSWORD).name == "bob"

    assert run(env, "user", "delete", "bob").returncode == 0
    assert [u["name"] for u in env.json("user", "list")] == ["root-admin"]
    gone = run(env, "user", "show", "bob")
    assert gone.returncode == 3
    assert one_error(gone) == "error: No user named 'bob'."
    last = run(env, "user", "delete", "root-admin")
    assert last.returncode == 2
    assert "last admin" in one_error(last)


def test_refusals_say_one_sentence(cli_env: CorralEnv) -> None:
    env = cli_env
    short = run(env, "user", "add", "amy", "--role", "viewer", stdin="short\n")
    assert short.returncode == 2
    assert "at least 10 characters" in one_error(short)
    empty = run(env, "user", "add", "amy", "--role", "viewer", stdin="")
    assert empty.returncode == 2
    # An admin sees every project; a viewer cannot join a project that does not exist.
    admin_in_project = run(env, "user", "add", "amy", "--role", "admin", "--project",
                           "default", stdin=PASSWORD + "\n")
    assert admin_in_project.returncode == 2
    one_error(admin_in_project)
    # A password is never an argument.
    plain = run(env, "user", "add", "amy", "--role", "viewer", "--password", PASSWORD)
    assert plain.returncode == 2
    assert env.json("user", "list") == []


def test_passwd_changes_what_logs_in(cli_env: CorralEnv) -> None:
    """'corral serve' tells the operator to run 'corral user passwd admin': it works."""
    env = cli_env
    with env.context() as ctx:
        generated = accounts.ensure_first_admin(ctx.store, None)
    assert generated is not None
    new = "the-new-admin-password"
    changed = run(env, "user", "passwd", "admin", "--password-stdin", stdin=new + "\n")
    assert changed.returncode == 0, changed.stderr
    with env.context() as ctx:
        accounts.authenticate(ctx.store, "admin", new)
    missing = run(env, "user", "passwd", "nobody", stdin=new + "\n")
    assert missing.returncode == 3
    one_error(missing)


def test_projects_show_usage_against_quota(cli_env: CorralEnv) -> None:
    env = cli_env
    added = run(env, "project", "add", "team", "--max-machines", "3", "--max-cpus", "8",
                "--max-memory", "8G", "--max-disk", "100G", "-o", "json")
    assert added.returncode == 0, added.stderr
    shown = env.json("project", "show", "team")
    assert shown["quota"] == {"machines": 3, "cpus": 8, "memory_bytes": 8 << 30,
                              "disk_bytes": 100 << 30}
    assert shown["usage"] == {"machines": 0, "cpus": 0, "memory_bytes": 0, "disk_bytes": 0}
    table = run(env, "project", "show", "team").stdout
    assert "8.0 GiB" in table and "100.0 GiB" in table

    changed = json.loads(run(env, "project", "quota", "team", "--max-cpus", "16",
                             "--max-disk", "none", "-o", "json").stdout)
    assert changed["quota"] == {"machines": 3, "cpus": 16, "memory_bytes": 8 << 30,
                                "disk_bytes": None}
    assert [p["name"] for p in env.json("project", "list")] == ["default", "team"]

    bad = run(env, "project", "add", "other", "--max-memory", "lots")
    assert bad.returncode == 2
    assert "not a valid memory quota" in one_error(bad)
    twice = run(env, "project", "add", "team")
    assert twice.returncode == 4
    one_error(twice)

    assert run(env, "project", "delete", "team").returncode == 0
    assert [p["name"] for p in env.json("project", "list")] == ["default"]


def test_tokens_create_list_revoke(cli_env: CorralEnv) -> None:
    env = cli_env
    with env.context() as ctx:
        accounts.ensure_first_admin(ctx.store, PASSWORD)
    created = run(env, "token", "create", "--name", "ci", "--expires", "30d")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("corral_")
    assert "shown only now" in created.stderr
    with env.context() as ctx:
        principal, _ = accounts.resolve_token(ctx.store, secret)
    assert principal.name == "admin"
    token_id = principal.token.id

    as_json = json.loads(run(env, "token", "create", "--name", "other", "-o", "json").stdout)
    assert as_json["token"].startswith("corral_") and as_json["expires_at"] is None

    listed = {t["id"]: t for t in env.json("token", "list")}
    assert set(listed) == {token_id, as_json["id"]}
    assert listed[token_id]["name"] == "ci"
    assert listed[token_id]["expires_at"] is not None
    assert listed[token_id]["revoked_at"] is None

    assert run(env, "token", "revoke", token_id).returncode == 0
    assert {t["id"]: t for t in env.json("token", "list")}[token_id]["revoked_at"] is not None
    unknown = run(env, "token", "revoke", "feedfacefeedface")
    assert unknown.returncode == 3
    one_error(unknown)
    bad = run(env, "token", "create", "--expires", "soon")
    assert bad.returncode == 2
    one_error(bad)


def test_unreachable_server_is_one_sentence(cli_env: CorralEnv) -> None:
    result = run(cli_env, "--server", "http://127.0.0.1:9", "vm", "list")
    assert result.returncode == 7
    assert "Cannot reach the Corral server at http://127.0.0.1:9" in one_error(result)
    local = run(cli_env, "--server", "http://127.0.0.1:9", "user", "list")
    assert local.returncode == 2
    assert "--local" in one_error(local)
