"""Typed values shared by every layer. Imports nothing else of Corral's but errors."""

from corral.model.account import (
    DEFAULT_PROJECT,
    AuditEntry,
    Event,
    Project,
    Quota,
    Token,
    Usage,
    User,
)
from corral.model.host import Host, HostFacts, HostPlacement, Overcommit
from corral.model.image import Image, KernelBoot
from corral.model.job import Job, Step
from corral.model.machine import (
    DiskUsage,
    DomainPlan,
    Identity,
    Machine,
    MachineSpec,
    PlacementHints,
)
from corral.model.pool import StoragePool
from corral.model.states import (
    Accelerator,
    CloneMode,
    GroupPolicy,
    HostState,
    ImageFormat,
    JobState,
    PowerState,
    RecordState,
    Role,
    StepState,
)

__all__ = [
    "DEFAULT_PROJECT",
    "Accelerator",
    "AuditEntry",
    "CloneMode",
    "DiskUsage",
    "DomainPlan",
    "Event",
    "GroupPolicy",
    "Host",
    "HostFacts",
    "HostPlacement",
    "HostState",
    "Identity",
    "Image",
    "ImageFormat",
    "Job",
    "JobState",
    "KernelBoot",
    "Machine",
    "MachineSpec",
    "Overcommit",
    "PlacementHints",
    "PowerState",
    "Project",
    "Quota",
    "RecordState",
    "Role",
    "Step",
    "StepState",
    "StoragePool",
    "Token",
    "Usage",
    "User",
]
