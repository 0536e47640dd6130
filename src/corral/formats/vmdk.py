"""VMDK descriptors: which files a VMware disk is made of, and whether Corral may read them.

Pure: bytes in, values out. A VMDK is either a *text descriptor* that lists its
extents (``RW 4192256 SPARSE "web-s001.vmdk"``: access, size in sectors, type, file
and, for flat extents, an offset) in other files, as ``twoGbMaxExtentSparse`` and
``monolithicFlat`` disks are, or a single *sparse file* (``monolithicSparse``,
``streamOptimized``) whose header (magic ``KDMV``) points at a descriptor embedded in
the same file. ``parentFileNameHint`` names the disk a snapshot delta is written over.

An extent is named relative to its descriptor's folder, or absolutely; an import
accepts only files inside the machine's folder, or files the user named
(:func:`check_references`). Corral never hands qemu a foreign descriptor: it writes a
new one from the parsed values (:func:`render_descriptor`), so qemu opens exactly the
files Corral vetted, whatever quirks the original's syntax had.
"""

from __future__ import annotations

import posixpath
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from corral.errors import CorruptImage, InvalidInput, UnsafeImage

SECTOR = 512
MAX_DESCRIPTOR_BYTES = 1 << 20
"""qemu reads no more descriptor than this; neither does Corral."""

SPARSE_MAGIC = b"KDMV"
_SPARSE_HEADER = struct.Struct("<4sIIQQQQ")  # magic, version, flags, capacity, grain, desc off/size
_EXTENT = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$'
)
_KEY_VALUE = re.compile(r'^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*"?([^"]*)"?\s*$')

IMPORTABLE_EXTENT_TYPES = frozenset({"SPARSE", "FLAT", "VMFS"})
"""Extents qemu reads from a file: hosted sparse grains, or raw bytes. (qemu skips ZERO
extents, so a disk with one would come out shorter than it is.)"""
SPLIT_CREATE_TYPES = frozenset({"twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
                                "monolithicFlat", "vmfs"})
"""Descriptor files whose extents are other files (qemu's names for them)."""
SINGLE_FILE_CREATE_TYPES = frozenset({"monolithicSparse", "streamOptimized"})
_NO_PARENT = "ffffffff"


@dataclass(frozen=True, slots=True)
class Extent:
    access: str
    """``RW``, ``RDONLY`` or ``NOACCESS``."""
    sectors: int
    kind: str
    """``SPARSE``, ``FLAT``, ``VMFS``, ``ZERO``, ``VMFSSPARSE``…"""
    file: str | None
    """As written in the descriptor; ``None`` for ``ZERO`` extents."""
    offset: int = 0
    """Sectors into ``file`` where a flat extent starts."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    create_type: str
    extents: tuple[Extent, ...]
    parent_hint: str | None = None
    """``parentFileNameHint``: the disk this one is a snapshot delta of."""
    parent_cid: str = _NO_PARENT
    ddb: dict[str, str] = field(default_factory=dict)
    """The disk database (``ddb.adapterType``, ``ddb.geometry.*``…), keys without ``ddb.``."""

    @property
    def capacity(self) -> int:
        """Guest-visible bytes: the sum of the extents."""
        return sum(e.sectors for e in self.extents) * SECTOR

    @property
    def files(self) -> tuple[str, ...]:
        """Every file this descriptor makes a reader open, extents first, then the parent."""
        named = [e.file for e in self.extents if e.file is not None]
        if self.parent_hint is not None:
            named.append(self.parent_hint)
        return tuple(named)


@dataclass(frozen=True, slots=True)
class SparseHeader:
    version: int
    capacity: int
    """Bytes."""
    descriptor_offset: int
    """Bytes from the start of the file; 0 when there is no embedded descriptor."""
    descriptor_size: int
    """Bytes (at most MAX_DESCRIPTOR_BYTES)."""


def parse_sparse_header(head: bytes) -> SparseHeader | None:
    """The header of a hosted sparse extent (``KDMV``); None if ``head`` is not one."""
    if not head.startswith(SPARSE_MAGIC):
        return None
    if len(head) < _SPARSE_HEADER.size:
        raise CorruptImage("The VMDK sparse header is truncated.")
    _, version, _flags, capacity, _grain, desc_offset, desc_size = _SPARSE_HEADER.unpack_from(head)
    return SparseHeader(
        version=version,
        capacity=capacity * SECTOR,
        descriptor_offset=desc_offset * SECTOR,
        descriptor_size=min(desc_size * SECTOR, MAX_DESCRIPTOR_BYTES) if desc_offset else 0,
    )


def is_text_descriptor(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a text descriptor rather than a data file."""
    text = head[:MAX_DESCRIPTOR_BYTES].split(b"\0", 1)[0].lstrip()
    return text.startswith(b"# Disk DescriptorFile") or bool(
        re.match(rb"(?:#[^\n]*\n|\s*\n)*version=[123]\s*\n", text)
    )


