"""The REST API: one FastAPI app over the same ``ops`` functions the CLI calls."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from corral import __version__
from corral.api import problems
from corral.api.audit import AuditMiddleware
from corral.api.routers import (
    accounts,
    auth,
    console,
    hosts,
    images,
    jobs,
    machines,
    placement,
)
from corral.api.services import HealthChecker, JobWorker, LoginThrottle, PowerSweeper, Services
from corral.config import Settings
from corral.ops.context import Context
from corral.ops.hosts import local_host

log = logging.getLogger(__name__)

DESCRIPTION = """\
Corral's REST API. Authenticate with `Authorization: Bearer <token>` (from
`POST /auth/token` or `corral login`), or with the console's session cookie plus the
`X-CSRF-Token` header on changes. Long operations answer **202** with jobs; follow one
at `/jobs/{id}` or stream it from `/jobs/{id}/stream`. Errors are RFC 9457 problem
documents.
"""


def create_app(settings: Settings, *, throttle: LoginThrottle | None = None) -> FastAPI:
    """The API app. The context opens (and recovers interrupted jobs) at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = Context(settings)
        try:
            _, message = local_host(ctx)
            if message:
                log.warning("%s", message)
            for part in (settings.state_dir / "uploads").glob("*.part"):
                part.unlink(missing_ok=True)  # uploads cut off when a server stopped
            sweeper = PowerSweeper(ctx, settings.sweep_interval)
            health = HealthChecker(ctx, settings.health_interval)
            worker = JobWorker()
            app.state.services = Services(ctx, worker, sweeper, throttle or LoginThrottle(),
                                          health=health)
            sweeper.start()
            health.start()
            try:
                yield
            finally:
                # In threads: waiting for running jobs must not freeze the event loop.
                await anyio.to_thread.run_sync(worker.shutdown)
                await anyio.to_thread.run_sync(health.stop)
                await anyio.to_thread.run_sync(sweeper.stop)
        finally:
            ctx.close()

    app = FastAPI(
        title="Corral",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=problems.documented(500),
    )
    problems.install(app)
    for router in (
        auth.router,
        hosts.router,
        hosts.pools,
        placement.router,
        images.router,
        machines.router,
        jobs.router,
        accounts.users,
        accounts.projects,
        accounts.tokens,
        console.router,
    ):
        app.include_router(router)
    app.add_middleware(AuditMiddleware, record=lambda *a: _record(app, *a))
    return app


def _record(app: FastAPI, actor: str, action: str, target: str, status: int) -> None:
    services: Services | None = getattr(app.state, "services", None)
    if services is not None:
        services.ctx.store.add_audit(actor, action, target, status)
