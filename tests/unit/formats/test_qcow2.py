"""The pure qcow2 header reader and overlay writer, judged by the real qemu-img and qemu-io."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.errors import Conflict, CorruptImage, InvalidInput
from corral.formats.qcow2 import (
    OVERLAY_CLUSTER_BITS,
    OVERLAY_EXTENDED_L2,
    read_qcow2_header,
    write_overlay,
)

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
    l2 = "on" if OVERLAY_EXTENDED_L2 else "off"
    qemu(
        "qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
        "-o", f"cluster_size={1 << OVERLAY_CLUSTER_BITS},extended_l2={l2}", str(theirs), str(size),
    )
    assert read_qcow2_header(header_of(ours)) == read_qcow2_header(header_of(theirs))
    assert ours.stat().st_size == theirs.stat().st_size


def test_overlay_defaults_are_128_kib_clusters_with_subclusters(
    tmp_path: Path, base: Path
) -> None:
    """What bench/first_write chose: QEMU itself must report them."""
    path = overlay(tmp_path, base, 10 * GiB)
    info = json.loads(qemu("qemu-img", "info", "-f", "qcow2", "--output=json", str(path)).stdout)
    assert info["cluster-size"] == 128 << 10
    assert info["format-specific"]["data"]["extended-l2"] is True
    header = read_qcow2_header(header_of(path))
    assert (header.cluster_size, header.extended_l2) == (128 << 10, True)
    assert header.l1_size == 10  # one L2 table of 8192 16-byte entries maps 1 GiB


@pytest.mark.parametrize(("cluster_bits", "extended_l2"),
                         [(16, False), (14, True), (16, True), (18, True), (21, True), (21, False)])
@pytest.mark.parametrize("size", [GiB + 12345, 1024 * GiB])
def test_every_cluster_size_and_subcluster_choice_is_what_qemu_img_makes(
    tmp_path: Path, base: Path, cluster_bits: int, extended_l2: bool, size: int
) -> None:
    ours = tmp_path / "ours.qcow2"
    write_overlay(ours, backing_file=str(base), backing_format="qcow2", virtual_size=size,
                  cluster_bits=cluster_bits, extended_l2=extended_l2)
    theirs = tmp_path / "theirs.qcow2"
    qemu(
        "qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(base), "-o",
        f"cluster_size={1 << cluster_bits},extended_l2={'on' if extended_l2 else 'off'}",
        str(theirs), str(size),
    )
    assert read_qcow2_header(header_of(ours)) == read_qcow2_header(header_of(theirs))
    assert ours.stat().st_size == theirs.stat().st_size
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(ours)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    info = json.loads(qemu("qemu-img", "info", "-f", "qcow2", "--output=json", str(ours)).stdout)
    assert info["cluster-size"] == 1 << cluster_bits
    assert info["format-specific"]["data"]["extended-l2"] is extended_l2


def test_a_4k_write_into_a_subcluster_overlay_copies_nothing_from_the_base(
    tmp_path: Path, base: Path
) -> None:
    """The point of subclusters: the rest of the cluster still reads from the base, and
    the overlay holds only the written 4 KiB (plus its tables), not a whole cluster."""
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(base))
    path = overlay(tmp_path, base, GiB)
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 128k 4k", str(path))
    for pattern, offset, length in (("0x22", "128k", "4k"), ("0x11", "132k", "124k"),
                                    ("0x11", "0", "128k")):
        out = qemu("qemu-io", "-r", "-f", "qcow2", "-c",
                   f"read -P {pattern} {offset} {length}", str(path)).stdout
        assert "verification failed" not in out, (pattern, offset, out)
    allocated = json.loads(qemu("qemu-img", "map", "-f", "qcow2", "--output=json",
                                str(path)).stdout)
    in_overlay = [e for e in allocated if e["depth"] == 0 and e["data"]]
    assert [(e["start"], e["length"]) for e in in_overlay] == [(128 << 10, 4 << 10)]
    # The new data cluster is the last thing in the file, and only its 4 KiB were written
    # (with 64 KiB clusters and no subclusters the file would end a whole cluster later).
    assert path.stat().st_size == in_overlay[0]["offset"] + (4 << 10)


@pytest.mark.parametrize(("cluster_bits", "extended_l2"), [(13, True), (22, False), (8, False)])
def test_refuses_cluster_sizes_qemu_refuses(
    tmp_path: Path, base: Path, cluster_bits: int, extended_l2: bool
) -> None:
    path = tmp_path / "x.qcow2"
    with pytest.raises(InvalidInput):
        write_overlay(path, backing_file=str(base), backing_format="qcow2", virtual_size=GiB,
                      cluster_bits=cluster_bits, extended_l2=extended_l2)
    assert not path.exists()


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
