"""BlockVolumeBackend's shared verbs, run for real on a backend made for this test whose
"block volumes" are fixed-size files in a directory of their own (this machine has no
device-mapper or Ceph): how files and volumes are told apart, put_file, fetch,
full_clone through ``qemu-img convert -n --target-is-zero``, byte ranges with holes."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from corral.errors import Conflict, NotFound, StorageError
from corral.model import DiskUsage
from corral.storage.block import BlockVolumeBackend
from corral.storage.qemu_img import QemuImgLimits
from corral.storage.sparse import Hole

LIMITS = QemuImgLimits(cpu_seconds=60, address_space=2 << 30)
MiB = 1 << 20


class FileVolumes(BlockVolumeBackend):
    """Volumes as files of a fixed size, rounded up to 4 MiB like LVM's extents."""

    def __init__(self, directory: Path, limits: QemuImgLimits) -> None:
        super().__init__(directory, limits)
        self.devices = directory / "dev"
        self.devices.mkdir(exist_ok=True)

    def volume_path(self, name: str) -> Path:
        return self.devices / name

    def volume_name(self, path: Path) -> str | None:
        return path.name if path.parent == self.devices else None

    def _create(self, name: str, size: int) -> None:
        try:
            with (self.devices / name).open("xb") as f:
                f.truncate(-(-size // (4 * MiB)) * 4 * MiB)
        except FileExistsError:
            raise Conflict(f"Volume {name} already exists.") from None

    def _remove(self, name: str) -> None:
        (self.devices / name).unlink(missing_ok=True)

    def _exists(self, name: str) -> bool:
        return (self.devices / name).exists()

    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        raise AssertionError("not used here")

    def copy(self, source: Path, dest: Path) -> None:
        raise AssertionError("not used here")

    def usage(self, path: Path) -> DiskUsage:
        raise AssertionError("not used here")


@pytest.fixture
def pool(tmp_path: Path) -> FileVolumes:
    (tmp_path / "pool").mkdir()
    return FileVolumes(tmp_path / "pool", LIMITS)


def test_full_clone_converts_a_qcow2_to_a_raw_volume(pool: FileVolumes, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "10M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 2M", str(base)],
                   check=True, capture_output=True)
    dest = pool.volume_path("web-1")
    pool.full_clone(base, dest, 6 * MiB)
    assert pool.exists(dest) and pool.size(dest) == 12 * MiB  # at least 10M, rounded up
    data = dest.read_bytes()
    assert data[MiB:3 * MiB] == b"\xab" * (2 * MiB)
    assert data.count(0) == len(data) - 2 * MiB
    assert dest.stat().st_blocks * 512 <= 3 * MiB  # zeros were not written
    with pytest.raises(Conflict):
        pool.full_clone(base, dest, MiB)
    with pytest.raises(StorageError) as err:
        pool.full_clone(base, tmp_path / "elsewhere", MiB)
    assert err.value.message.startswith("The path ")
    with pytest.raises(NotFound):
        pool.full_clone(tmp_path / "missing.qcow2", pool.volume_path("x"), MiB)
    assert not pool.exists(pool.volume_path("x"))


def test_put_file_fetch_and_ranges_on_a_volume(pool: FileVolumes, tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    with source.open("wb") as f:
        f.truncate(5 * MiB)
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
    dest = pool.volume_path("disk")
    pool.put_file(source, dest)
    assert pool.size(dest) == 8 * MiB
    expected = source.read_bytes() + bytes(3 * MiB)
    assert pool.sha256(dest) == (hashlib.sha256(expected).hexdigest(), 8 * MiB)
    pieces = list(pool.read_range(dest, 0, 8 * MiB))
    assert sum(p.length for p in pieces if isinstance(p, Hole)) == 7 * MiB
    with pytest.raises(Conflict):
        pool.put_file(source, dest)
    fetched = tmp_path / "fetched"
    pool.fetch(dest, fetched)
    assert fetched.read_bytes() == expected
    assert pool.read_tail(dest, 10) == bytes(10)
    # A hole written over data reads back as zeros; the volume keeps its size.
    pool.write_range(dest, 2 * MiB, 3 * MiB, [Hole(MiB)])
    assert dest.read_bytes() == bytes(8 * MiB)
    with pytest.raises(StorageError):
        pool.write_range(dest, 0, 9 * MiB, [Hole(9 * MiB)])
    with pytest.raises(StorageError):
        pool.write_range(dest, 0, MiB, [b"x"])
    with pytest.raises(StorageError):
        pool.create_empty(pool.volume_path("empty"))
    pool.delete(dest)
    pool.delete(dest)
    assert not pool.exists(dest)


def test_files_of_the_pool_stay_files(pool: FileVolumes, tmp_path: Path) -> None:
    source = tmp_path / "seed.iso"
    source.write_bytes(b"CD001" * 100)
    seed = pool.directory / "web-1-seed.iso"
    pool.put_file(source, seed)
    assert seed.read_bytes() == source.read_bytes() and pool.size(seed) == 500
    log = pool.directory / "web-1.log"
    pool.create_empty(log)
    pool.write_range(log, 0, 4, [b"boot"])
    assert pool.read_tail(log, 2) == b"ot"
    pool.delete(log)
    assert not pool.exists(log)
