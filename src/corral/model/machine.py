"""Machines: what a user asks for (MachineSpec) and what the store records (Machine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from corral.model.account import DEFAULT_PROJECT
from corral.model.image import KernelBoot
from corral.model.states import Accelerator, CloneMode, GroupPolicy, RecordState


@dataclass(frozen=True, slots=True)
class PlacementHints:
    """What a machine asks of the host it runs on, kept to place it again (rebalance)."""

    host: str | None = None
    """A host named by the user: no scheduling, the filters still apply."""
    tags: frozenset[str] = frozenset()
    """The host must carry every one of these tags."""
    group: str | None = None
    policy: GroupPolicy | None = None
    hard: bool = True
    """Hard: a rule no placement breaks; soft: only a preference of the weighers."""
    fast: bool = False
    """Prefer the host with the fastest single thread."""

    def to_json(self) -> dict[str, Any]:
        """As stored beside the machine (the group has a column of its own)."""
        return {"host": self.host, "tags": sorted(self.tags),
                "policy": self.policy.value if self.policy else None,
                "hard": self.hard, "fast": self.fast}

    @classmethod
    def from_json(cls, stored: dict[str, Any], group: str | None) -> PlacementHints:
        policy = stored.get("policy")
        return cls(
            host=stored.get("host"),
            tags=frozenset(stored.get("tags", ())),
            group=group,
            policy=GroupPolicy(policy) if policy else None,
            hard=stored.get("hard", True),
            fast=stored.get("fast", False),
        )


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
    placement: PlacementHints = field(default_factory=PlacementHints)
    pool: str | None = None
    """A storage pool by name (``corral pool add``); ``None``: the host's own pool."""


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
    disk_claim: int = 0
    """Pool bytes reserved on the host: a full copy's size, or a linked clone's room to grow."""
    placement: PlacementHints = field(default_factory=PlacementHints)
    kernel_image: str | None = None
    """The library image whose kernel and initrd boot this machine when it has no image
    of its own to boot from (an imported disk without a boot loader); ``None``: none."""
    storage_pool: str | None = None
    """The added storage pool holding its disk; ``None``: its host's own pool."""
    owned_bytes: int = 0
    """What its disk owned when last measured (pool usage, quota checks)."""
