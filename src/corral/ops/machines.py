"""Machine records and the domain plans derived from them."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from corral.model import (
    DEFAULT_PROJECT,
    CloneMode,
    DomainPlan,
    Host,
    Identity,
    Machine,
    RecordState,
)
from corral.ops.context import Context
from corral.store.repository import utcnow


def machine_args(m: Machine) -> dict[str, Any]:
    """A machine as a job step's JSON arguments."""
    return {
        "name": m.name,
        "identity": asdict(m.identity),
        "host": m.host,
        "image": m.image,
        "cpus": m.cpus,
        "memory_bytes": m.memory_bytes,
        "clone": m.clone.value if m.clone else None,
        "disk_path": m.disk_path,
        "seed_path": m.seed_path,
        "ssh_keys": list(m.ssh_keys),
        "project": m.project,
        "disk_bytes": m.disk_bytes,
    }


def machine_from_args(a: dict[str, Any]) -> Machine:
    return Machine(
        name=a["name"],
        identity=Identity(**a["identity"]),
        host=a["host"],
        image=a["image"],
        cpus=a["cpus"],
        memory_bytes=a["memory_bytes"],
        clone=CloneMode(a["clone"]) if a["clone"] else None,
        disk_path=a["disk_path"],
        seed_path=a["seed_path"],
        record_state=RecordState.PROVISIONING,
        managed=True,
        created_at=utcnow(),
        ssh_keys=tuple(a["ssh_keys"]),
        # Jobs written before projects existed carry neither key.
        project=a.get("project", DEFAULT_PROJECT),
        disk_bytes=a.get("disk_bytes"),
    )


def domain_plan(ctx: Context, machine: Machine, host: Host) -> DomainPlan:
    image = ctx.store.find_image(machine.image) if machine.image else None
    backing = image.path if image is not None and machine.clone is CloneMode.LINKED else None
    return DomainPlan(
        name=machine.name,
        identity=machine.identity,
        accelerator=host.accelerator,
        cpus=machine.cpus,
        memory_bytes=machine.memory_bytes,
        disk_path=machine.disk_path,
        disk_backing=backing,
        seed_path=machine.seed_path,
        console_log=str(console_log(ctx, machine.name)),
        network=ctx.settings.network_name,
        kernel_boot=image.kernel_boot if image is not None else None,
    )


def console_log(ctx: Context, name: str) -> Path:
    return ctx.settings.console_dir / f"{name}.log"


def new_machine(
    ctx: Context,
    identity: Identity,
    *,
    host: str,
    image: str,
    cpus: int,
    memory_bytes: int,
    clone: CloneMode,
    ssh_keys: tuple[str, ...],
    project: str,
    disk_bytes: int,
) -> Machine:
    """The record of a machine about to be provisioned, with its files' paths decided.

    The UUID is part of each file name, so a recreated namesake's files stay apart.
    """
    stem = f"{identity.hostname}-{identity.uuid[:8]}"
    return Machine(
        name=identity.hostname,
        identity=identity,
        host=host,
        image=image,
        cpus=cpus,
        memory_bytes=memory_bytes,
        clone=clone,
        disk_path=str(ctx.storage.volume_path(stem)),
        seed_path=str(ctx.settings.pool_dir / f"{stem}-seed.iso"),
        record_state=RecordState.PROVISIONING,
        managed=True,
        created_at=utcnow(),
        ssh_keys=ssh_keys,
        project=project,
        disk_bytes=disk_bytes,
    )
