"""Hosts: libvirt connections that run machines, and what the scheduler knows of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from corral.errors import InvalidInput
from corral.model.states import Accelerator, HostState


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What a host says about itself when probed."""

    hostname: str
    arch: str
    cpu_model: str
    cpus: int
    """Logical CPUs (threads) libvirt may run vCPUs on."""
    memory_bytes: int
    hypervisor: str
    hypervisor_version: str
    sockets: int = 1
    cores: int = 1
    """Cores per socket."""
    threads: int = 1
    """Threads per core."""


@dataclass(frozen=True, slots=True)
class Overcommit:
    """How far claims may exceed physical capacity: CPU 4.0 means 4 vCPUs per thread."""

    cpu: float = 4.0
    memory: float = 1.0
    disk: float = 1.0

    def __post_init__(self) -> None:
        if min(self.cpu, self.memory, self.disk) <= 0:
            raise InvalidInput("Overcommit ratios must be larger than zero.")


@dataclass(frozen=True, slots=True)
class HostPlacement:
    """What an operator sets on a host for placement; ``None`` ratios follow the global ones."""

    tags: frozenset[str] = frozenset()
    cpu_ratio: float | None = None
    memory_ratio: float | None = None
    disk_ratio: float | None = None

    def ratios(self, default: Overcommit) -> Overcommit:
        return Overcommit(
            cpu=default.cpu if self.cpu_ratio is None else self.cpu_ratio,
            memory=default.memory if self.memory_ratio is None else self.memory_ratio,
            disk=default.disk if self.disk_ratio is None else self.disk_ratio,
        )


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    uri: str
    facts: HostFacts
    accelerator: Accelerator
    accelerator_note: str
    """Why this accelerator: what the boot probe saw."""
    pool_name: str
    pool_path: str
    network: str = "corral"
    disk_bytes: int = 0
    """Capacity of the storage pool that holds machine disks."""
    cpu_score: float | None = None
    """Single-thread speed measured by the enrolment probe; bigger is faster."""
    state: HostState = HostState.UP
    state_note: str = ""
    """Why the host is down or in maintenance."""
    last_seen: datetime | None = None
    placement: HostPlacement = field(default_factory=HostPlacement)
