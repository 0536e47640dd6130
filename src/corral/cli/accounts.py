"""corral user|project|token …: accounts, run on the server's own host against its store."""

from __future__ import annotations

import getpass
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from corral.cli.backend import OPTIONS, is_remote, local_only
from corral.cli.common import OutputOpt, context
from corral.cli.remote import Client, connect, iso
from corral.cli.render import Output, details_table, emit, err, out
from corral.errors import InvalidInput
from corral.model import Project, Quota, Role, Token, Usage, User
from corral.model.units import format_size, parse_size
from corral.ops import accounts
from corral.store import Store

users = typer.Typer(help="Users and their roles (run on the server's host).",
                    no_args_is_help=True)
projects = typer.Typer(help="Projects: who owns machines and images, with quotas.",
                       no_args_is_help=True)
tokens = typer.Typer(help="API tokens for scripts and the CLI (also on a server: your own).",
                     no_args_is_help=True)

PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="read the password from standard input")
]


@contextmanager
def _store(what: str) -> Iterator[Store]:
    local_only(what)
    with context(enroll=False) as ctx:
        yield ctx.store


# -- passwords -------------------------------------------------------------------------


def read_password(from_stdin: bool, *, confirm: bool, prompt: str = "Password") -> str:
    """Twice at a terminal (without echo); else one line from standard input."""
    if from_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise InvalidInput("No password on standard input.")
        return password
    try:
        password = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{prompt} (again): ") != password:
            raise InvalidInput("The two passwords differ; nothing was changed.")
    except (EOFError, KeyboardInterrupt):
        err.print()
        raise typer.Exit(130) from None
    return password


# -- durations and quotas --------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text)
    if match is None:
        raise InvalidInput(f"'{text}' is not a duration.",
                           hint="Write a number with s, m, h, d or w, e.g. 30d.")
    value = int(match.group(1)) * _SECONDS[match.group(2).lower()]
    if value <= 0:
        raise InvalidInput("A token's lifetime must be positive.")
    return timedelta(seconds=value)


def _count(text: str | None, what: str) -> int | None:
    if text is None or text.lower() in ("none", "unlimited"):
        return None
    if not text.isdigit():
        raise InvalidInput(f"'{text}' is not a valid {what}; write a whole number or 'none'.")
    return int(text)


def _size(text: str | None, what: str) -> int | None:
    if text is None or text.lower() in ("none", "unlimited"):
        return None
    return parse_size(text, what=what)


MaxMachines = Annotated[str | None, typer.Option(help="most machines at once ('none': no limit)")]
MaxCpus = Annotated[str | None, typer.Option(help="most vCPUs in all ('none': no limit)")]
MaxMemory = Annotated[str | None, typer.Option(help="most memory in all, e.g. 8G")]
MaxDisk = Annotated[str | None, typer.Option(help="most virtual disk in all, e.g. 100G")]


# -- how accounts look -----------------------------------------------------------------


def user_dict(u: User) -> dict[str, Any]:
    return {"name": u.name, "role": u.role.value, "projects": list(u.projects),
            "created_at": u.created_at.isoformat()}


def project_dict(p: Project, used: Usage) -> dict[str, Any]:
    q = p.quota
    return {
        "name": p.name,
        "quota": {"machines": q.machines, "cpus": q.cpus, "memory_bytes": q.memory_bytes,
                  "disk_bytes": q.disk_bytes},
        "usage": {"machines": used.machines, "cpus": used.cpus,
                  "memory_bytes": used.memory_bytes, "disk_bytes": used.disk_bytes},
        "created_at": p.created_at.isoformat(),
    }


def token_dict(t: Token) -> dict[str, Any]:
    return {
        "id": t.id,
        "user": t.user,
        "name": t.name,
        "created_at": t.created_at.isoformat(),
        "expires_at": t.expires_at.isoformat() if t.expires_at else None,
        "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
    }


def _limit(value: int | None, key: str) -> str:
    if value is None:
        return "unlimited"
    return format_size(value) if key.endswith("_bytes") else str(value)


def quota_table(d: dict[str, Any]) -> Table:
    t = Table("RESOURCE", "USED", "QUOTA", "FREE", box=None,
              title=f"project {d['name']}", title_justify="left")
    for key, label in (("machines", "machines"), ("cpus", "vCPUs"),
                       ("memory_bytes", "memory"), ("disk_bytes", "disk")):
        used, limit = d["usage"][key], d["quota"][key]
        free = "-" if limit is None else _limit(max(limit - used, 0), key)
        style = "red" if limit is not None and used > limit else ""
        t.add_row(label, f"[{style}]{_limit(used, key)}[/]" if style else _limit(used, key),
                  _limit(limit, key), free)
    return t


