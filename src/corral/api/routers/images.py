"""Images: list, streamed upload (vetted like any import), capture of a stopped machine
(sealed, then imported like any upload), delete.

Shared images (project null) are visible to everyone and changed by admins only. A
captured image belongs to its machine's project.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request
from pydantic import Field
from starlette.status import HTTP_204_NO_CONTENT

from corral.api.deps import Caller, ServicesDep
from corral.api.problems import documented, linked
from corral.api.schemas import Accepted, ImageOut, JobOut, Name, Strict
from corral.errors import CorralError, InvalidInput, NotFound
from corral.model import Image, ImageFormat, Job
from corral.ops import capture as capture_ops
from corral.ops import images as image_ops
from corral.ops.accounts import Principal
from corral.ops.context import Context
from corral.ops.jobs import execute_job

router = APIRouter(
    prefix="/images", tags=["images"], responses=documented(400, 401, 403, 404, 422)
)


class PayloadTooLarge(CorralError):
    http_status = 413


def _visible(ctx: Context, caller: Principal, name: str) -> Image:
    image = ctx.store.find_image(name)
    if image is None or (image.project is not None and not caller.can_read(image.project)):
        raise NotFound("image", name)
    return image


@router.get("", summary="Images the caller can use: shared ones and its projects'")
def list_images(caller: Caller, svc: ServicesDep) -> list[ImageOut]:
    return [ImageOut.of(i) for i in svc.ctx.store.list_images(caller.projects)]


@router.get("/{name}", summary="One image")
def get_image(name: Name, caller: Caller, svc: ServicesDep) -> ImageOut:
    return ImageOut.of(_visible(svc.ctx, caller, name))


@router.post(
    "",
    status_code=202,
    summary="Upload a disk image (the request body, streamed); answers with its import job",
    responses={
        **linked(202, "Accepted: follow the import job",
                 GetJob=("get", "/jobs/{job_id}", {"job_id": "$response.body#/jobs/0/id"}),
                 GetImage=("get", "/images/{name}", {"name": "$response.body#/jobs/0/target"}),
                 DeleteImage=("delete", "/images/{name}",
                              {"name": "$response.body#/jobs/0/target"})),
        **documented(409, 413, 507),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}}},
        }
    },
)
async def upload_image(
    request: Request,
    caller: Caller,
    svc: ServicesDep,
    name: Name,
    format: Annotated[ImageFormat | None, Query(description="Declared format.")] = None,
    project: Annotated[Name | None, Query(description="null: shared (admins only).")] = None,
) -> Accepted:
    ctx = svc.ctx
    if project is None and not caller.is_admin:
        project = caller.home_project()
    if project is not None and not caller.can_read(project):
        raise NotFound("project", project)
    caller.require_manage(project)
    if project is not None:
        await anyio.to_thread.run_sync(ctx.store.get_project, project)  # NotFound if none
    limit = ctx.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The upload is larger than the {limit} bytes this server takes.")
    staging = await anyio.to_thread.run_sync(_staging_file, ctx)
    try:
        await _receive(request, staging, limit)
        job = await anyio.to_thread.run_sync(
            lambda: image_ops.prepare_import(
                ctx, staging, name=name, declared=format, project=project
            )
        )
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    svc.worker.submit(f"importing {name}", _import_then_discard, ctx, job, staging)
    return Accepted(jobs=[JobOut.of(job)])


class ImageCapture(Strict):
    machine: Name = Field(description="A stopped machine of a project the caller manages.")
    name: Name = Field(description="The new image's name.")
    seal: bool = Field(
        default=True,
        description="Remove the machine's identity (machine-id, SSH host keys, cloud-init "
        "state, leases) from the copy first, so clones do not share it.",
    )


@router.post(
    "/capture",
    status_code=202,
    summary="Capture a stopped machine as an image (sealed unless seal is false)",
    responses={
        **linked(202, "Accepted: follow the capture job",
                 GetJob=("get", "/jobs/{job_id}", {"job_id": "$response.body#/jobs/0/id"}),
                 GetImage=("get", "/images/{name}", {"name": "$response.body#/jobs/0/target"}),
                 DeleteImage=("delete", "/images/{name}",
                              {"name": "$response.body#/jobs/0/target"})),
        **documented(409, 507),
    },
)
def capture_image(body: ImageCapture, caller: Caller, svc: ServicesDep) -> Accepted:
    """The machine is not changed; the image goes to the machine's project. What sealing
    removed is recorded as an ``image.sealed`` event on the image."""
    ctx = svc.ctx
    machine = ctx.store.find_machine(body.machine)
    if machine is None or not caller.can_read(machine.project):
        raise NotFound("machine", body.machine)
    caller.require_manage(machine.project)
    job = capture_ops.prepare_capture(ctx, machine.name, body.name, seal=body.seal,
                                      project=machine.project)
    svc.worker.submit(f"capturing {machine.name}", execute_job, ctx, job)
    return Accepted(jobs=[JobOut.of(job)])


async def _receive(request: Request, staging: Path, limit: int) -> None:
    received = 0
    with staging.open("wb") as out:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(
                    f"The upload is larger than the {limit} bytes this server takes."
                )
            out.write(chunk)
    if received == 0:
        raise InvalidInput("The upload is empty; send the image as the request body.")


def _staging_file(ctx: Context) -> Path:
    uploads = ctx.settings.state_dir / "uploads"
    uploads.mkdir(mode=0o700, exist_ok=True)
    return uploads / f"{os.urandom(8).hex()}.part"


def _import_then_discard(ctx: Context, job: Job, staging: Path) -> None:
    try:
        execute_job(ctx, job)
    finally:
        staging.unlink(missing_ok=True)


@router.delete("/{name}", status_code=HTTP_204_NO_CONTENT, summary="Delete an unused image",
               responses=documented(409))
def delete_image(name: Name, caller: Caller, svc: ServicesDep) -> None:
    image = _visible(svc.ctx, caller, name)
    caller.require_manage(image.project)
    image_ops.delete_image(svc.ctx, name)
