"""Machines: list, create (also in batches), power, clone, delete.

Another project's machine is invisible: reading or changing it answers 404, exactly
like a machine that does not exist. (Names are global, so creating a machine whose
name another project uses still answers 409.)
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Response

from corral.api.deps import Caller, ServicesDep
from corral.api.problems import documented, linked
from corral.api.schemas import (
    Accepted,
    JobOut,
    MachineClone,
    MachineCreate,
    MachineDetail,
    MachineMigrate,
    MachineOut,
    Name,
    Page,
    PlacementOut,
    PlacementPlan,
    SnapshotClone,
    SnapshotCreate,
    SnapshotOut,
    UsageOut,
    as_utc,
)
from corral.api.services import Services
from corral.errors import NotFound
from corral.model import Machine, MachineSpec, PlacementHints, RecordState
from corral.ops import lifecycle, provision, snapshot_clone
from corral.ops import migrate as move_ops
from corral.ops import snapshots as snapshot_ops
from corral.ops.accounts import Principal
from corral.ops.context import Context
from corral.ops.jobs import execute_job
from corral.ops.snapshot_clone import SnapshotRef
from corral.store.repository import MachineFilter

_NEW = {"name": "$response.body#/jobs/0/target"}
_ACCEPTED = linked(
    202, "Accepted: follow the jobs",
    GetJob=("get", "/jobs/{job_id}", {"job_id": "$response.body#/jobs/0/id"}),
    GetMachine=("get", "/machines/{name}", _NEW),
    StartMachine=("post", "/machines/{name}/start", _NEW),
    StopMachine=("post", "/machines/{name}/stop", _NEW),
    CloneMachine=("post", "/machines/{name}/clone", _NEW),
    DeleteMachine=("delete", "/machines/{name}", _NEW),
)

router = APIRouter(
    prefix="/machines", tags=["machines"], responses=documented(400, 401, 403, 404, 422, 503)
)


def visible(ctx: Context, caller: Principal, name: str) -> Machine:
    machine = ctx.store.find_machine(name)
    if machine is None or not caller.can_read(machine.project):
        raise NotFound("machine", name)
    return machine


def _detail(svc: ServicesDep, machine: Machine) -> MachineDetail:
    status = lifecycle.status(svc.ctx, machine)
    return MachineDetail(
        **MachineOut.of(machine, status.power).model_dump(),
        instance_id=machine.identity.instance_id,
        disk_path=machine.disk_path,
        ssh_keys=len(machine.ssh_keys),
        usage=UsageOut.of(status.usage) if status.usage else None,
    )


@router.get("", summary="List machines, a page at a time", response_model=Page[MachineOut])
async def list_machines(
    caller: Caller,
    svc: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=63, description="Last name seen.")] = None,
    project: Name | None = None,
    host: Name | None = None,
    image: Name | None = None,
    state: RecordState | None = None,
    prefix: Annotated[str | None, Query(max_length=63, description="Name prefix.")] = None,
) -> Response:
    projects = caller.projects
    if project is not None:
        projects = [project] if projects is None or project in projects else []
    where = MachineFilter(projects=projects, host=host, image=image, state=state,
                          name_prefix=prefix)
    # The busiest call: the page is reused while neither the store nor any machine's
    # power state has changed since it was built, so a hit is exactly a fresh read.
    key = ("machines", None if projects is None else tuple(sorted(projects)), host, image,
           state, prefix, after, limit)
    store_version = svc.ctx.store.data_version()
    version = None if store_version is None else (store_version, svc.sweeper.version)
    body: bytes | None = None if version is None else svc.pages.get(key, version)
    if body is None:
        body = await svc.read(_machine_page, svc, where, after, limit)
        if version is not None:
            svc.pages.put(key, version, body)
    return Response(body, media_type="application/json")


def _machine_page(svc: Services, where: MachineFilter, after: str | None, limit: int) -> bytes:
    store = svc.ctx.store
    items = store.machine_summaries(where, after=after, limit=limit)
    for item in items:
        item["power"] = svc.sweeper.state(item["name"])
    page = {
        "items": items,
        "next": items[-1]["name"] if len(items) == limit else None,
        "total": store.count_machines(where),
    }
    # Encoded here rather than through the response model: the rows already have the
    # documented shape (a test holds the two together), and validating them again
    # would double the cost of the call.
    return json.dumps(page, default=_isoformat).encode()


def _isoformat(value: object) -> str:
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def machine_spec(body: MachineCreate, caller: Principal, ctx: Context) -> MachineSpec:
    """The request as a spec, after the caller's rights to its project and host."""
    project = body.project or caller.home_project()
    if not caller.can_read(project):
        raise NotFound("project", project)
    caller.require_manage(project)
    if body.host is not None:
        caller.require_admin()
        ctx.store.get_host(body.host)
    return MachineSpec(
        name=body.name,
        image=body.image,
        cpus=body.cpus,
        memory_bytes=body.memory_bytes,
        disk_bytes=body.disk_bytes,
        clone=body.clone,
        ssh_keys=tuple(body.ssh_keys),
        start=body.start,
        project=project,
        placement=PlacementHints(
            host=body.host, tags=frozenset(body.tags), group=body.group, policy=body.policy,
            hard=not body.soft, fast=body.fast,
        ),
        pool=body.pool,
    )


