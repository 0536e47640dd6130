"""A machine described by another product (VMware, VirtualBox, OVF), as read from its files.

Pure values. Each reader (``vmx``, ``vbox``, ``ovf``) produces a ``ForeignMachine``;
``ops.imports`` turns one into a Corral machine. Whatever a reader saw but Corral cannot
carry over goes into ``dropped`` as a sentence, so the import can report it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ForeignDisk:
    path: str
    """The disk file as the source names it: relative to the descriptor's folder, or absolute."""
    bus: str
    """``scsi``, ``ide``, ``sata``, ``nvme`` or ``virtio``, as the source had it."""
    format: str | None = None
    """``vmdk``, ``vdi``, ``qcow2``, ``raw``…, when the source says; ``None``: inspect the file."""
    device: str = "disk"
    """``disk`` or ``cdrom``; only disks are imported."""


@dataclass(frozen=True, slots=True)
class ForeignNic:
    mac: str | None
    """Normalised to lower case ``aa:bb:cc:dd:ee:ff``; ``None`` when the source generates one."""
    model: str | None = None
    """As the source names it (``vmxnet3``, ``e1000``, ``virtio``…)."""


@dataclass(frozen=True, slots=True)
class ForeignMachine:
    name: str
    cpus: int
    memory_bytes: int
    disks: tuple[ForeignDisk, ...]
    nics: tuple[ForeignNic, ...] = ()
    uuid: str | None = None
    """The source's machine UUID (VMware ``uuid.bios``, VirtualBox ``uuid``), normalised."""
    firmware: str = "bios"
    """``bios`` or ``efi``."""
    guest_os: str | None = None
    """As the source names it, e.g. VMware's ``debian12-64``."""
    dropped: tuple[str, ...] = field(default=())
    """Settings read but not carried over, one sentence each."""
