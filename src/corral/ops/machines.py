"""Machine records and the domain plans derived from them."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from corral.formats.qcow2 import MAGIC as QCOW2_MAGIC
from corral.formats.qcow2 import read_qcow2_header
from corral.identity import allocate_macs, new_identity
from corral.model import (
    DEFAULT_PROJECT,
    CloneMode,
    DomainPlan,
    Identity,
    Machine,
    PlacementHints,
    RecordState,
    Usage,
)
from corral.ops.context import Context, HostHandle
from corral.ops.usage import require_quota
from corral.storage.base import StorageBackend
from corral.store.repository import utcnow

_HEADER_BYTES = 64 << 10


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
        "disk_claim": m.disk_claim,
        "placement": m.placement.to_json(),
        "group": m.placement.group,
        "kernel_image": m.kernel_image,
        "storage_pool": m.storage_pool,
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
        disk_claim=a.get("disk_claim", 0),
        placement=PlacementHints.from_json(a.get("placement", {}), a.get("group")),
        kernel_image=a.get("kernel_image"),
        storage_pool=a.get("storage_pool"),
    )


def domain_plan(ctx: Context, machine: Machine, handle: HostHandle) -> DomainPlan:
    """The domain of ``machine`` on ``handle``'s host.

    A machine with a ``kernel_image`` boots that image's kernel and initrd, which must
    already be on the host (``distribute.ensure_image``); its disk has no base.
    """
    from corral.ops.distribute import image_on

    image = ctx.store.find_image(machine.image) if machine.image else None
    where = image_on(handle, image) if image is not None else None
    linked = where is not None and machine.clone is CloneMode.LINKED
    backing = where.base if linked and where is not None else None
    if machine.storage_pool is not None:
        # An added pool's clone may stand alone (a btrfs snapshot, a reflink) or be an
        # overlay of the pool's copy of the base: the disk's header says which.
        backing = backing_file_of(Path(machine.disk_path))
    kernel_boot = where.kernel_boot if where is not None else None
    if kernel_boot is None and machine.kernel_image is not None:
        kernel_boot = image_on(handle, ctx.store.get_image(machine.kernel_image)).kernel_boot
    return DomainPlan(
        name=machine.name,
        identity=machine.identity,
        accelerator=handle.host.accelerator,
        cpus=machine.cpus,
        memory_bytes=machine.memory_bytes,
        disk_path=machine.disk_path,
        disk_backing=backing,
        seed_path=machine.seed_path,
        console_log=str(handle.console_log(machine.name)),
        network=handle.host.network,
        kernel_boot=kernel_boot,
    )


def disk_claim(ctx: Context, clone: CloneMode, disk_bytes: int) -> int:
    """Pool bytes a new disk reserves on its host: a full copy's size; for a linked
    clone, which owns nothing yet, the room it is allowed to grow into."""
    if clone is CloneMode.FULL:
        return disk_bytes
    return int(disk_bytes * ctx.settings.linked_clone_growth)


def new_machine(
    handle: HostHandle,
    identity: Identity,
    *,
    image: str | None,
    cpus: int,
    memory_bytes: int,
    clone: CloneMode,
    ssh_keys: tuple[str, ...],
    project: str,
    disk_bytes: int,
    disk_claim: int,
    placement: PlacementHints | None = None,
    kernel_image: str | None = None,
    pool: tuple[str, StorageBackend] | None = None,
) -> Machine:
    """The record of a machine about to be provisioned, with its files' paths decided.

    The UUID is part of each file name, so a recreated namesake's files stay apart. The
    disk goes to ``pool`` (an added pool's name and backend) if given, else to the
    host's own pool, where the seed always goes.
    """
    stem = f"{identity.hostname}-{identity.uuid[:8]}"
    volumes = handle.storage if pool is None else pool[1]
    return Machine(
        name=identity.hostname,
        identity=identity,
        host=handle.host.name,
        image=image,
        cpus=cpus,
        memory_bytes=memory_bytes,
        clone=clone,
        disk_path=str(volumes.volume_path(stem)),
        seed_path=str(Path(handle.host.pool_path) / f"{stem}-seed.iso"),
        record_state=RecordState.PROVISIONING,
        managed=True,
        created_at=utcnow(),
        ssh_keys=ssh_keys,
        project=project,
        disk_bytes=disk_bytes,
        disk_claim=disk_claim,
        placement=placement or PlacementHints(),
        kernel_image=kernel_image,
        storage_pool=pool[0] if pool is not None else None,
    )


def copy_of(ctx: Context, handle: HostHandle, src: Machine, new: str, clone: CloneMode,
            disk_bytes: int) -> Machine:
    """The record of a new machine made from ``src``'s disk (a clone, or a copy of one
    of its snapshots): ``src``'s size, image, keys, project and placement, with a name,
    UUID, MAC and seed of its own. The project's quota is checked for its claim first."""
    claim = disk_claim(ctx, clone, disk_bytes)
    require_quota(ctx, src.project, Usage.of(1, src.cpus, src.memory_bytes, claim))
    (mac,) = allocate_macs(1, lambda c: ctx.store.taken(macs=c))
    return new_machine(
        handle,
        new_identity(new, mac),
        image=src.image,
        cpus=src.cpus,
        memory_bytes=src.memory_bytes,
        clone=clone,
        ssh_keys=src.ssh_keys,
        project=src.project,
        disk_bytes=disk_bytes,
        disk_claim=claim,
        placement=src.placement,
        kernel_image=src.kernel_image,
    )


def backing_file_of(disk: Path) -> str | None:
    """The backing file a local qcow2 disk's header names, made absolute; a raw disk (an
    lvm-thin or rbd block volume) has none."""
    with disk.open("rb") as f:
        head = f.read(_HEADER_BYTES)
    if not head.startswith(QCOW2_MAGIC):
        return None
    header = read_qcow2_header(head)
    if header.backing_file is None:
        return None
    return str(disk.parent / header.backing_file)
