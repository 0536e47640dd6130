"""What every command shares: opening the context and saying things once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from corral.cli.render import Output, err
from corral.config import load_settings
from corral.ops.context import Context
from corral.ops.hosts import local_host

OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for scripts")
]


@contextmanager
def context(*, enroll: bool = True) -> Iterator[Context]:
    with Context(load_settings()) as ctx:
        for job in ctx.recovered:
            err.print(
                f"[yellow]Recovered interrupted {job.kind} job for '{job.target}': "
                f"{job.state.value}.[/]"
            )
        if enroll:
            _, message = local_host(ctx)
            if message:
                err.print(f"[cyan]{message}[/]")
        yield ctx
