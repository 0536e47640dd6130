"""Jobs, events and the audit log; jobs and events also stream (Server-Sent Events)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from corral.api.deps import Caller, ServicesDep
from corral.api.problems import documented
from corral.api.schemas import MAX_ID, AuditOut, EventOut, JobOut, Page
from corral.errors import NotFound
from corral.model import Job, JobState
from corral.ops.accounts import Principal
from corral.ops.context import Context

router = APIRouter(tags=["jobs"], responses=documented(401, 403, 404, 422))
_SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "A stream of Server-Sent Events"}
}
_POLL = 0.25
JobId = Annotated[int, Path(ge=1, le=MAX_ID)]


def _visible_job(ctx: Context, caller: Principal, job_id: int) -> Job:
    try:
        job = ctx.store.get_job(job_id)
    except NotFound:
        job = None
    if job is None or not caller.can_read(job.project):
        raise NotFound("job", str(job_id), called="with id")
    return job


@router.get("/jobs", summary="Jobs, newest first")
def list_jobs(
    caller: Caller,
    svc: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Last id seen.")] = None,
    state: JobState | None = None,
    target: Annotated[str | None, Query(max_length=255)] = None,
) -> Page[JobOut]:
    jobs = svc.ctx.store.list_jobs(state, limit, projects=_job_scope(caller), target=target,
                                   before=before)
    more = len(jobs) == limit
    return Page(items=[JobOut.of(j) for j in jobs], next=str(jobs[-1].id) if more else None)


def _job_scope(caller: Principal) -> list[str] | None:
    return None if caller.projects is None else list(caller.projects)


@router.get("/jobs/{job_id}", summary="One job with its steps and progress")
def get_job(job_id: JobId, caller: Caller, svc: ServicesDep) -> JobOut:
    return JobOut.of(_visible_job(svc.ctx, caller, job_id))


@router.get("/jobs/{job_id}/stream", summary="Follow a job until it ends (SSE)",
            response_class=StreamingResponse, responses=_SSE)
def stream_job(job_id: JobId, caller: Caller, svc: ServicesDep) -> StreamingResponse:
    ctx = svc.ctx
    _visible_job(ctx, caller, job_id)

    async def events() -> AsyncIterator[str]:
        last = ""
        while True:
            job = await anyio.to_thread.run_sync(ctx.store.get_job, job_id)
            data = JobOut.of(job).model_dump_json()
            if data != last:
                yield f"event: job\ndata: {data}\n\n"
                last = data
            if job.state not in (JobState.PENDING, JobState.RUNNING):
                return
            await anyio.sleep(_POLL)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.get("/events", summary="Events, newest first (or oldest first after an id)")
def list_events(
    caller: Caller,
    svc: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    target: Annotated[str | None, Query(max_length=255)] = None,
) -> Page[EventOut]:
    events = svc.ctx.store.list_events(projects=_job_scope(caller), target=target, after=after,
                                       before=before, limit=limit)
    more = len(events) == limit
    return Page(items=[EventOut.of(e) for e in events],
                next=str(events[-1].id) if more else None)


@router.get("/events/stream", summary="Follow new events (SSE)",
            response_class=StreamingResponse, responses=_SSE)
def stream_events(
    caller: Caller,
    svc: ServicesDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="Default: the newest event.")
    ] = None,
    seconds: Annotated[float, Query(gt=0, le=3600, description="How long to follow.")] = 300,
) -> StreamingResponse:
    ctx = svc.ctx
    scope = _job_scope(caller)
    if after is None:
        newest = ctx.store.list_events(projects=scope, limit=1)
        after = newest[0].id if newest else 0

    async def events() -> AsyncIterator[str]:
        last = after
        with anyio.move_on_after(seconds):
            while True:
                found = await anyio.to_thread.run_sync(
                    partial(ctx.store.list_events, projects=scope, after=last, limit=100)
                )
                for e in found:
                    data = EventOut.of(e).model_dump_json()
                    yield f"id: {e.id}\nevent: {e.kind}\ndata: {data}\n\n"
                    last = e.id
                await anyio.sleep(_POLL * 2)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.get("/audit", summary="The audit log of every change (admins)")
def list_audit(
    caller: Caller,
    svc: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    actor: Annotated[str | None, Query(max_length=63)] = None,
) -> Page[AuditOut]:
    caller.require_admin()
    entries = svc.ctx.store.list_audit(limit=limit, before=before, actor=actor)
    more = len(entries) == limit
    return Page(items=[AuditOut.of(a) for a in entries],
                next=str(entries[-1].id) if more else None)
