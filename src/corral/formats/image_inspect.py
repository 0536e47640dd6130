"""Inspect an untrusted disk image's headers before any qemu process opens it.

The point is to refuse images that would make qemu open *other* files (backing files,
external data files, VMDK extents and parents) and images that are not what they claim
to be. Only the image itself is opened, read-only, without following symlinks, and at
most a few MiB of it are read. Rules follow Glance's format_inspector and qemu's own
parsers (block/qcow2.c, block/vmdk.c, block/vdi.c).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import CorruptImage, NotFound, StorageError, UnsafeImage
from corral.formats.qcow2 import MAGIC as QCOW2_MAGIC
from corral.formats.qcow2 import read_qcow2_header
from corral.model.states import ImageFormat

_HEAD_BYTES = 2 << 20
"""Enough for qcow2's whole first cluster (at most 2 MiB), where its header must live."""

_VMDK4_MAGIC = b"KDMV"
_VMDK3_MAGIC = b"COWD"
_VMDK_HEADER = struct.Struct("<4sIIQQQQIQQQ")  # magic .. grain_offset
_VMDK_TEXT_MAGIC = b"# Disk DescriptorFile"
# qemu probes text as a VMDK descriptor if only comments and blank lines precede "version=N".
_VMDK_TEXT_PROBE = re.compile(rb"(?:#[^\n]*\n|[ ]+\r?\n)*version=[123]\r?\n")
_VMDK_DESC_MAX = (1 << 20) - 1  # qemu reads at most this much descriptor text
_VMDK_PARENT_REGION = (0x200, 20 * 512)  # where qemu looks for parentFileNameHint
_VMDK_SINGLE_FILE_TYPES = ("monolithicSparse", "streamOptimized")
_VMDK_EXTENT_ACCESS = frozenset({b"RW", b"RDONLY", b"NOACCESS"})
# The one extent line a single-file sparse VMDK may carry: its own grains, by a bare name.
_VMDK_SELF_EXTENT = re.compile(rb'(?:RW|RDONLY)\s+\d+\s+SPARSE\s+"[^"/]+"')

_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)
_VDI_SIGNATURE_AT = 0x40
_VDI_DISK_SIZE_AT = 0x170
_VDI_HEADER_BYTES = 0x200

_HINT_FLATTEN = "Convert it to a single self-contained file with 'qemu-img convert' first."


@dataclass(frozen=True)
class Inspection:
    """What an image's headers say about it."""

    format: ImageFormat
    virtual_size: int | None
    """Guest-visible size in bytes, when the header (or, for raw, the file) tells it."""
    details: Mapping[str, str] = field(default_factory=dict)


def detect_format(head: bytes) -> ImageFormat:
    """Name the format the first bytes of an image show; raw if no known signature matches."""
    if head.startswith(QCOW2_MAGIC):
        return ImageFormat.QCOW2
    if head.startswith((_VMDK4_MAGIC, _VMDK3_MAGIC, _VMDK_TEXT_MAGIC)):
        return ImageFormat.VMDK
    if _VMDK_TEXT_PROBE.match(head[:2048]):
        return ImageFormat.VMDK
    if head[_VDI_SIGNATURE_AT : _VDI_SIGNATURE_AT + 4] == _VDI_SIGNATURE:
        return ImageFormat.VDI
    return ImageFormat.RAW


