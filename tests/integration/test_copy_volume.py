"""copy_volume between two real dir pools on qemu:///system: sparse, pipelined, verified.

Both pools are ``corral-test-<random>-{a,b}`` under /var/tmp, removed with their files
afterwards, pass or fail. They are local here, so the tests look at (and damage) the
files directly. Faults are injected by subclasses of the real backend, never by mocks.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from corral.errors import CorruptImage, NotFound, StorageError
from corral.images.transfer import copy_volume, partial_marker, transfer_complete
from corral.storage.base import Piece
from corral.storage.libvirt_pool import LibvirtPoolBackend
from corral.storage.qcow2_dir import Qcow2DirBackend
from corral.storage.qemu_img import QemuImgLimits
from tests.libvirt_cleanup import remove_prefixed

QEMU_URI = "qemu:///system"
MiB = 1 << 20


class Stop(Exception):
    pass


@dataclass
class Pools:
    conn: libvirt.virConnect
    source: LibvirtPoolBackend
    dest: LibvirtPoolBackend
    prefix: str
    scratch: Path

    def backend(self, cls: type[LibvirtPoolBackend]) -> LibvirtPoolBackend:
        """Another backend on the destination pool (a subclass that injects a fault)."""
        return cls(lambda: self.conn, self.dest.pool_name, self.dest.pool_path)


@pytest.fixture
def pools() -> Iterator[Pools]:
    prefix = f"corral-test-{secrets.token_hex(3)}"
    top = Path("/var/tmp") / prefix
    (top / "scratch").mkdir(parents=True)
    try:
        try:
            conn = libvirt.open(QEMU_URI)
        except libvirt.libvirtError as exc:
            pytest.skip(f"qemu:///system is not reachable: {exc}")
        try:
            backends = []
            for side in ("a", "b"):
                el = ET.Element("pool", type="dir")
                ET.SubElement(el, "name").text = f"{prefix}-{side}"
                ET.SubElement(ET.SubElement(el, "target"), "path").text = str(top / side)
                p = conn.storagePoolDefineXML(ET.tostring(el, encoding="unicode"), 0)
                p.build(0)
                p.create(0)
                backends.append(LibvirtPoolBackend(lambda: conn, f"{prefix}-{side}", top / side))
            yield Pools(conn, backends[0], backends[1], prefix, top / "scratch")
        finally:
            conn.close()
            remove_prefixed(QEMU_URI, prefix)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def sparse_raw(path: Path, size: int, pieces: dict[int, bytes]) -> bytes:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return path.read_bytes()


def copy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("copy-")]


def test_sparse_volume_arrives_whole_with_its_holes(pools: Pools) -> None:
    src = pools.source.pool_path / "disk.raw"
    content = sparse_raw(src, 40 * MiB, {0: os.urandom(3 * MiB), 17 * MiB: os.urandom(MiB),
                                         29 * MiB + 5: os.urandom(4 * MiB)})
    dest = pools.dest.pool_path / "disk.raw"
    seen: list[int] = []
    copy_volume(pools.source, src, pools.dest, dest, on_progress=seen.append, chunk=8 * MiB)
    assert seen == [8 * MiB, 16 * MiB, 24 * MiB, 32 * MiB, 40 * MiB]
    assert dest.read_bytes() == content
    assert dest.stat().st_blocks * 512 < 10 * MiB  # holes crossed and stayed holes
    assert transfer_complete(pools.dest, dest)
    assert not partial_marker(dest).exists()
    assert copy_threads() == []


def test_qcow2_disk_is_byte_exact_and_still_a_valid_image(pools: Pools) -> None:
    src = pools.source.pool_path / "web-1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "256M"], check=True)
    for pattern, offset in ((0xAB, "0"), (0xCD, "100M"), (0xEF, "200M")):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} 5M",
                        str(src)], check=True, capture_output=True)
    dest = pools.dest.pool_path / "web-1.qcow2"
    copy_volume(pools.source, src, pools.dest, dest, chunk=4 * MiB)  # an uneven last chunk
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(dest)], check=True)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(src),
                    str(dest)], check=True)


def test_a_leftover_attempt_is_replaced(pools: Pools) -> None:
    src = pools.source.pool_path / "seed.iso"
    content = sparse_raw(src, 6 * MiB, {MiB: os.urandom(MiB)})
    dest = pools.dest.pool_path / "seed.iso"
    # An earlier attempt died: its marker, and a longer file of other bytes.
    sparse_raw(dest, 9 * MiB, {0: b"\xff" * (9 * MiB)})
    partial_marker(dest).touch()
    copy_volume(pools.source, src, pools.dest, dest, chunk=2 * MiB)
    assert dest.read_bytes() == content
    assert transfer_complete(pools.dest, dest)


def test_an_empty_volume_and_a_local_source(pools: Pools) -> None:
    empty = pools.source.pool_path / "empty.img"
    empty.touch()
    copy_volume(pools.source, empty, pools.dest, pools.dest.pool_path / "empty.img")
    assert (pools.dest.pool_path / "empty.img").read_bytes() == b""
    assert transfer_complete(pools.dest, pools.dest.pool_path / "empty.img")
    # The contract composes across backends: a local directory into a libvirt pool.
    local = Qcow2DirBackend(pools.scratch, QemuImgLimits(cpu_seconds=60, address_space=1 << 30))
    content = sparse_raw(pools.scratch / "disk.raw", 5 * MiB, {4 * MiB: os.urandom(MiB // 2)})
    dest = pools.dest.pool_path / "disk.raw"
    copy_volume(local, pools.scratch / "disk.raw", pools.dest, dest, chunk=MiB)
    assert dest.read_bytes() == content


class FlipsAByteAfterWriting(LibvirtPoolBackend):
    """Damages the file behind libvirt's back once the chunk at 4 MiB is written."""

    def write_range(self, dest: Path, start: int, end: int, pieces: Iterable[Piece]) -> None:
        super().write_range(dest, start, end, pieces)
        if start == 4 * MiB:
            with dest.open("r+b") as f:
                f.seek(start + 12345)
                byte = f.read(1)
                f.seek(start + 12345)
                f.write(bytes([byte[0] ^ 0x01]))


