"""The audit log: every call that may change something, with who, what, when, result.

A plain ASGI middleware, so that reads pay nothing for it. Bodies and query strings
are never recorded: passwords and tokens travel there.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})


class AuditMiddleware:
    def __init__(self, app: ASGIApp, record: Callable[[str, str, str, int], None]) -> None:
        self.app = app
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in READ_ONLY:
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "(no route)"
            actor = scope.get("state", {}).get("actor", "anonymous")
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    self.record, actor, f"{scope['method']} {template}", scope["path"], status
                )