@router.post(
    "", status_code=202,
    summary="Create machines; answers with one job per machine (or a plan, with dry_run)",
    responses={
        **_ACCEPTED,
        200: {"model": PlacementPlan,
              "description": "dry_run: where each machine would go; nothing was created"},
        **documented(409, 507),
    },
)
def create_machines(body: MachineCreate, caller: Caller, svc: ServicesDep,
                    response: Response) -> Accepted | PlacementPlan:
    """The scheduler places the batch as a whole; when no host can take a machine the
    answer is 409 with an ``explanation`` member: every host's verdict."""
    ctx = svc.ctx
    spec = machine_spec(body, caller, ctx)
    if body.dry_run:
        response.status_code = 200
        return PlacementPlan(placements=[
            PlacementOut(machine=p.machine, host=p.host, score=p.score, scores=dict(p.scores))
            for p in provision.plan_placement(ctx, spec, body.count)
        ])
    jobs = provision.plan_machines(ctx, spec, body.count)
    svc.worker.submit(
        f"creating {body.name}", partial(provision.provision, ctx, jobs, start=body.start)
    )
    return Accepted(jobs=[JobOut.of(j) for j in jobs])


@router.get("/{name}", summary="One machine, with live state and disk usage")
def get_machine(name: Name, caller: Caller, svc: ServicesDep) -> MachineDetail:
    return _detail(svc, visible(svc.ctx, caller, name))


def _power(action: str, svc: ServicesDep, caller: Principal, name: str, *,
           timeout: float | None = None) -> MachineDetail:
    machine = visible(svc.ctx, caller, name)
    caller.require_manage(machine.project)
    ctx = svc.ctx
    if action == "start":
        lifecycle.start(ctx, name)
    elif action == "stop":
        lifecycle.stop(ctx, name, timeout if timeout is not None else ctx.settings.stop_timeout)
    elif action == "reboot":
        lifecycle.reboot(ctx, name)
    else:
        lifecycle.kill(ctx, name)
    svc.sweeper.sweep()
    return _detail(svc, machine)


@router.post("/{name}/start", summary="Power on", responses=documented(409))
def start(name: Name, caller: Caller, svc: ServicesDep) -> MachineDetail:
    return _power("start", svc, caller, name)


@router.post("/{name}/stop", summary="ACPI shutdown; power off after the timeout")
def stop(
    name: Name,
    caller: Caller,
    svc: ServicesDep,
    timeout: Annotated[float | None, Query(ge=0, le=600)] = None,
) -> MachineDetail:
    return _power("stop", svc, caller, name, timeout=timeout)


@router.post("/{name}/reboot", summary="ACPI reboot", responses=documented(409))
def reboot(name: Name, caller: Caller, svc: ServicesDep) -> MachineDetail:
    return _power("reboot", svc, caller, name)


@router.post("/{name}/kill", summary="Power off at once")
def kill(name: Name, caller: Caller, svc: ServicesDep) -> MachineDetail:
    return _power("kill", svc, caller, name)


@router.post(
    "/{name}/clone", status_code=202, summary="Clone a stopped machine",
    responses={**_ACCEPTED, **documented(409, 507)},
)
def clone(name: Name, body: MachineClone, caller: Caller, svc: ServicesDep) -> Accepted:
    source = visible(svc.ctx, caller, name)
    caller.require_manage(source.project)
    job = lifecycle.prepare_clone(svc.ctx, name, body.name, body.clone)
    svc.worker.submit(f"cloning {name}", execute_job, svc.ctx, job)
    return Accepted(jobs=[JobOut.of(job)])