def parse_descriptor(data: bytes) -> Descriptor:
    """A descriptor's text (standalone, or the one embedded in a sparse file).

    Like qemu, reading stops at the first NUL. Raises InvalidInput for a line that is
    neither a setting, an extent, a disk-database entry nor a comment, and UnsafeImage
    for a file name with a quote or control character in it.
    """
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise InvalidInput(f"The VMDK descriptor is {len(data)} bytes; descriptors are small.")
    text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    settings: dict[str, str] = {}
    ddb: dict[str, str] = {}
    extents: list[Extent] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        extent = _EXTENT.match(line)
        if extent is not None:
            extents.append(_extent(*extent.groups()))
            continue
        setting = _KEY_VALUE.match(line)
        if setting is None:
            raise InvalidInput(f"The VMDK descriptor line '{line[:60]}' is not one Corral reads.")
        key, value = setting.groups()
        if key.startswith("ddb."):
            ddb[key.removeprefix("ddb.")] = value
        else:
            settings[key] = value
    parent = settings.get("parentFileNameHint") or None
    if parent is not None:
        _check_file_name(parent)
    return Descriptor(
        create_type=settings.get("createType", "monolithicSparse"),
        extents=tuple(extents),
        parent_hint=parent,
        parent_cid=settings.get("parentCID", _NO_PARENT).lower(),
        ddb=ddb,
    )


def _extent(access: str, sectors: str, kind: str, file: str | None,
            offset: str | None) -> Extent:
    if kind != "ZERO" and not file:
        raise InvalidInput(f"The VMDK {kind} extent of {sectors} sectors names no file.")
    if file is not None:
        _check_file_name(file)
    return Extent(access=access, sectors=int(sectors), kind=kind, file=file or None,
                  offset=int(offset) if offset else 0)


def _check_file_name(name: str) -> None:
    if any(c == '"' or ord(c) < 0x20 or c == "\x7f" for c in name):
        raise UnsafeImage(f"The VMDK descriptor names a file with control characters "
                          f"({name!r}); Corral refuses it.")


def check_importable(desc: Descriptor, name: str) -> None:
    """Refuse what an import cannot carry over: snapshot deltas and exotic extents."""
    if desc.parent_hint is not None or desc.parent_cid != _NO_PARENT:
        parent = f" '{desc.parent_hint}'" if desc.parent_hint else ""
        raise InvalidInput(
            f"The disk '{name}' is a snapshot delta over the disk{parent}.",
            hint="Delete or consolidate the machine's snapshots in VMware, then import it.",
        )
    for extent in desc.extents:
        if extent.access == "NOACCESS":
            raise InvalidInput(f"The disk '{name}' has an extent marked NOACCESS; "
                               "its data cannot be read.")
        if extent.kind not in IMPORTABLE_EXTENT_TYPES:
            raise InvalidInput(
                f"The disk '{name}' has a {extent.kind} extent, which Corral cannot read.",
                hint="Export the machine from VMware with its disks as sparse or flat files.",
            )
    if not desc.extents:
        raise InvalidInput(f"The VMDK descriptor '{name}' lists no extents.")


def check_references(
    references: Iterable[str],
    relative_to: PurePosixPath,
    folder: PurePosixPath,
    allowed: Iterable[PurePosixPath] = (),
) -> tuple[PurePosixPath, ...]:
    """Where each referenced file is, refusing any outside ``folder`` the user did not name.

    ``relative_to`` is the folder of the file that names them (a VMX, or a descriptor);
    ``folder`` is the machine's folder. A file the user named, or a file under a folder
    the user named, is accepted wherever it is. Lexical only: the caller must still
    check where symbolic links lead.
    """
    allowed = tuple(PurePosixPath(posixpath.normpath(a)) for a in allowed)
    folder = PurePosixPath(posixpath.normpath(folder))
    located = []
    for reference in references:
        path = PurePosixPath(posixpath.normpath(relative_to / reference))
        if not path.is_relative_to(folder) and not any(
            path == a or path.is_relative_to(a) for a in allowed
        ):
            raise UnsafeImage(
                f"'{reference}' is outside the machine's folder {folder} (it is {path}); "
                "Corral reads only the files of the machine's own folder.",
                hint=f"If that file is meant, name it with --allow-path {path}.",
            )
        located.append(path)
    return tuple(located)


def render_descriptor(desc: Descriptor, files: Iterable[str]) -> str:
    """A descriptor for qemu with the same extents, naming them by ``files`` (absolute
    paths, in extent order) and nothing else: no parent, no disk database."""
    names = iter(files)
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        "CID=fffffffe",
        f"parentCID={_NO_PARENT}",
        f'createType="{desc.create_type}"',
    ]
    # No blank line anywhere: qemu's parser reads an extent line that follows a blank
    # line twice. Every extent is RW because qemu skips all others; qemu-img convert
    # opens its source read-only all the same.
    for e in desc.extents:
        if e.file is None:
            raise InvalidInput(f"A {e.kind} extent has no file; qemu cannot read it.")
        name = next(names)
        _check_file_name(name)
        offset = f" {e.offset}" if e.kind == "FLAT" else ""  # qemu refuses one on VMFS
        lines.append(f'RW {e.sectors} {e.kind} "{name}"{offset}')
    return "\n".join(lines) + "\n"