def inspect_image(path: Path, declared: ImageFormat | None) -> Inspection:
    """Read ``path``'s headers and refuse it unless it is a self-contained image.

    Raises UnsafeImage if the image names other files (qcow2 backing or data file, VMDK
    extents or parent), is a VMDK other than monolithicSparse/streamOptimized, is a
    symlink or not a regular file, or is not the ``declared`` format. Raises CorruptImage
    for truncated or garbled headers and NotFound if ``path`` does not exist.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("image file", str(path)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeImage(
                f"The image '{path}' is a symbolic link; Corral opens only regular files.",
                hint="Pass the file it points to.",
            ) from None
        raise StorageError(f"Could not open the image '{path}': {exc.strerror}.") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeImage(f"The image '{path}' is not a regular file.")
        head = os.pread(fd, _HEAD_BYTES, 0)
        fmt = detect_format(head)
        if declared is not None and declared != fmt:
            raise UnsafeImage(
                f"The image '{path.name}' was declared {declared} but its contents are "
                f"{fmt}; Corral refuses images that are not what they claim to be.",
                hint="Declare its real format, or convert it to the declared one.",
            )
        if fmt is ImageFormat.QCOW2:
            return _inspect_qcow2(path, head, st.st_size)
        if fmt is ImageFormat.VMDK:
            return _inspect_vmdk(path, fd, head, st.st_size)
        if fmt is ImageFormat.VDI:
            return _inspect_vdi(path, head)
        return Inspection(ImageFormat.RAW, st.st_size)
    except OSError as exc:
        raise StorageError(f"Could not read the image '{path}': {exc.strerror}.") from exc
    finally:
        os.close(fd)


def _inspect_qcow2(path: Path, head: bytes, file_size: int) -> Inspection:
    header = read_qcow2_header(head)
    if header.backing_file is not None:
        raise UnsafeImage(
            f"The qcow2 image '{path.name}' refers to a backing file "
            f"('{header.backing_file}'); Corral accepts only self-contained images.",
            hint=_HINT_FLATTEN,
        )
    if header.has_external_data_file:
        name = f" ('{header.data_file}')" if header.data_file else ""
        raise UnsafeImage(
            f"The qcow2 image '{path.name}' keeps its data in an external file{name}; "
            "Corral accepts only self-contained images.",
            hint=_HINT_FLATTEN,
        )
    # qemu reads past the end of a file as zeros, so a cut-off table would go unnoticed.
    l1_end = header.l1_table_offset + header.l1_size * 8
    if l1_end > file_size or header.refcount_table_offset >= file_size:
        raise CorruptImage(
            f"The qcow2 image '{path.name}' is truncated: its tables lie beyond its "
            f"{file_size} bytes.",
            hint="Upload the complete file.",
        )
    details = {"version": str(header.version), "cluster_size": str(header.cluster_size)}
    return Inspection(ImageFormat.QCOW2, header.size, details)


def _inspect_vmdk(path: Path, fd: int, head: bytes, file_size: int) -> Inspection:
    if head.startswith(_VMDK3_MAGIC):
        raise UnsafeImage(
            f"The VMDK image '{path.name}' is an ESX sparse (COWD) image; Corral accepts only "
            "monolithicSparse or streamOptimized VMDKs.",
            hint=_HINT_FLATTEN,
        )
    if not head.startswith(_VMDK4_MAGIC):
        # A text descriptor keeps all its data in other files; name the first it lists.
        descriptor = _until_nul(head[:_VMDK_DESC_MAX])
        _check_vmdk_descriptor(path, descriptor, parent_region=descriptor)
        raise UnsafeImage(
            f"The VMDK image '{path.name}' is a descriptor file whose data lives elsewhere; "
            "Corral accepts only single-file monolithicSparse or streamOptimized VMDKs.",
            hint=_HINT_FLATTEN,
        )
    if len(head) < _VMDK_HEADER.size:
        raise CorruptImage(f"The VMDK image '{path.name}' is truncated inside its header.")
    _, version, _flags, capacity, _grain, desc_offset, *_ = _VMDK_HEADER.unpack_from(head)
    descriptor = b""
    if desc_offset:
        start = desc_offset * 512
        if start >= file_size:
            raise CorruptImage(
                f"The VMDK image '{path.name}' is truncated: its descriptor lies past the end."
            )
        # Read what qemu reads: up to 1 MiB from the offset, whatever desc_size says. With
        # capacity 0 qemu opens this descriptor's extents instead of the file's own grains.
        descriptor = _until_nul(os.pread(fd, _VMDK_DESC_MAX, start))
    region_start, region_size = _VMDK_PARENT_REGION
    parent_region = _until_nul(head[region_start : region_start + region_size])
    create_type = _check_vmdk_descriptor(path, descriptor, parent_region)
    details = {"create_type": create_type, "version": str(version)}
    return Inspection(ImageFormat.VMDK, capacity * 512, details)


def _check_vmdk_descriptor(path: Path, descriptor: bytes, parent_region: bytes) -> str:
    """Refuse a descriptor that names any file but its own; return its createType."""
    extents = [
        line.strip()
        for line in descriptor.split(b"\n")  # qemu splits lines at LF only
        if (fields := line.split()) and fields[0] in _VMDK_EXTENT_ACCESS
    ]
    for line in extents:
        if len(extents) > 1 or not _VMDK_SELF_EXTENT.fullmatch(line):
            named = re.search(rb'"([^"]*)"', line)
            target = os.fsdecode(named.group(1)) if named else os.fsdecode(line)
            raise UnsafeImage(
                f"The VMDK image '{path.name}' lists the extent '{target}'; Corral accepts "
                "only single-file monolithicSparse or streamOptimized VMDKs.",
                hint=_HINT_FLATTEN,
            )
    for text in (parent_region, descriptor):
        if b"parentFileNameHint" in text:  # qemu would open it as a backing file
            named = re.search(rb'parentFileNameHint="([^"]*)"', text)
            parent = f" ('{os.fsdecode(named.group(1))}')" if named else ""
            raise UnsafeImage(
                f"The VMDK image '{path.name}' names a parent image{parent}; Corral accepts "
                "only self-contained images.",
                hint=_HINT_FLATTEN,
            )
    # Parse createType as qemu does: the first occurrence, skip '="', read up to '"'.
    create_type = "monolithicSparse"  # qemu's default when a sparse file does not say
    at = descriptor.find(b"createType")
    if at >= 0:
        start = at + len(b"createType") + 2
        end = descriptor.find(b'"', start)
        create_type = os.fsdecode(descriptor[start:end] if end >= 0 else descriptor[start:])
    if create_type not in _VMDK_SINGLE_FILE_TYPES:
        raise UnsafeImage(
            f"The VMDK image '{path.name}' has createType '{create_type}'; Corral accepts "
            "only monolithicSparse or streamOptimized VMDKs.",
            hint=_HINT_FLATTEN,
        )
    return create_type


def _inspect_vdi(path: Path, head: bytes) -> Inspection:
    if len(head) < _VDI_HEADER_BYTES:
        raise CorruptImage(f"The VDI image '{path.name}' is truncated inside its header.")
    (disk_size,) = struct.unpack_from("<Q", head, _VDI_DISK_SIZE_AT)
    return Inspection(ImageFormat.VDI, disk_size)


def _until_nul(data: bytes) -> bytes:
    """C string semantics: qemu's parsers stop at the first NUL."""
    return data.split(b"\0", 1)[0]
