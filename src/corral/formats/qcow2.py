"""The qcow2 header, read and written in pure Python: no process, no qemu.

Reading is for inspecting untrusted images and walking backing chains; writing is for
empty overlays, which are three small tables and need no ``qemu-img create``.
Layout reference: qemu's docs/interop/qcow2.txt. All integers are big-endian.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from corral.errors import Conflict, CorruptImage, InvalidInput
from corral.model.states import ImageFormat

MAGIC = b"QFI\xfb"

# Header extension types.
_EXT_END = 0x00000000
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_EXTENDED_L2 = 1 << 4

_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes, up to snapshots_offset
_V3_FIELDS = struct.Struct(">QQQII")  # 32 more bytes, up to header_length
_V3_LENGTH = 104
_WRITTEN_HEADER_LENGTH = 112  # 104 + compression type byte + padding, as qemu >= 5.1 writes
_EXT_HEADER = struct.Struct(">II")

_MIN_CLUSTER_BITS = 9
_MAX_CLUSTER_BITS = 21
_MIN_EXTENDED_L2_CLUSTER_BITS = 14  # qemu refuses subclusters smaller than 512 bytes
_MAX_BACKING_NAME = 1023  # qemu refuses longer backing file names
_MAX_L1_BYTES = 32 << 20  # qemu's QCOW_MAX_L1_SIZE
_SECTOR = 512


@dataclass(frozen=True)
class Qcow2Header:
    """The fields of a qcow2 header that Corral reasons about."""

    version: int
    cluster_bits: int
    size: int
    """Virtual size in bytes."""
    backing_file: str | None
    backing_format: str | None
    """From the backing format header extension; None when the image does not say."""
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    incompatible_features: int
    refcount_order: int
    header_length: int
    data_file: str | None
    """The external data file's name from its header extension, if recorded."""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """L2 entries carry a bitmap of 32 subclusters (128-bit entries)."""
        return bool(self.incompatible_features & INCOMPAT_EXTENDED_L2)

    @property
    def has_external_data_file(self) -> bool:
        """True if guest data lives in another file (feature bit or extension)."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE) or self.data_file is not None


def _corrupt(problem: str) -> CorruptImage:
    return CorruptImage(f"The qcow2 header {problem}.", hint="The image is truncated or damaged.")


def read_qcow2_header(data: bytes) -> Qcow2Header:
    """Parse the qcow2 header at the start of ``data`` (the image's first cluster or more).

    Raises CorruptImage if ``data`` is too short for what the header claims or is garbled.
    Never touches files the header names.
    """
    if len(data) < _V2_HEADER.size:
        raise _corrupt(f"is truncated ({len(data)} bytes; at least {_V2_HEADER.size} needed)")
    (
        magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        _snapshots_offset,
    ) = _V2_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _corrupt("does not start with the qcow2 magic bytes")
    if version not in (2, 3):
        raise _corrupt(f"has unsupported version {version}")
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise _corrupt(f"has an invalid cluster size (2^{cluster_bits} bytes)")
    cluster_size = 1 << cluster_bits

    if version == 2:
        incompatible, refcount_order, header_length = 0, 4, _V2_HEADER.size
    else:
        if len(data) < _V3_LENGTH:
            raise _corrupt(f"is truncated ({len(data)} bytes; a version 3 header needs 104)")
        incompatible, _compat, _autoclear, refcount_order, header_length = _V3_FIELDS.unpack_from(
            data, _V2_HEADER.size
        )
        if not _V3_LENGTH <= header_length <= cluster_size:
            raise _corrupt(f"has an invalid header length ({header_length})")

    # Extensions sit between the header and the backing file name, all in cluster 0.
    end = backing_offset if backing_offset else cluster_size
    if end > cluster_size or end < header_length:
        raise _corrupt(f"places the backing file name at an invalid offset ({backing_offset})")
    backing_format: str | None = None
    data_file: str | None = None
    offset = header_length
    while offset + _EXT_HEADER.size <= end:
        if offset + _EXT_HEADER.size > len(data):
            raise _corrupt("is truncated inside its header extensions")
        ext_type, ext_len = _EXT_HEADER.unpack_from(data, offset)
        offset += _EXT_HEADER.size
        if ext_type == _EXT_END:
            break
        if offset + ext_len > end:
            raise _corrupt(f"has a header extension of {ext_len} bytes that overruns the header")
        if offset + ext_len > len(data):
            raise _corrupt("is truncated inside its header extensions")
        payload = data[offset : offset + ext_len]
        if ext_type == _EXT_BACKING_FORMAT:
            backing_format = _decode(payload, "backing format")
        elif ext_type == _EXT_DATA_FILE:
            data_file = _decode(payload, "data file name")
        offset += (ext_len + 7) & ~7

    backing_file: str | None = None
    if backing_offset:
        if (
            not 0 < backing_size <= _MAX_BACKING_NAME
            or backing_offset + backing_size > cluster_size
        ):
            raise _corrupt(f"has an invalid backing file name length ({backing_size})")
        if backing_offset + backing_size > len(data):
            raise _corrupt("is truncated before its backing file name")
        backing_file = _decode(data[backing_offset : backing_offset + backing_size], "backing file")

    return Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        backing_file=backing_file,
        backing_format=backing_format,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        incompatible_features=incompatible,
        refcount_order=refcount_order,
        header_length=header_length,
        data_file=data_file,
    )


def _decode(raw: bytes, what: str) -> str:
    if b"\0" in raw:
        raise _corrupt(f"has a NUL byte in its {what}")
    # A file name is bytes on Linux; keep undecodable bytes rather than guess.
    return os.fsdecode(raw)


# Overlays get 128 KiB clusters with subclusters (extended L2 entries: 32 subclusters of
# 4 KiB each, QEMU >= 5.2). A guest's 4 KiB write into a fresh overlay then allocates one
# subcluster and writes 4 KiB; with 64 KiB clusters and no subclusters it first copied
# the cluster's other 60 KiB from the base. bench/first_write, 4 KiB random writes over a
# template's used 4 GiB, against a raw disk: 64 KiB plain 3.8-4.6x slower, 128 KiB with
# subclusters 0.9-1.1x (as fast); larger clusters without subclusters are worse (128 KiB
# 6.8-7.5x, 2 MiB 36-43x). 64 KiB with subclusters measured about the same, but its
# 16-byte L2 entries need twice the metadata per byte of disk; at 128 KiB it is what
# 64 KiB plain clusters need, so QEMU's L2 cache covers as much disk as before.
# Metadata preallocation measured no better than subclusters alone, and makes creation
# grow with the disk (4.5-8.7 s, 288 MiB for a 1 TiB overlay): Corral does not use it.
OVERLAY_CLUSTER_BITS = 17
OVERLAY_EXTENDED_L2 = True


def write_overlay(
    path: Path,
    *,
    backing_file: str,
    backing_format: str,
    virtual_size: int,
    cluster_bits: int = OVERLAY_CLUSTER_BITS,
    extended_l2: bool = OVERLAY_EXTENDED_L2,
) -> None:
    """Create ``path`` as an empty qcow2 v3 overlay of ``backing_file``.

    The result has the structure ``qemu-img create -f qcow2 -F FMT -b BASE -o
    cluster_size=2^cluster_bits,extended_l2=on|off`` gives: header cluster (with the
    backing format extension), refcount table, refcount block, zeroed L1 table.
    ``virtual_size`` is rounded up to 512 bytes as qemu-img does. The base is never
    opened. Raises Conflict if ``path`` exists, InvalidInput for impossible arguments, and
    OSError from the filesystem (after removing the partial file).
    """
    cluster_size = 1 << cluster_bits
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise InvalidInput(f"A qcow2 cluster size of 2^{cluster_bits} bytes is not allowed.")
    if extended_l2 and cluster_bits < _MIN_EXTENDED_L2_CLUSTER_BITS:
        raise InvalidInput(
            f"Subclusters need clusters of at least {1 << _MIN_EXTENDED_L2_CLUSTER_BITS} bytes."
        )
    if virtual_size <= 0:
        raise InvalidInput(f"An overlay needs a positive virtual size, not {virtual_size}.")
    try:
        fmt = ImageFormat(backing_format)
    except ValueError:
        raise InvalidInput(f"'{backing_format}' is not a known image format.") from None
    name = os.fsencode(backing_file)
    if not 0 < len(name) <= _MAX_BACKING_NAME or b"\0" in name:
        raise InvalidInput(
            f"The backing file name must be 1 to {_MAX_BACKING_NAME} bytes without NUL."
        )

    size = -(-virtual_size // _SECTOR) * _SECTOR
    entries_per_l2 = cluster_size // (16 if extended_l2 else 8)  # extended: entry + bitmap
    l1_size = -(-size // (cluster_size * entries_per_l2))
    if l1_size * 8 > _MAX_L1_BYTES:
        raise InvalidInput(f"A virtual size of {virtual_size} bytes is too large for qcow2.")
    l1_clusters = -(-(l1_size * 8) // cluster_size)
    # Cluster 0: header, 1: refcount table, 2: refcount block, 3...: L1 table.
    used_clusters = 3 + l1_clusters
    if used_clusters > cluster_size // 2:  # one block of 16-bit refcounts must cover them
        raise InvalidInput(f"A virtual size of {virtual_size} bytes needs larger clusters.")
    refcount_table_offset = cluster_size
    refcount_block_offset = 2 * cluster_size
    l1_table_offset = 3 * cluster_size

    fmt_bytes = fmt.value.encode()
    extensions = (
        _EXT_HEADER.pack(_EXT_BACKING_FORMAT, len(fmt_bytes))
        + fmt_bytes.ljust((len(fmt_bytes) + 7) & ~7, b"\0")
        + _EXT_HEADER.pack(_EXT_END, 0)
    )
    backing_offset = _WRITTEN_HEADER_LENGTH + len(extensions)
    if backing_offset + len(name) > cluster_size:
        raise InvalidInput("The backing file name does not fit in one qcow2 cluster.")
    header = _V2_HEADER.pack(
        MAGIC,
        3,
        backing_offset,
        len(name),
        cluster_bits,
        size,
        0,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        1,
        0,
        0,
    ) + _V3_FIELDS.pack(  # refcount_order 4: 16 bits
        INCOMPAT_EXTENDED_L2 if extended_l2 else 0, 0, 0, 4, _WRITTEN_HEADER_LENGTH
    )

    # Only the non-zero bytes are written; the rest of clusters 0-2 and the all-zero L1
    # table stay holes, so a 128 KiB-cluster overlay allocates a few KiB, not 384.
    head = bytearray(backing_offset + len(name))
    head[: len(header)] = header  # bytes 104..111 (compression type zlib, padding) stay 0
    head[_WRITTEN_HEADER_LENGTH:backing_offset] = extensions
    head[backing_offset:] = name
    pieces = (
        (0, bytes(head)),
        (refcount_table_offset, struct.pack(">Q", refcount_block_offset)),
        (refcount_block_offset, b"\0\1" * used_clusters),
    )

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise Conflict(f"Cannot create the overlay {path}: the file already exists.") from None
    try:
        for offset, data in pieces:
            if os.pwrite(fd, data, offset) != len(data):
                raise OSError(errno.EIO, "short write")
        os.ftruncate(fd, l1_table_offset + l1_size * 8)  # file ends where the L1 table ends
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
