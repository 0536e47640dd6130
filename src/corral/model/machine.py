"""Machines: what a user asks for (MachineSpec) and what the store records (Machine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from corral.model.account import DEFAULT_PROJECT
from corral.model.image import KernelBoot
from corral.model.states import Accelerator, CloneMode, RecordState


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """A request for one machine, already validated for syntax."""

    name: str
    image: str
    cpus: int = 1
    memory_bytes: int = 256 << 20
    disk_bytes: int | None = None
    """``None``: the image's virtual size."""
    clone: CloneMode = CloneMode.LINKED
    ssh_keys: tuple[str, ...] = ()
    start: bool = True
    project: str = DEFAULT_PROJECT


@dataclass(frozen=True, slots=True)
class Identity:
    """What makes a clone a machine of its own."""

    uuid: str
    mac: str | None
    """``None`` only for adopted domains without a network interface."""
    hostname: str
    instance_id: str


@dataclass(frozen=True, slots=True)
class DomainPlan:
    """Everything the compute driver needs to define one domain."""

    name: str
    identity: Identity
    accelerator: Accelerator
    cpus: int
    memory_bytes: int
    disk_path: str
    disk_backing: str | None
    seed_path: str | None
    console_log: str
    network: str | None
    kernel_boot: KernelBoot | None


@dataclass(frozen=True, slots=True)
class DiskUsage:
    virtual_size: int
    owned_bytes: int
    """Bytes allocated to this machine's own files."""
    shared_bytes: int
    """Bytes allocated to the bases it reads through (shared with other clones)."""


@dataclass(frozen=True, slots=True)
class Machine:
    name: str
    identity: Identity
    host: str
    image: str | None
    cpus: int
    memory_bytes: int
    clone: CloneMode | None
    disk_path: str
    seed_path: str | None
    record_state: RecordState
    managed: bool
    created_at: datetime
    ssh_keys: tuple[str, ...] = field(default=())
    project: str = DEFAULT_PROJECT
    disk_bytes: int | None = None
    """The virtual size asked for; ``None`` for adopted machines."""
