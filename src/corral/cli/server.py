"""``corral serve``: the REST API and web console on one address."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from corral.cli.render import err
from corral.config import load_settings
from corral.ops import accounts
from corral.ops.context import Context
from corral.ops.hosts import local_host


def serve(
    address: Annotated[
        str | None, typer.Option("--address", help="Default: listen_address (127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Default: listen_port (8080).")] = None,
) -> None:
    """Run the REST API and the web console until Ctrl-C; machines keep running after."""
    import uvicorn

    from corral.web.server import build_app

    overrides = {k: v for k, v in (("listen_address", address), ("listen_port", port)) if v}
    settings = load_settings(**overrides)
    with Context(settings) as ctx:
        _, message = local_host(ctx)
        if message:
            err.print(f"[cyan]{message}[/]")
        password = accounts.ensure_first_admin(ctx.store, settings.admin_password)
    if password is not None:
        err.print(
            f"[bold]Created user 'admin' with password [green]{password}[/green][/bold] "
            "(shown only now; change it with 'corral user passwd admin')."
        )
    url = f"http://{settings.listen_address}:{settings.listen_port}"
    err.print(f"Corral is serving {url} (API docs at {url}/docs); Ctrl-C stops it.")
    logging.getLogger("corral").setLevel(logging.INFO)
    uvicorn.run(
        build_app(settings),
        host=settings.listen_address,
        port=settings.listen_port,
        log_level="warning",
        access_log=False,
    )
