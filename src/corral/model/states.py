"""States as libvirt reports them, plus the few that only the store knows."""

from __future__ import annotations

from enum import StrEnum


class PowerState(StrEnum):
    """A domain's state, one value per libvirt ``VIR_DOMAIN_*`` state: paused is not shut off."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    SHUT_OFF = "shut-off"
    CRASHED = "crashed"
    SUSPENDED = "pm-suspended"


class RecordState(StrEnum):
    """What the store says about a machine record, independent of power."""

    PROVISIONING = "provisioning"
    READY = "ready"
    MISSING = "missing"
    """The record's domain vanished from its host; kept, never deleted silently."""
    DELETING = "deleting"


class Accelerator(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class CloneMode(StrEnum):
    LINKED = "linked"
    FULL = "full"


class ImageFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    VMDK = "vmdk"
    VDI = "vdi"


class JobState(StrEnum):
    PENDING = "pending"
    """Written down and accepted; a worker of the same process will run it."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


class StepState(StrEnum):
    PENDING = "pending"
    STARTED = "started"
    DONE = "done"
    COMPENSATED = "compensated"


class Role(StrEnum):
    ADMIN = "admin"
    """Everything, in every project."""
    OPERATOR = "operator"
    """Manages machines and images in the projects the user belongs to."""
    VIEWER = "viewer"
    """Reads the projects the user belongs to."""


class HostState(StrEnum):
    UP = "up"
    DOWN = "down"
    """The last health check could not reach the host; it receives nothing new."""
    MAINTENANCE = "maintenance"
    """Set by an operator; its machines stay, new ones go elsewhere."""


class GroupPolicy(StrEnum):
    """How the machines of one placement group relate to each other's hosts."""

    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti-affinity"
