"""``corral login`` and ``corral logout``: a bearer token for a server, saved 0600."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from corral.cli import backend, credentials
from corral.cli.accounts import PasswordStdin, read_password
from corral.cli.remote import Client
from corral.cli.render import err, out
from corral.errors import CorralError, InvalidInput, Unauthenticated


def login(
    server: Annotated[
        str | None, typer.Option("--server", help="server URL, e.g. http://corral:8080")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="user name")] = None,
    password_stdin: PasswordStdin = False,
    token_name: Annotated[
        str, typer.Option(help="label of the token on the server")
    ] = "cli",  # noqa: S107  (a label, not a secret)
) -> None:
    """Log in to a Corral server; later commands then run there."""
    saved = credentials.load()
    url = server or backend.OPTIONS.server or (saved.server if saved else None)
    if url is None:
        raise InvalidInput("Which server? Pass --server URL (or set CORRAL_SERVER).")
    url = credentials.normalize(url)
    if user is None:
        if password_stdin or not sys.stdin.isatty():
            raise InvalidInput("Pass --user NAME when the password comes from standard input.")
        user = typer.prompt("User")
    password = read_password(password_stdin, confirm=False)
    client = Client(url, None)
    try:
        issued = client.post("/auth/token",
                             {"name": user, "password": password, "token_name": token_name})
    finally:
        client.close()
    if saved is not None:
        _revoke(saved, quiet=True)  # one saved login at a time; do not leave the old live
    path = credentials.save(credentials.Credentials(
        server=url, token=issued["token"], token_id=issued["id"], user=issued["user"]
    ))
    out.print(f"Logged in to {url} as [bold]{issued['user']}[/]; token saved in {path}.",
              highlight=False)


def logout() -> None:
    """Revoke the saved token on its server and forget it."""
    saved = credentials.load()
    if saved is None:
        err.print("Not logged in; nothing to do.")
        return
    _revoke(saved, quiet=False)
    credentials.remove()
    out.print(f"Logged out of {saved.server}.", highlight=False)


def _revoke(saved: credentials.Credentials, *, quiet: bool) -> None:
    client = Client(saved.server, saved.token)
    try:
        client.delete(f"/tokens/{saved.token_id}")
    except Unauthenticated:
        pass  # already revoked or expired: nothing left to undo
    except CorralError as exc:
        if not quiet:
            err.print(f"[yellow]warning:[/] could not revoke token {saved.token_id} ({exc}); "
                      "revoke it on the server with 'corral token revoke "
                      f"{saved.token_id}'.", highlight=False, soft_wrap=True)
    finally:
        client.close()