def _when(iso: str | None) -> str:
    return "-" if iso is None else iso[:19].replace("T", " ")


# -- users -----------------------------------------------------------------------------


@users.command("add")
def add_user(
    name: str,
    role: Annotated[Role, typer.Option(help="admin, operator or viewer")],
    project: Annotated[
        list[str] | None, typer.Option(help="project the user works in (repeatable)")
    ] = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Add a user; the password is prompted for twice, or read from standard input."""
    with _store("user add") as store:
        password = read_password(password_stdin, confirm=True)
        user = accounts.create_user(store, name, password, role, project or [])
    where = f" in {', '.join(user.projects)}" if user.projects else ""
    out.print(f"Created user [bold]{user.name}[/] ({user.role.value}{where}).")


@users.command("list")
def list_users(output: OutputOpt = Output.TABLE) -> None:
    """List users with their roles and projects."""
    with _store("user list") as store:
        rows = [user_dict(u) for u in store.list_users()]
    t = Table("NAME", "ROLE", "PROJECTS", "CREATED", box=None)
    for r in rows:
        t.add_row(r["name"], r["role"], ", ".join(r["projects"]) or "-", _when(r["created_at"]))
    emit(rows, output, t)


@users.command("show")
def show_user(name: str, output: OutputOpt = Output.TABLE) -> None:
    """Show a user and how many live API tokens it has."""
    with _store("user show") as store:
        d = user_dict(store.get_user(name))
        d["tokens"] = sum(1 for t in store.list_tokens(name) if t.revoked_at is None)
    shown = {**d, "projects": ", ".join(d["projects"]) or "-"}
    emit(d, output, details_table(shown))


@users.command("delete")
def delete_user(name: str) -> None:
    """Delete a user and its tokens; the last admin stays."""
    with _store("user delete") as store:
        user = store.get_user(name)
        admins = [u for u in store.list_users() if u.role is Role.ADMIN]
        if user.role is Role.ADMIN and len(admins) == 1:
            raise InvalidInput(f"'{name}' is the last admin; add another admin first.")
        store.delete_user(name)
    out.print(f"Deleted user [bold]{name}[/].")


@users.command("passwd")
def passwd(name: str, password_stdin: PasswordStdin = False) -> None:
    """Set a user's password (prompted for twice, or read from standard input)."""
    with _store("user passwd") as store:
        store.get_user(name)  # say "no such user" before asking for a password
        password = read_password(password_stdin, confirm=True, prompt=f"New password for {name}")
        accounts.set_password(store, name, password)
    out.print(f"Changed the password of [bold]{name}[/].")


# -- projects --------------------------------------------------------------------------


@projects.command("add")
def add_project(
    name: str,
    max_machines: MaxMachines = None,
    max_cpus: MaxCpus = None,
    max_memory: MaxMemory = None,
    max_disk: MaxDisk = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Add a project, with optional quotas (no option: no limit)."""
    quota = Quota(
        machines=_count(max_machines, "machine count"),
        cpus=_count(max_cpus, "vCPU count"),
        memory_bytes=_size(max_memory, "memory quota"),
        disk_bytes=_size(max_disk, "disk quota"),
    )
    with _store("project add") as store:
        project = accounts.create_project(store, name, quota)
        d = project_dict(project, store.project_usage(name))
    if output is Output.TABLE:
        out.print(f"Created project [bold]{name}[/].")
    emit(d, output, quota_table(d))


@projects.command("list")
def list_projects(output: OutputOpt = Output.TABLE) -> None:
    """List projects with what each uses of its quota."""
    with _store("project list") as store:
        rows = [project_dict(p, store.project_usage(p.name)) for p in store.list_projects()]
    t = Table("NAME", "MACHINES", "VCPUS", "MEMORY", "DISK", box=None)
    for r in rows:
        u, q = r["usage"], r["quota"]
        t.add_row(r["name"], *(f"{_limit(u[k], k)} / {_limit(q[k], k)}"
                               for k in ("machines", "cpus", "memory_bytes", "disk_bytes")))
    emit(rows, output, t)


@projects.command("show")
def show_project(name: str, output: OutputOpt = Output.TABLE) -> None:
    """Show a project's usage against its quota."""
    with _store("project show") as store:
        d = project_dict(store.get_project(name), store.project_usage(name))
    emit(d, output, quota_table(d))


@projects.command("quota")
def set_quota(
    name: str,
    max_machines: MaxMachines = None,
    max_cpus: MaxCpus = None,
    max_memory: MaxMemory = None,
    max_disk: MaxDisk = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Change the limits given ('none' lifts one); the others stay as they are."""
    with _store("project quota") as store:
        q = store.get_project(name).quota
        quota = Quota(
            machines=q.machines if max_machines is None else _count(max_machines, "count"),
            cpus=q.cpus if max_cpus is None else _count(max_cpus, "vCPU count"),
            memory_bytes=(q.memory_bytes if max_memory is None
                          else _size(max_memory, "memory quota")),
            disk_bytes=q.disk_bytes if max_disk is None else _size(max_disk, "disk quota"),
        )
        d = project_dict(accounts.set_quota(store, name, quota), store.project_usage(name))
    emit(d, output, quota_table(d))


@projects.command("delete")
def delete_project(name: str) -> None:
    """Delete a project that owns no machines and no images."""
    with _store("project delete") as store:
        store.delete_project(name)
    out.print(f"Deleted project [bold]{name}[/].")


# -- tokens ----------------------------------------------------------------------------


@tokens.command("create")
def create_token(
    name: Annotated[str, typer.Option(help="a label for the token")] = "api",
    expires: Annotated[
        str | None, typer.Option(help="lifetime, e.g. 30d or 12h (default: never)")
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="whose token (local only; default admin)")
    ] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Create an API token; its secret goes to standard output, shown only now."""
    lifetime = parse_duration(expires) if expires else None
    if is_remote():
        if user is not None:
            raise InvalidInput("On a server a token is always the logged-in user's; "
                               "drop --user.")
        with _server() as api:
            body = {"name": name, "expires_in": None if lifetime is None
                    else int(lifetime.total_seconds())}
            d = _token_row(api.post("/tokens", body))
            secret = str(d.pop("token"))
    else:
        user = user or "admin"
        with _store("token create") as store:
            store.get_user(user)
            issued = accounts.issue_token(store, user, name, expires_in=lifetime)
        d, secret = token_dict(issued.token), issued.secret
    if output is Output.JSON:
        emit({**d, "token": secret}, output, Table())
        return
    until = d["expires_at"]
    err.print(f"Created token [bold]{d['id']}[/] ({name}) for {d['user']}, "
              + (f"valid until {_when(until)} UTC" if until else "never expiring")
              + "; the secret below is shown only now.", highlight=False)
    print(secret)


@tokens.command("list")
def list_tokens(
    user: Annotated[str | None, typer.Option(help="only this user's tokens")] = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """List API tokens (not browser sessions)."""
    if is_remote():
        with _server() as api:
            rows = [_token_row(t) for t in api.get("/tokens")
                    if user is None or t["user"] == user]
    else:
        with _store("token list") as store:
            rows = [token_dict(t) for t in store.list_tokens(user)]
    t = Table("ID", "USER", "NAME", "CREATED", "EXPIRES", "REVOKED", box=None)
    for r in rows:
        t.add_row(r["id"], r["user"], r["name"], _when(r["created_at"]),
                  _when(r["expires_at"]) if r["expires_at"] else "never",
                  _when(r["revoked_at"]))
    emit(rows, output, t)


@tokens.command("revoke")
def revoke_token(token_id: str) -> None:
    """Revoke a token at once."""
    if is_remote():
        with _server() as api:
            api.delete(f"/tokens/{token_id}")
    else:
        with _store("token revoke") as store:
            store.revoke_token(token_id)
    out.print(f"Revoked token [bold]{token_id}[/].")


@contextmanager
def _server() -> Iterator[Client]:
    client = connect(OPTIONS.server)
    try:
        yield client
    finally:
        client.close()


def _token_row(t: dict[str, Any]) -> dict[str, Any]:
    """A token from the API, with times written as a local one's are."""
    row = {k: t[k] for k in ("id", "user", "name")}
    row.update({k: iso(t[k]) for k in ("created_at", "expires_at", "revoked_at")})
    if "token" in t:
        row["token"] = t["token"]
    return row