@router.post(
    "/{name}/migrate", status_code=202, summary="Move a machine to another host (admins)",
    responses={**_ACCEPTED, **documented(409)},
)
def migrate(name: Name, body: MachineMigrate, caller: Caller, svc: ServicesDep) -> Accepted:
    """Stopped machines move cold, running ones with ``live``. Which host runs what is
    the operators' of the pool to decide, like ``host`` on creation: admins only."""
    visible(svc.ctx, caller, name)
    caller.require_admin()
    job, _plan = move_ops.prepare_migration(svc.ctx, name, to=body.to, live=body.live)
    svc.worker.submit(f"moving {name}", execute_job, svc.ctx, job)
    return Accepted(jobs=[JobOut.of(job)])


@router.get("/{name}/snapshots", summary="A machine's snapshots, oldest first")
def list_snapshots(name: Name, caller: Caller, svc: ServicesDep) -> list[SnapshotOut]:
    visible(svc.ctx, caller, name)
    tree = snapshot_ops.tree(svc.ctx, name)
    return [SnapshotOut.of(s, tree.current) for s in tree.snapshots]


@router.post("/{name}/snapshots", status_code=201, summary="Take a snapshot",
             responses=documented(409))
def create_snapshot(name: Name, body: SnapshotCreate, caller: Caller,
                    svc: ServicesDep) -> SnapshotOut:
    """Of a running machine, with its memory (a revert resumes it); of a stopped one,
    its disk. The new snapshot is the current one's child."""
    caller.require_manage(visible(svc.ctx, caller, name).project)
    made = snapshot_ops.create(svc.ctx, name, body.name, body.description)
    return SnapshotOut.of(made, made.name)


@router.post(
    "/{name}/snapshots/{snapshot}/clone", status_code=202,
    summary="Create a machine from a snapshot",
    responses={**_ACCEPTED, **documented(409, 507)},
)
def clone_snapshot(name: Name, snapshot: Name, body: SnapshotClone, caller: Caller,
                   svc: ServicesDep) -> Accepted:
    """A new machine whose disk is this machine's as it was at the snapshot, with an
    identity of its own, on this machine's host (which must be the server's own). The
    machine may be running: it is neither paused nor reverted. With ``start``, the new
    machine is started after its job, and deleted if it will not start."""
    source = visible(svc.ctx, caller, name)
    caller.require_manage(source.project)
    job = snapshot_clone.prepare(svc.ctx, SnapshotRef(name, snapshot), body.name, body.clone)
    svc.worker.submit(f"creating {body.name} from {name}@{snapshot}", snapshot_clone.finish,
                      svc.ctx, job, body.start)
    return Accepted(jobs=[JobOut.of(job)])


@router.post("/{name}/snapshots/{snapshot}/revert", summary="Revert to a snapshot",
             responses=documented(409))
def revert_snapshot(name: Name, snapshot: Name, caller: Caller,
                    svc: ServicesDep) -> SnapshotOut:
    """What the machine wrote since the snapshot is lost, unless another snapshot holds it."""
    caller.require_manage(visible(svc.ctx, caller, name).project)
    return SnapshotOut.of(snapshot_ops.revert(svc.ctx, name, snapshot), snapshot)


@router.delete("/{name}/snapshots/{snapshot}", status_code=204, summary="Delete a snapshot",
               responses=documented(409))
def delete_snapshot(name: Name, snapshot: Name, caller: Caller, svc: ServicesDep) -> Response:
    """Its children become its parent's; the machine's current data never changes."""
    caller.require_manage(visible(svc.ctx, caller, name).project)
    snapshot_ops.delete(svc.ctx, name, snapshot)
    return Response(status_code=204)


@router.delete(
    "/{name}", status_code=202, summary="Delete a machine and its disks",
    responses=documented(409),
)
def delete(name: Name, caller: Caller, svc: ServicesDep, force: bool = False) -> Accepted:
    machine = visible(svc.ctx, caller, name)
    caller.require_manage(machine.project)
    job = lifecycle.prepare_delete(svc.ctx, name, force=force)
    svc.worker.submit(f"deleting {name}", execute_job, svc.ctx, job)
    return Accepted(jobs=[JobOut.of(job)])
