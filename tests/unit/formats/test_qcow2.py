"""The pure qcow2 header reader and overlay writer, judged by the real qemu-img and qemu-io."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.errors import Conflict, CorruptImage, InvalidInput
from corral.formats.qcow2 import read_qcow2_header, write_overlay

GiB = 1 << 30
SIZES = [GiB, 100 * GiB, 1024 * GiB, GiB + 12345]  # the last is no multiple of a cluster


def qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True)


def header_of(path: Path) -> bytes:
    return path.read_bytes()[: 64 << 10]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", str(path), "1G")
    return path


def overlay(tmp_path: Path, base: Path, size: int) -> Path:
    path = tmp_path / "overlay.qcow2"
    write_overlay(path, backing_file=str(base), backing_format="qcow2", virtual_size=size)
    return path


@pytest.mark.parametrize("size", SIZES)
def test_overlay_passes_qemu_img_check(tmp_path: Path, base: Path, size: int) -> None:
    path = overlay(tmp_path, base, size)
    result = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", "--output=json", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0
    assert report.get("leaks", 0) == 0
    assert report["check-errors"] == 0


@pytest.mark.parametrize("size", SIZES)
def test_overlay_info_names_size_backing_file_and_format(
    tmp_path: Path, base: Path, size: int
) -> None:
    path = overlay(tmp_path, base, size)
    info = json.loads(qemu("qemu-img", "info", "-f", "qcow2", "--output=json", str(path)).stdout)
    assert info["virtual-size"] == -(-size // 512) * 512  # rounded up as qemu-img create does
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    assert info["format-specific"]["data"]["compat"] == "1.1"


@pytest.mark.parametrize("size", SIZES)
def test_overlay_is_laid_out_like_qemu_img_create(tmp_path: Path, base: Path, size: int) -> None:
    ours = overlay(tmp_path, base, size)
    theirs = tmp_path / "theirs.qcow2"
    qemu(
        "qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(theirs), str(size)
    )
    assert read_qcow2_header(header_of(ours)) == read_qcow2_header(header_of(theirs))
    assert ours.stat().st_size == theirs.stat().st_size


@pytest.mark.parametrize("size", SIZES)
def test_overlay_allocates_at_most_256_kib(tmp_path: Path, base: Path, size: int) -> None:
    path = overlay(tmp_path, base, size)
    assert path.stat().st_blocks * 512 <= 256 << 10


def test_writes_land_in_the_overlay_not_the_base(tmp_path: Path, base: Path) -> None:
    path = overlay(tmp_path, base, 10 * GiB)
    base_bytes = base.read_bytes()
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", str(path))

    def verifies(image: Path, pattern: str) -> bool:
        command = ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {pattern} 0 1M", str(image)]
        result = subprocess.run(command, capture_output=True, text=True)
        return result.returncode == 0 and "verification failed" not in result.stdout

    assert verifies(path, "0xab")
    assert verifies(base, "0")
    assert not verifies(base, "0xab")  # so the checks above can fail
    assert base.read_bytes() == base_bytes


def test_refuses_an_existing_file_and_leaves_it_alone(tmp_path: Path, base: Path) -> None:
    path = tmp_path / "taken.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(Conflict, match="already exists"):
        write_overlay(path, backing_file=str(base), backing_format="qcow2", virtual_size=GiB)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize(
    ("backing_file", "backing_format", "virtual_size"),
    [("/b", "qcow2", 0), ("/b", "vhdx", GiB), ("/" + "b" * 1024, "qcow2", GiB), ("", "raw", GiB)],
)
def test_refuses_impossible_arguments_without_leaving_a_file(
    tmp_path: Path, backing_file: str, backing_format: str, virtual_size: int
) -> None:
    path = tmp_path / "x.qcow2"
    with pytest.raises(InvalidInput):
        write_overlay(
            path,
            backing_file=backing_file,
            backing_format=backing_format,
            virtual_size=virtual_size,
        )
    assert not path.exists()


def test_reads_a_v2_header(tmp_path: Path) -> None:
    path = tmp_path / "old.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", str(path), "5G")
    header = read_qcow2_header(header_of(path))
    assert (header.version, header.size, header.backing_file) == (2, 5 * GiB, None)
    assert not header.has_external_data_file


def test_reads_an_external_data_file(tmp_path: Path) -> None:
    path = tmp_path / "split.qcow2"
    data = tmp_path / "data.raw"
    qemu("qemu-img", "create", "-f", "qcow2", "-o", f"data_file={data}", str(path), "1G")
    header = read_qcow2_header(header_of(path))
    assert header.has_external_data_file
    assert header.data_file == str(data)


def test_skips_unknown_extensions(tmp_path: Path, base: Path) -> None:
    path = overlay(tmp_path, base, GiB)
    data = bytearray(header_of(path))
    data[112:116] = struct.pack(">I", 0x12345678)  # the backing format extension, renamed
    header = read_qcow2_header(bytes(data))
    assert (header.backing_file, header.backing_format) == (str(base), None)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda h: h[:60], "truncated"),
        (lambda h: h[:90], "truncated"),
        (lambda h: b"QFI\x00" + h[4:], "magic"),
        (lambda h: h[:4] + struct.pack(">I", 7) + h[8:], "version 7"),
        (lambda h: h[:20] + struct.pack(">I", 40) + h[24:], "cluster size"),
        # The backing format extension claims 60000 bytes, past the end of the header.
        (lambda h: h[:116] + struct.pack(">I", 60000) + h[120:], "overruns"),
        (lambda h: h[:120], "truncated inside its header extensions"),
        (lambda h: h[:140], "truncated before its backing file name"),
    ],
)
def test_garbled_headers_are_corrupt_with_one_clear_sentence(
    tmp_path: Path, base: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    good = header_of(overlay(tmp_path, base, GiB))
    with pytest.raises(CorruptImage, match=message) as caught:
        read_qcow2_header(damage(good))
    assert caught.value.message.endswith(".")
    assert caught.value.message.count(". ") == 0
