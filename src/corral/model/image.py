"""Images in the library: read-only qcow2 bases that machines clone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from corral.model.states import Accelerator, ImageFormat


@dataclass(frozen=True, slots=True)
class KernelBoot:
    """Direct kernel boot: QEMU loads these files instead of a boot loader on the disk."""

    kernel: str
    initrd: str | None
    cmdline: str


@dataclass(frozen=True, slots=True)
class Image:
    name: str
    path: str
    """The read-only qcow2 base in the library."""
    source_format: ImageFormat
    """The format the image arrived in, before conversion to qcow2."""
    sha256: str
    """Of the library's qcow2 file."""
    virtual_size: int
    kernel_boot: KernelBoot | None
    """``None``: the image boots from its own disk."""
    created_at: datetime
    project: str | None = None
    """``None``: shared with every project (only an admin adds or removes those)."""
    arch: str = "x86_64"
    accelerator: Accelerator | None = None
    """An accelerator the image cannot run without; ``None``: any."""
