"""Volumes in a libvirt 'dir' pool on any host, reached only through libvirt's storage API.

The controller never touches the host's filesystem: volumes are created with
``virStoragePoolCreateXML[From]``, written with ``virStorageVolUpload`` and read with
``virStorageVolDownload`` streams, so the same code serves ``qemu:///system`` and
``qemu+ssh://``/``qemu+tls://`` hosts. Every ``libvirt.libvirtError`` is translated here
into a Corral error with one sentence. ``Any`` stays inside this module: libvirt-python
has no type stubs.

Two facts about libvirt 9's dir pools shape the code below (both measured):

* A pool refresh probes each file's format: a raw volume whose bytes are a qcow2 image
  becomes a qcow2 volume, and ``createXMLFrom`` from it runs ``qemu-img convert``. So
  server-side copies re-encode; byte-exact copies go through streams.
* A hole sent on an upload stream is ``lseek`` plus ``ftruncate`` at the hole's end: it
  does not zero bytes already in the file. ``write_range`` therefore sends zeros, not
  holes, over the part of a volume that may hold old bytes.

Deleting a ``.qcow2`` volume that another volume of the pool reads through as its base
is refused (Conflict naming it). libvirt's volume XML names each volume's backing file, so
``delete`` refreshes the pool (overlays written through streams or by hand are probed
then) and reads every volume's XML: one RPC per volume, paid only when a qcow2 volume
is deleted. Volumes of other pools are not looked at.

No SNAPSHOT: libvirt's storage API has no volume snapshot verb (a ``dir`` pool volume
can be created, copied, resized, wiped, uploaded, downloaded and deleted, nothing else),
and qemu-img cannot reach a remote host. Machine snapshots go through the compute driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import libvirt

from corral.errors import Conflict, CorralError, NoSpace, NotFound, StorageError
from corral.formats.domain_xml import safe_fromstring
from corral.formats.qcow2 import OVERLAY_CLUSTER_BITS, OVERLAY_EXTENDED_L2
from corral.model import DiskUsage
from corral.storage.base import (
    FULL_CLONE,
    LINKED_CLONE,
    Hole,
    Piece,
    Progress,
    StorageBackend,
)
from corral.storage.sparse import PIECE_BYTES

log = logging.getLogger(__name__)

Connect = Callable[[], Any]
"""Returns an open ``libvirt.virConnect`` (e.g. the compute driver's, so both share it)."""

_PIECE = PIECE_BYTES
"""Bytes per stream message: libvirt's RPC payload size for stream data."""
_ZEROS = bytes(_PIECE)
_LEAD_INS = re.compile(
    r"^(Requested operation is not valid|internal error|operation failed|"
    r"unsupported configuration|invalid argument|Operation not supported|"
    r"this function is not supported by the connection driver): ",
    re.IGNORECASE,
)


class LibvirtPoolBackend(StorageBackend):
    """qcow2 and raw volumes in the libvirt 'dir' pool ``pool_name`` at ``pool_path``.

    ``pool_path`` is the pool's target path on the host; every ``Path`` this backend
    takes or returns is a path on that host, directly inside ``pool_path``.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({LINKED_CLONE, FULL_CLONE})

    def __init__(self, connect: Connect, pool_name: str, pool_path: Path | str) -> None:
        self._connect = connect
        self.pool_name = pool_name
        self.pool_path = Path(pool_path)

    def volume_path(self, name: str) -> Path:
        return self.pool_path / f"{name}.qcow2"

    # -- the contract -------------------------------------------------------------------

    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        # The overlay layout Corral's own writer uses (formats/qcow2.py says what it buys:
        # a guest's first 4 KiB writes no slower than on raw, not ~4x slower).
        spec = VolumeSpec(
            self._name(dest),
            virtual_size,
            "qcow2",
            backing=base,
            cluster_size=1 << OVERLAY_CLUSTER_BITS,
            extended_l2=OVERLAY_EXTENDED_L2,
        )
        xml = volume_xml(spec)
        with self._translated(f"create the linked clone {dest}"):
            self._pool().createXML(xml, 0)

    def full_clone(
        self, base: Path, dest: Path, virtual_size: int, progress: Progress | None = None
    ) -> None:
        # createXMLFrom runs qemu-img convert on the host: the copy reads through the
        # base's own backing chain, so dest stands alone. It keeps the source's virtual
        # size whatever capacity the XML asks, hence the resize.
        xml = volume_xml(VolumeSpec(self._name(dest), virtual_size, "qcow2"))
        with self._translated(f"copy {base.name} into {dest.name}"):
            source = self._volume(base)
            vol = self._pool().createXMLFrom(xml, source, 0)
            try:
                if int(vol.info()[1]) < virtual_size:
                    vol.resize(virtual_size, 0)
            except BaseException:
                _cleanup(f"delete {dest}", lambda: vol.delete(0))
                raise
        if progress is not None:
            progress(100.0)

    def copy(self, source: Path, dest: Path) -> None:
        """Byte-exact, so a qcow2 overlay keeps its backing reference.

        libvirt's server-side copy (createXMLFrom) would re-encode through qemu-img and
        drop the reference, so the bytes travel host -> controller -> host through a
        download and an upload stream, holes kept: the cost is the bytes the volume
        owns (an overlay's few MiB), twice over the network for a remote host.
        """
        with self._translated(f"copy {source.name} into {dest.name}"):
            size = self._physical(self._volume(source))
            self._create_raw(dest)
            try:
                self.write_range(dest, 0, size, self.read_range(source, 0, size))
            except BaseException:
                self._discard(dest)
                raise

    def delete(self, path: Path) -> None:
        """Idempotent. Raises Conflict, naming one, while a volume of the pool reads
        through the qcow2 volume at ``path`` as its base."""
        with self._translated(f"delete {path}"):
            vol = self._lookup(path)
            if vol is None:
                return
            dependant = self._dependant(path)
            if dependant is not None:
                raise Conflict(
                    f"Cannot delete {path.name}: the volume {dependant} still reads through "
                    "it as its base."
                )
            try:
                vol.delete(0)
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise

    def usage(self, path: Path) -> DiskUsage:
        with self._translated(f"read the usage of {path}"):
            vol = self._volume(path)
            root = safe_fromstring(vol.XMLDesc(0), what="volume XML")
            capacity = _bytes(root, "capacity")
            owned = _bytes(root, "allocation")
            shared = 0
            seen = {path}
            backing = root.findtext("backingStore/path")
            while backing:
                base = Path(backing)
                if base in seen:  # a loop in a chain is corruption, not a base
                    raise StorageError(f"The backing chain of {path} loops at {base}.")
                seen.add(base)
                base_root = safe_fromstring(
                    self._conn().storageVolLookupByPath(backing).XMLDesc(0), what="volume XML"
                )
                shared += _bytes(base_root, "allocation")
                backing = base_root.findtext("backingStore/path")
        return DiskUsage(virtual_size=capacity, owned_bytes=owned, shared_bytes=shared)

    def put_file(self, source: Path, dest: Path) -> None:
        size = _file_size(source)
        with self._translated(f"upload {source.name} to {dest}"):
            self._create_raw(dest)
            try:
                self.upload_range(source, dest, 0, size)
            except BaseException:
                self._discard(dest)
                raise

    def fetch(self, path: Path, local_dest: Path) -> None:
        size = self.size(path)
        with self._translated(f"fetch {path}"), local_dest.open("xb") as out:
            try:
                for piece in self.read_range(path, 0, size):
                    if isinstance(piece, Hole):
                        out.seek(piece.length, os.SEEK_CUR)
                    else:
                        out.write(piece)
                out.truncate()  # a trailing hole: the seek alone does not extend the file
            except BaseException:
                local_dest.unlink(missing_ok=True)
                raise

    def read_tail(self, path: Path, max_bytes: int) -> bytes:
        with self._translated(f"read {path}"):
            vol = self._volume(path)
            size = self._physical(vol)
            stream = self._conn().newStream(0)
            # Length 0: to the end of the file as it is now, which a log being appended
            # to may have moved past ``size``; the slice below keeps the last bytes.
            vol.download(stream, max(0, size - max_bytes), 0, 0)
            try:
                parts = [data for data, _hole in _receive(stream)]
                stream.finish()
            except BaseException:
                _abort(stream)
                raise
        return b"".join(parts)[-max_bytes:] if max_bytes > 0 else b""

    def exists(self, path: Path) -> bool:
        if path.parent != self.pool_path:
            return False
        with self._translated(f"look up {path}"):
            return self._lookup(path) is not None

    def create_empty(self, dest: Path) -> None:
        """An empty raw volume: capacity 0, and no bytes allocated ahead."""
        with self._translated(f"create {dest}"):
            self._create_raw(dest)

    def size(self, path: Path) -> int:
        with self._translated(f"read the size of {path}"):
            return self._physical(self._volume(path))

    def read_range(self, path: Path, start: int, end: int) -> Generator[Piece, None, None]:
        """One sparse download stream: holes cross the wire as lengths."""
        with self._translated(f"read {path}"):
            vol = self._volume(path)
            if end <= start:
                return  # a download of length 0 would read to the end of the file
            stream = self._conn().newStream(0)
            vol.download(
                stream, start, end - start, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM
            )
            try:
                for data, hole in _receive(stream):
                    yield Hole(hole) if hole else data
                stream.finish()
            except BaseException:  # GeneratorExit included: a reader that stopped early
                _abort(stream)
                raise

    def write_range(self, dest: Path, start: int, end: int, pieces: Iterable[Piece]) -> None:
        """One upload stream (SPARSE_STREAM): holes are sent as holes, except below the
        current end of ``dest``, where old bytes may lie and zeros are sent instead (a
        hole on a libvirt upload stream does not clear what the file holds); where the
        host refuses sparse streams, all holes are sent as zeros.
        """
        with self._translated(f"write to {dest}"):
            vol = self._volume(dest)
            dirty_end = self._physical(vol)
            sparse = True
            try:
                stream = self._upload(vol, start, end, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
            except libvirt.libvirtError as exc:
                if _code(exc) not in (libvirt.VIR_ERR_INVALID_ARG, *_UNSUPPORTED):
                    raise
                log.info("%s refuses sparse uploads; sending holes as zeros", self.pool_name)
                stream = self._upload(vol, start, end, 0)
                sparse = False
            try:
                _send_pieces(stream, pieces, start, end, dirty_end if sparse else end)
                stream.finish()
            except BaseException:
                _abort(stream)
                raise

    # -- helpers ---------------------------------------------------------------------------

    def _conn(self) -> Any:
        return self._connect()

    def _pool(self) -> Any:
        return self._conn().storagePoolLookupByName(self.pool_name)

    def _name(self, path: Path) -> str:
        if path.parent != self.pool_path:
            raise StorageError(f"{path} is not in the storage pool at {self.pool_path}.")
        return path.name

    def _lookup(self, path: Path) -> Any:
        """The volume at ``path``, or None; refreshes the pool once before saying None.

        libvirt knows only the files it made or saw at the last refresh, and QEMU's
        console logs appear behind its back.
        """
        name = self._name(path)
        pool = self._pool()
        for attempt in range(2):
            try:
                return pool.storageVolLookupByName(name)
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise
            if attempt == 0:
                _refresh(pool)
        return None

    def _volume(self, path: Path) -> Any:
        vol = self._lookup(path)
        if vol is None:
            raise NotFound("volume", str(path), called="at")
        return vol

    def _upload(self, vol: Any, start: int, end: int, flags: int) -> Any:
        """An upload stream open on ``[start, end)`` of ``vol``.

        libvirt counts a volume in use while it opens any stream on it, and refuses an
        upload then: a read-back of the same volume starting at that instant is not an
        error, so it is tried again for a while.
        """
        deadline = time.monotonic() + IN_USE_PATIENCE
        delay = 0.005
        while True:
            stream = self._conn().newStream(0)
            try:
                vol.upload(stream, start, end - start, flags)
                return stream
            except libvirt.libvirtError as exc:
                if "still in use" not in _detail(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _dependant(self, path: Path) -> str | None:
        """The path of a volume of the pool whose backing file is ``path``, or None.

        Only a ``.qcow2`` volume is looked for, as every disk and base Corral makes is
        named: asking libvirt a volume's format costs an RPC, and fails for a file that
        went behind its back (a console log another host of a shared pool removed).
        """
        if path.suffix != ".qcow2":
            return None  # Corral's overlays name qcow2 bases only
        pool = self._pool()
        _refresh(pool)  # learn of overlays written behind libvirt's back
        for other in pool.listAllVolumes(0):
            try:
                desc = safe_fromstring(other.XMLDesc(0), what="volume XML")
            except libvirt.libvirtError as exc:  # deleted meanwhile
                if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    continue
                raise
            if desc.findtext("backingStore/path") == str(path):
                return str(other.path())
        return None

    def _physical(self, vol: Any) -> int:
        return int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])

    def _create_raw(self, dest: Path) -> None:
        self._pool().createXML(volume_xml(VolumeSpec(self._name(dest), 0, "raw")), 0)

    def _discard(self, path: Path) -> None:
        _cleanup(f"delete {path}", lambda: self.delete(path))

    @contextlib.contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        try:
            yield
        except libvirt.libvirtError as exc:
            raise _translate(exc, action, self.pool_name) from exc
        except OSError as exc:  # the local side of an upload
            raise StorageError(f"Could not {action}: {exc.strerror or exc}.") from exc


# -- volume XML --------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    capacity: int
    format: str
    allocation: int = 0
    """Bytes to allocate up front: 0 keeps the file sparse."""
    backing: Path | None = None
    backing_format: str | None = None
    cluster_size: int | None = None
    """qcow2 cluster size in bytes; None leaves qemu-img's default (64 KiB)."""
    extended_l2: bool = False
    """qcow2 subclusters: libvirt passes ``extended_l2=on`` to qemu-img (9.0 does)."""


def volume_xml(spec: VolumeSpec) -> str:
    """libvirt's ``<volume>`` document for ``spec``. Pure."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = spec.name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(spec.capacity)
    ET.SubElement(vol, "allocation", unit="bytes").text = str(spec.allocation)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type=spec.format)
    if spec.cluster_size is not None:
        ET.SubElement(target, "clusterSize", unit="B").text = str(spec.cluster_size)
    if spec.extended_l2:
        ET.SubElement(ET.SubElement(target, "features"), "extended_l2")
    if spec.backing is not None:
        store = ET.SubElement(vol, "backingStore")
        ET.SubElement(store, "path").text = str(spec.backing)
        ET.SubElement(store, "format", type=spec.backing_format or "qcow2")
    return ET.tostring(vol, encoding="unicode")


# -- streams -------------------------------------------------------------------------------

def _send(stream: Any, data: bytes) -> None:
    if len(data) <= _PIECE:  # a whole piece, as reads make them: no copy
        while data:
            sent = stream.send(data)
            if sent < 0:
                raise StorageError(
                    "The upload stream would block; it must be a blocking stream."
                )
            data = data[sent:]
        return
    view = memoryview(data)
    for at in range(0, len(view), _PIECE):
        _send(stream, bytes(view[at : at + _PIECE]))


def _send_pieces(
    stream: Any, pieces: Iterable[Piece], start: int, end: int, dirty_end: int
) -> None:
    """Send ``pieces`` as ``[start, end)``: holes as holes at or past ``dirty_end``."""
    pos = start
    for piece in pieces:
        if isinstance(piece, Hole):
            hi = pos + piece.length
            zeros_to = min(hi, max(pos, dirty_end))
            while pos < zeros_to:
                n = min(_PIECE, zeros_to - pos)
                _send(stream, _ZEROS[:n])
                pos += n
            if hi > pos:
                stream.sendHole(hi - pos, 0)
                pos = hi
        else:
            _send(stream, piece)
            pos += len(piece)
        if pos > end:
            break
    if pos != end:
        raise StorageError(
            f"The bytes to write came to {pos - start}, not the {end - start} announced."
        )


def _receive(stream: Any) -> Iterator[tuple[bytes, int]]:
    """(data, 0) or (b"", hole length) pieces of a download stream, until its end."""
    while True:
        got = stream.recvFlags(_PIECE, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE)
        if got == -3:
            yield b"", int(stream.recvHole(0))
            continue
        if isinstance(got, int):
            raise StorageError("The download stream would block; it must be a blocking stream.")
        if not got:
            return
        yield got, 0


def _abort(stream: Any) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        stream.abort()


def _cleanup(what: str, action: Callable[[], object]) -> None:
    """Undo a partial change; log a failure and carry on, so the original error shows."""
    try:
        action()
    except Exception:
        log.warning("cleanup failed: could not %s", what, exc_info=True)


# -- errors --------------------------------------------------------------------------------

_UNSUPPORTED = (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED)


REFRESH_PATIENCE = 300.0
"""Seconds a refresh waits for the pool's uploads and volume builds to finish."""
IN_USE_PATIENCE = 60.0
"""Seconds an upload waits for a volume that libvirt says is in use (a stream being
opened on it, or a copy being made from it)."""


def _refresh(pool: Any) -> None:
    """Re-read the pool's directory. libvirt refuses while an upload or a volume build
    runs in that pool (another machine's, often): wait for it, that is not an error."""
    deadline = time.monotonic() + REFRESH_PATIENCE
    delay = 0.05
    while True:
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as exc:
            if "asynchronous jobs" not in _detail(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _code(exc: libvirt.libvirtError) -> int:
    return int(exc.get_error_code() or 0)


def _detail(exc: libvirt.libvirtError) -> str:
    lines = (exc.get_error_message() or str(exc) or "unknown error").strip().splitlines()
    return _LEAD_INS.sub("", lines[0] if lines else "unknown error").rstrip(". ")


def _translate(exc: libvirt.libvirtError, action: str, pool: str) -> CorralError:
    code, detail = _code(exc), _detail(exc)
    if code == libvirt.VIR_ERR_NO_STORAGE_POOL:
        return NotFound("storage pool", pool)
    if code == libvirt.VIR_ERR_NO_STORAGE_VOL:
        return StorageError(f"Could not {action}: the volume does not exist.")
    if code == libvirt.VIR_ERR_STORAGE_VOL_EXIST or "already exists" in detail:
        return Conflict(f"Could not {action}: the volume already exists.")
    if "No space left" in detail:
        return NoSpace(f"Could not {action}: the storage pool '{pool}' is full.")
    return StorageError(f"Could not {action}: {detail}.")


def _bytes(root: ET.Element, tag: str) -> int:
    el = root.find(tag)
    if el is None or el.text is None:
        return 0
    scale = {"bytes": 1, "b": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    return int(el.text) * scale.get(el.get("unit", "bytes"), 1)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise StorageError(f"Could not read {path}: {exc.strerror}.") from exc