def test_a_destination_damaged_before_its_read_back_is_caught_and_removed(
    pools: Pools,
) -> None:
    src = pools.source.pool_path / "disk.raw"
    sparse_raw(src, 16 * MiB, {0: os.urandom(16 * MiB)})
    dest = pools.dest.pool_path / "disk.raw"
    seen: list[int] = []
    with pytest.raises(CorruptImage) as err:
        copy_volume(pools.source, src, pools.backend(FlipsAByteAfterWriting), dest,
                    on_progress=seen.append, chunk=4 * MiB)
    assert "chunk 2 of 4" in err.value.message and "\n" not in str(err.value)
    assert seen == [4 * MiB]  # the first chunk was verified; nothing after the bad one
    assert not pools.dest.exists(dest) and not dest.exists()
    assert not pools.dest.exists(partial_marker(dest))
    assert copy_threads() == []


class FailsOnThirdWrite(LibvirtPoolBackend):
    writes = 0

    def write_range(self, dest: Path, start: int, end: int, pieces: Iterable[Piece]) -> None:
        self.writes += 1
        if self.writes == 3:
            raise StorageError("The host went away.")
        super().write_range(dest, start, end, pieces)


def test_a_failure_mid_copy_leaves_the_marker_and_no_thread(pools: Pools) -> None:
    src = pools.source.pool_path / "disk.raw"
    sparse_raw(src, 20 * MiB, {0: os.urandom(20 * MiB)})
    dest = pools.dest.pool_path / "disk.raw"
    seen: list[int] = []
    failing = pools.backend(FailsOnThirdWrite)
    with pytest.raises(StorageError, match="went away"):
        copy_volume(pools.source, src, failing, dest, on_progress=seen.append, chunk=4 * MiB)
    assert seen == [4 * MiB, 8 * MiB]  # the chunks before the failure were verified
    assert pools.dest.exists(dest)
    assert pools.dest.exists(partial_marker(dest))
    assert not transfer_complete(pools.dest, dest)
    assert copy_threads() == []


def test_progress_that_raises_stops_the_copy_with_the_marker_left(pools: Pools) -> None:
    src = pools.source.pool_path / "disk.raw"
    sparse_raw(src, 64 * MiB, {0: os.urandom(64 * MiB)})
    dest = pools.dest.pool_path / "disk.raw"

    def stop(_done: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        copy_volume(pools.source, src, pools.dest, dest, on_progress=stop, chunk=4 * MiB)
    assert copy_threads() == []
    assert pools.dest.exists(partial_marker(dest))
    assert pools.dest.size(dest) < 64 * MiB  # stopped early, not after the whole copy


def test_a_missing_source_creates_nothing(pools: Pools) -> None:
    dest = pools.dest.pool_path / "disk.raw"
    with pytest.raises(NotFound):
        copy_volume(pools.source, pools.source.pool_path / "nope.raw", pools.dest, dest)
    assert not pools.dest.exists(dest)
    assert not pools.dest.exists(partial_marker(dest))
