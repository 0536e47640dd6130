"""Pure inspection of untrusted images, on files qemu-img makes and on hand-made hostile ones."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from corral.errors import CorruptImage, NotFound, UnsafeImage
from corral.formats.image_inspect import detect_format, inspect_image
from corral.model.states import ImageFormat

MiB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def make(tmp_path: Path, kind: str, size: str = "64M") -> Path:
    """An empty image of ``kind``: qcow2, raw, vdi, or a VMDK subformat."""
    fmt, _, subformat = kind.partition(":")
    path = tmp_path / f"image.{fmt}"
    options = ["-o", f"subformat={subformat}"] if subformat else []
    qemu_img("create", "-f", fmt, *options, str(path), size)
    return path


def descriptor(extent: str, create_type: str = "monolithicFlat") -> str:
    return (
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n\n# Extent description\n{extent}\n'
    )


def sparse_vmdk_with_descriptor(
    tmp_path: Path, text: str, *, zero_capacity: bool = True, name: str = "image.vmdk"
) -> Path:
    """A monolithicSparse VMDK whose embedded descriptor is replaced by ``text``.

    With capacity 0, qemu opens the descriptor's extents instead of the file's grains.
    """
    path = tmp_path / name
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicSparse", str(path), "1M")
    data = bytearray(path.read_bytes())
    _, _, _, _, _, desc_offset, desc_size = struct.unpack_from("<4sIIQQQQ", data)
    if zero_capacity:
        struct.pack_into("<Q", data, 12, 0)
    data[desc_offset * 512 : (desc_offset + desc_size) * 512] = text.encode().ljust(
        desc_size * 512, b"\0"
    )
    path.write_bytes(data)
    return path


GOOD = [
    ("qcow2", ImageFormat.QCOW2),
    ("raw", ImageFormat.RAW),
    ("vdi", ImageFormat.VDI),
    ("vmdk:monolithicSparse", ImageFormat.VMDK),
    ("vmdk:streamOptimized", ImageFormat.VMDK),
]


@pytest.mark.parametrize(("kind", "fmt"), GOOD)
def test_detects_what_qemu_img_writes(tmp_path: Path, kind: str, fmt: ImageFormat) -> None:
    assert detect_format(make(tmp_path, kind).read_bytes()[: 4 * MiB]) is fmt


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (descriptor('RW 2048 FLAT "x-flat.vmdk" 0').encode(), ImageFormat.VMDK),
        # qemu probes this as VMDK too: only comments and blank lines before "version=".
        (b"# made by hand\n   \nversion=1\nCID=1\n", ImageFormat.VMDK),
        (b"version=4\n", ImageFormat.RAW),
        (b"", ImageFormat.RAW),
        (b"\xeb\x63\x90" + bytes(509), ImageFormat.RAW),
        (bytes(0x40) + struct.pack("<I", 0xBEDA107F), ImageFormat.VDI),
        (b"COWD" + bytes(60), ImageFormat.VMDK),
    ],
)
def test_detects_signatures(head: bytes, fmt: ImageFormat) -> None:
    assert detect_format(head) is fmt


@pytest.mark.parametrize(("kind", "fmt"), GOOD)
def test_accepts_self_contained_images(tmp_path: Path, kind: str, fmt: ImageFormat) -> None:
    path = make(tmp_path, kind, "96M")
    for declared in (None, fmt):
        inspection = inspect_image(path, declared)
        assert inspection.format is fmt
        assert inspection.virtual_size == 96 * MiB


def test_reports_the_vmdk_create_type(tmp_path: Path) -> None:
    inspection = inspect_image(make(tmp_path, "vmdk:streamOptimized"), None)
    assert inspection.details["create_type"] == "streamOptimized"


def test_refuses_a_qcow2_with_a_backing_file(tmp_path: Path) -> None:
    path = tmp_path / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/passwd", str(path), "1G")
    with pytest.raises(UnsafeImage, match=r"backing file \('/etc/passwd'\)"):
        inspect_image(path, None)


def test_refuses_a_qcow2_with_an_external_data_file(tmp_path: Path) -> None:
    path = tmp_path / "split.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data'}", str(path), "1G")
    with pytest.raises(UnsafeImage, match="external file"):
        inspect_image(path, None)


def test_refuses_the_data_file_feature_bit_alone(tmp_path: Path) -> None:
    path = make(tmp_path, "qcow2")
    data = bytearray(path.read_bytes())
    struct.pack_into(">Q", data, 72, 1 << 2)  # incompatible feature: external data file
    path.write_bytes(data)
    with pytest.raises(UnsafeImage, match="external file"):
        inspect_image(path, None)


@pytest.mark.parametrize(
    "extent",
    [
        'RW 2048 FLAT "/etc/passwd" 0',
        'RW 2048 SPARSE "/etc/passwd"',
        'RDONLY 2048 FLAT "neighbour-flat.vmdk" 0',
        'RW 2048 SPARSE "../escape.vmdk"',
    ],
)
def test_refuses_a_vmdk_text_descriptor(tmp_path: Path, extent: str) -> None:
    path = tmp_path / "desc.vmdk"
    path.write_text(descriptor(extent))
    with pytest.raises(UnsafeImage, match="extent") as caught:
        inspect_image(path, None)
    assert extent.split('"')[1] in caught.value.message


def test_refuses_a_text_descriptor_even_without_extents(tmp_path: Path) -> None:
    path = tmp_path / "desc.vmdk"
    path.write_text(descriptor("", create_type="monolithicSparse"))
    with pytest.raises(UnsafeImage, match="descriptor file"):
        inspect_image(path, None)


@pytest.mark.parametrize("zero_capacity", [True, False])
def test_refuses_a_sparse_vmdk_whose_descriptor_names_a_host_file(
    tmp_path: Path, zero_capacity: bool
) -> None:
    text = descriptor('RW 2048 FLAT "/etc/passwd" 0')
    path = sparse_vmdk_with_descriptor(tmp_path, text, zero_capacity=zero_capacity)
    with pytest.raises(UnsafeImage, match="/etc/passwd"):
        inspect_image(path, None)


def test_refuses_a_sparse_vmdk_with_a_foreign_create_type(tmp_path: Path) -> None:
    text = descriptor('RW 2048 SPARSE "image.vmdk"', create_type="twoGbMaxExtentSparse")
    path = sparse_vmdk_with_descriptor(tmp_path, text)
    with pytest.raises(UnsafeImage, match="twoGbMaxExtentSparse"):
        inspect_image(path, None)


def test_refuses_a_sparse_vmdk_with_two_extents(tmp_path: Path) -> None:
    text = descriptor('RW 2048 SPARSE "image.vmdk"\nRW 2048 SPARSE "image-s002.vmdk"')
    path = sparse_vmdk_with_descriptor(tmp_path, text.replace("monolithicFlat", "monolithicSparse"))
    with pytest.raises(UnsafeImage, match="extent"):
        inspect_image(path, None)


def test_refuses_a_vmdk_with_a_parent(tmp_path: Path) -> None:
    parent = make(tmp_path, "vmdk:monolithicSparse")
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-f", "vmdk", "-F", "vmdk", "-b", str(parent), str(child), "64M")
    with pytest.raises(UnsafeImage, match="parent image"):
        inspect_image(child, None)


def test_refuses_a_monolithic_flat_vmdk(tmp_path: Path) -> None:
    path = make(tmp_path, "vmdk:monolithicFlat", "1M")
    with pytest.raises(UnsafeImage, match=r"image-flat\.vmdk"):
        inspect_image(path, None)


@pytest.mark.parametrize("kind", ["qcow2", "vdi", "vmdk:monolithicSparse", "vmdk:streamOptimized"])
def test_refuses_an_image_declared_raw_that_is_not(tmp_path: Path, kind: str) -> None:
    made = make(tmp_path, kind)
    path = made.rename(tmp_path / "disk.img")
    with pytest.raises(UnsafeImage, match="declared raw but its contents are"):
        inspect_image(path, ImageFormat.RAW)


def test_refuses_a_raw_image_declared_qcow2(tmp_path: Path) -> None:
    with pytest.raises(UnsafeImage, match="declared qcow2 but its contents are raw"):
        inspect_image(make(tmp_path, "raw"), ImageFormat.QCOW2)


@pytest.mark.parametrize(
    ("kind", "keep"),
    [("qcow2", 50), ("qcow2", 0x30000), ("vdi", 0x100), ("vmdk:monolithicSparse", 40)],
)
def test_truncated_headers_are_corrupt(tmp_path: Path, kind: str, keep: int) -> None:
    path = make(tmp_path, kind)
    os.truncate(path, keep)
    with pytest.raises(CorruptImage, match="truncated"):
        inspect_image(path, None)


def test_refuses_a_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link.qcow2"
    link.symlink_to(make(tmp_path, "qcow2"))
    with pytest.raises(UnsafeImage, match="symbolic link"):
        inspect_image(link, None)


def test_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.img"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeImage, match="not a regular file"):
        inspect_image(fifo, None)


def test_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        inspect_image(tmp_path / "nothing.qcow2", None)


def test_reads_a_bounded_prefix_of_a_large_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make(tmp_path, "vmdk:monolithicSparse", "1T")
    assert path.stat().st_size > 64 * MiB
    requested: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        requested.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    inspect_image(path, None)
    assert 0 < sum(requested) <= 4 * MiB
