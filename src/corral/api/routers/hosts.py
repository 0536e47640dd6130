"""Hosts and their storage pools, with capacity and what is in use."""

from __future__ import annotations

import os

from fastapi import APIRouter

from corral.api.deps import Caller, ServicesDep
from corral.api.problems import documented
from corral.api.schemas import HostOut, Name, PoolOut
from corral.errors import NotFound
from corral.model import Host
from corral.ops import hosts as host_ops

router = APIRouter(prefix="/hosts", tags=["hosts"], responses=documented(401, 403, 404, 422))
pools = APIRouter(prefix="/pools", tags=["hosts"], responses=documented(401))


def _disk(path: str) -> tuple[int, int] | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _out(svc: ServicesDep, host: Host) -> HostOut:
    used = svc.ctx.store.host_usage(host.name)
    return HostOut.of(host, up=svc.sweeper.healthy, disk=_disk(host.pool_path), used=used)


@router.get("", summary="Every enrolled host with capacity and use")
def list_hosts(_caller: Caller, svc: ServicesDep) -> list[HostOut]:
    return [_out(svc, h) for h in svc.ctx.store.list_hosts()]


@router.get("/{name}", summary="One host")
def get_host(name: Name, _caller: Caller, svc: ServicesDep) -> HostOut:
    host = svc.ctx.store.find_host(name)
    if host is None:
        raise NotFound("host", name)
    return _out(svc, host)


@router.post("/{name}/probe", summary="Probe the host again (admins)")
def probe_host(name: Name, caller: Caller, svc: ServicesDep) -> HostOut:
    caller.require_admin()
    if svc.ctx.store.find_host(name) is None:
        raise NotFound("host", name)
    return _out(svc, host_ops.reprobe(svc.ctx))


@pools.get("", summary="Storage pools with capacity and free space")
def list_pools(_caller: Caller, svc: ServicesDep) -> list[PoolOut]:
    out = []
    for host in svc.ctx.store.list_hosts():
        disk = _disk(host.pool_path)
        out.append(PoolOut(name=host.pool_name, host=host.name, type="qcow2", path=host.pool_path,
                           capacity_bytes=disk[0] if disk else None,
                           free_bytes=disk[1] if disk else None))
    return out
