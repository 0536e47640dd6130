"""send_file into a real dir pool on qemu:///system: sparse, resumable, verified.

The pool is ``corral-test-<random>`` under /var/tmp, removed with its files afterwards,
pass or fail. It is local here, so the tests look at (and damage) its files directly.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from corral.errors import CorruptImage, StorageError
from corral.images.transfer import partial_marker, send_file, transfer_complete
from corral.storage.libvirt_pool import LibvirtPoolBackend
from tests.libvirt_cleanup import remove_prefixed

QEMU_URI = "qemu:///system"
MiB = 1 << 20


class Stop(Exception):
    pass


def send_first_chunk(source: Path, digest: str, pool: Pool, dest: Path, chunk: int) -> list[int]:
    """Start sending, and crash right after the first chunk; the progress it reported."""
    recorded: list[int] = []

    def crash_after_first(done: int) -> None:
        recorded.append(done)
        raise Stop

    with pytest.raises(Stop):
        send_file(source, digest, pool.backend, dest, on_progress=crash_after_first,
                  chunk=chunk)
    return recorded


@dataclass
class Pool:
    backend: LibvirtPoolBackend
    root: Path
    scratch: Path


@pytest.fixture
def pool() -> Iterator[Pool]:
    prefix = f"corral-test-{secrets.token_hex(3)}"
    top = Path("/var/tmp") / prefix
    root, scratch = top / "pool", top / "scratch"
    scratch.mkdir(parents=True)
    try:
        try:
            conn = libvirt.open(QEMU_URI)
        except libvirt.libvirtError as exc:
            pytest.skip(f"qemu:///system is not reachable: {exc}")
        try:
            el = ET.Element("pool", type="dir")
            ET.SubElement(el, "name").text = prefix
            ET.SubElement(ET.SubElement(el, "target"), "path").text = str(root)
            p = conn.storagePoolDefineXML(ET.tostring(el, encoding="unicode"), 0)
            p.build(0)
            p.create(0)
            yield Pool(LibvirtPoolBackend(lambda: conn, prefix, root), root, scratch)
        finally:
            conn.close()
            remove_prefixed(QEMU_URI, prefix)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def sparse_qcow2(path: Path, size: str, writes: list[tuple[int, str, str]]) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    for pattern, offset, length in writes:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(path)],
            check=True, capture_output=True,
        )
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(MiB):
            digest.update(data)
    return digest.hexdigest()


def test_sparse_qcow2_arrives_whole_and_sparse(pool: Pool) -> None:
    source = pool.scratch / "golden.qcow2"
    digest = sparse_qcow2(source, "1G", [(0xAB, 0, "10M"), (0xCD, 512 * MiB, "2M")])
    dest = pool.root / "base-golden.qcow2"
    seen: list[int] = []
    send_file(source, digest, pool.backend, dest, on_progress=seen.append, chunk=4 * MiB)
    assert seen[-1] == source.stat().st_size
    assert seen == sorted(seen)
    assert sha256_of(dest) == digest
    assert transfer_complete(pool.backend, dest)
    assert not pool.backend.exists(partial_marker(dest))
    assert dest.stat().st_blocks * 512 < 2 * source.stat().st_blocks * 512 + MiB
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", "--output=json", str(dest)],
        check=True, capture_output=True, text=True,
    ).stdout)
    assert info["virtual-size"] == 1 << 30
    subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(dest)], check=True)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
                    str(source), str(dest)], check=True)
    # Sending again finds it whole and verified, and sends nothing more.
    again: list[int] = []
    send_file(source, digest, pool.backend, dest, on_progress=again.append)
    assert again == [source.stat().st_size]


def test_interrupted_transfer_resumes_from_the_recorded_offset(pool: Pool) -> None:
    source = pool.scratch / "golden.qcow2"
    digest = sparse_qcow2(source, "256M", [(0xAB, 0, "6M"), (0xEF, 100 * MiB, "3M")])
    size = source.stat().st_size
    dest = pool.root / "base-golden.qcow2"
    recorded = send_first_chunk(source, digest, pool, dest, chunk=2 * MiB)
    assert recorded == [2 * MiB]
    assert not transfer_complete(pool.backend, dest)  # the marker says "incomplete"

    resumed: list[int] = []
    send_file(source, digest, pool.backend, dest, offset=recorded[-1],
              on_progress=resumed.append, chunk=2 * MiB)
    assert resumed[0] == 4 * MiB and resumed[-1] == size
    assert sha256_of(dest) == digest
    assert transfer_complete(pool.backend, dest)


def test_resume_rewrites_bytes_a_cut_off_chunk_left(pool: Pool) -> None:
    # A raw sparse file (any file is sent byte for byte): a qcow2 file has few holes,
    # and the hole at 4-9 MiB is what a sparse upload would not clear.
    source = pool.scratch / "golden.raw"
    with source.open("wb") as f:
        f.truncate(16 * MiB)
        f.write(b"\xab" * MiB)
        f.seek(9 * MiB)
        f.write(b"\xcd" * MiB)
    digest = sha256_of(source)
    dest = pool.root / "base.raw"
    recorded: list[int] = []

    def crash_at_8m(done: int) -> None:
        recorded.append(done)
        if done >= 8 * MiB:
            raise Stop

    with pytest.raises(Stop):
        send_file(source, digest, pool.backend, dest, on_progress=crash_at_8m, chunk=4 * MiB)
    # The caller recorded 4 MiB; a chunk it never recorded wrote past it, with garbage.
    with dest.open("r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x5a" * MiB)
    send_file(source, digest, pool.backend, dest, offset=4 * MiB, chunk=4 * MiB)
    assert sha256_of(dest) == digest
    assert dest.stat().st_blocks * 512 < 8 * MiB  # holes past the damage stayed holes


def test_restart_from_zero_works(pool: Pool) -> None:
    source = pool.scratch / "golden.qcow2"
    digest = sparse_qcow2(source, "64M", [(0xAB, 0, "3M")])
    dest = pool.root / "base.qcow2"
    with pytest.raises(Stop):
        send_file(source, digest, pool.backend, dest,
                  on_progress=lambda _done: (_ for _ in ()).throw(Stop), chunk=MiB)
    send_file(source, digest, pool.backend, dest, chunk=MiB)
    assert sha256_of(dest) == digest
    assert transfer_complete(pool.backend, dest)


def test_corrupted_destination_is_detected_and_removed(pool: Pool) -> None:
    source = pool.scratch / "golden.qcow2"
    digest = sparse_qcow2(source, "64M", [(0xAB, 0, "4M")])
    dest = pool.root / "base.qcow2"
    recorded = send_first_chunk(source, digest, pool, dest, chunk=MiB)
    with dest.open("r+b") as f:  # damage the bytes already sent, behind libvirt's back
        f.seek(4096)
        f.write(b"garbage!" * 512)
    with pytest.raises(CorruptImage) as err:
        send_file(source, digest, pool.backend, dest, offset=recorded[-1], chunk=MiB)
    assert "does not match" in err.value.message and "\n" not in str(err.value)
    assert not pool.backend.exists(dest)
    assert not pool.backend.exists(partial_marker(dest))
    assert not dest.exists()


def test_resume_without_a_transfer_under_way_is_refused(pool: Pool) -> None:
    source = pool.scratch / "golden.qcow2"
    digest = sparse_qcow2(source, "16M", [(0xAB, 0, "1M")])
    with pytest.raises(StorageError) as err:
        send_file(source, digest, pool.backend, pool.root / "base.qcow2", offset=65536)
    assert "start again from byte 0" in str(err.value)
