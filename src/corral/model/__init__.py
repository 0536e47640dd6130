"""Typed values shared by every layer. Imports nothing else of Corral's but errors."""

from corral.model.host import Host, HostFacts
from corral.model.image import Image, KernelBoot
from corral.model.job import Job, Step
from corral.model.machine import DiskUsage, DomainPlan, Identity, Machine, MachineSpec
from corral.model.states import (
    Accelerator,
    CloneMode,
    ImageFormat,
    JobState,
    PowerState,
    RecordState,
    StepState,
)

__all__ = [
    "Accelerator",
    "CloneMode",
    "DiskUsage",
    "DomainPlan",
    "Host",
    "HostFacts",
    "Identity",
    "Image",
    "ImageFormat",
    "Job",
    "JobState",
    "KernelBoot",
    "Machine",
    "MachineSpec",
    "PowerState",
    "RecordState",
    "Step",
    "StepState",
]
