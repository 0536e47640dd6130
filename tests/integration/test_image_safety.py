"""vet_image and the qemu-img runner against real qemu-img, on good and hostile images.

For every hostile image, a canary file stands for the host file the image points at; an
inotify watch proves vet_image never opens it, and a control run of plain qemu-img proves
the image really would make qemu open it.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from corral.config import Settings
from corral.errors import Conflict, CorruptImage, InvalidInput, NotFound, StorageError, UnsafeImage
from corral.images.safety import VettedImage, vet_image
from corral.model.states import ImageFormat
from corral.storage import qemu_img
from corral.storage.qemu_img import QemuImgLimits

MiB = 1 << 20
_SETTINGS = Settings()
LIMITS = QemuImgLimits(
    cpu_seconds=_SETTINGS.qemu_img_cpu_seconds, address_space=_SETTINGS.qemu_img_address_space
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True)


def data_image(tmp_path: Path, kind: str, size: int = 8 * MiB) -> Path:
    """An image of ``kind`` (format or vmdk:subformat) holding a recognisable pattern."""
    raw = tmp_path / "source.raw"
    if not raw.exists():
        raw.write_bytes(bytes(size))
        run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {size // 2}", str(raw))
    fmt, _, subformat = kind.partition(":")
    path = tmp_path / f"{subformat or fmt}.{fmt}"
    options = ["-o", f"subformat={subformat}"] if subformat else []
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(raw), str(path))
    return path


def descriptor(extent_file: str) -> str:
    return (
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n\nRW 2048 FLAT "{extent_file}" 0\n'
    )


def sparse_vmdk_naming(tmp_path: Path, extent_file: str) -> Path:
    """A sparse VMDK with capacity 0, which makes qemu open its embedded descriptor's extents."""
    path = tmp_path / "embedded.vmdk"
    run("qemu-img", "create", "-f", "vmdk", "-o", "subformat=monolithicSparse", str(path), "1M")
    data = bytearray(path.read_bytes())
    desc_offset, desc_size = struct.unpack_from("<QQ", data, 28)
    struct.pack_into("<Q", data, 12, 0)
    text = descriptor(extent_file).encode().ljust(desc_size * 512, b"\0")
    data[desc_offset * 512 : (desc_offset + desc_size) * 512] = text
    path.write_bytes(data)
    return path


# Each builder makes (image, declared format, the canary it points at, the qemu-img
# arguments that, run plainly on the image, open the canary).
Case = tuple[Path, ImageFormat | None, Path, tuple[str, ...]]
QCOW2_CHECK = ("check", "-f", "qcow2")
VMDK_INFO = ("info", "-f", "vmdk")
VMDK_CHECK = ("check", "-f", "vmdk")


def qcow2_backing(tmp_path: Path, name: str = "child.qcow2") -> Case:
    canary = tmp_path / "canary.raw"
    canary.write_bytes(bytes(MiB))
    image = tmp_path / name
    run("qemu-img", "create", "-f", "qcow2", "-u", "-F", "raw", "-b", str(canary), str(image), "1M")
    return image, None, canary, QCOW2_CHECK


def qcow2_data_file(tmp_path: Path) -> Case:
    canary, image = tmp_path / "canary.raw", tmp_path / "split.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", f"data_file={canary}", str(image), "1M")
    return image, None, canary, QCOW2_CHECK


def vmdk_text_descriptor(tmp_path: Path, name: str = "desc.vmdk") -> Case:
    canary = tmp_path / "canary.raw"
    canary.write_bytes(bytes(MiB))
    image = tmp_path / name
    image.write_text(descriptor(str(canary)))
    return image, None, canary, VMDK_INFO


def vmdk_embedded_descriptor(tmp_path: Path) -> Case:
    canary = tmp_path / "canary.raw"
    canary.write_bytes(bytes(MiB))
    return sparse_vmdk_naming(tmp_path, str(canary)), None, canary, VMDK_INFO


def vmdk_parent(tmp_path: Path) -> Case:
    canary, image = tmp_path / "canary.vmdk", tmp_path / "child.vmdk"
    run("qemu-img", "create", "-f", "vmdk", str(canary), "1M")
    run("qemu-img", "create", "-f", "vmdk", "-F", "vmdk", "-b", str(canary), str(image), "1M")
    return image, None, canary, VMDK_CHECK


def qcow2_declared_raw(tmp_path: Path) -> Case:
    image, _, canary, opener = qcow2_backing(tmp_path, name="disk.img")
    return image, ImageFormat.RAW, canary, opener


def vmdk_declared_raw(tmp_path: Path) -> Case:
    image, _, canary, opener = vmdk_text_descriptor(tmp_path, name="disk.img")
    return image, ImageFormat.RAW, canary, opener


HOSTILE: list[Callable[[Path], Case]] = [
    qcow2_backing,
    qcow2_data_file,
    vmdk_text_descriptor,
    vmdk_embedded_descriptor,
    vmdk_parent,
    qcow2_declared_raw,
    vmdk_declared_raw,
]


@contextmanager
def canary_watch(canary: Path) -> Iterator[list[flags]]:
    """Collect the IN_OPEN and IN_ACCESS events on ``canary`` during the block."""
    seen: list[flags] = []
    with INotify() as inotify:
        inotify.add_watch(str(canary), flags.OPEN | flags.ACCESS)
        try:
            yield seen
        finally:
            # The kernel queues an event as the open happens, so nothing can arrive late.
            for event in inotify.read(timeout=0):
                seen.extend(flags.from_mask(event.mask))


@pytest.mark.parametrize("build", HOSTILE, ids=lambda build: build.__name__)
def test_hostile_image_is_refused_without_opening_what_it_names(
    tmp_path: Path, build: Callable[[Path], Case]
) -> None:
    image, declared, canary, _ = build(tmp_path)
    with canary_watch(canary) as seen, pytest.raises(UnsafeImage) as caught:
        vet_image(image, declared, LIMITS)
    assert seen == []
    assert caught.value.message.endswith(".")


@pytest.mark.parametrize("build", HOSTILE, ids=lambda build: build.__name__)
def test_control_plain_qemu_img_does_open_what_it_names(
    tmp_path: Path, build: Callable[[Path], Case]
) -> None:
    image, _, canary, opener = build(tmp_path)
    with canary_watch(canary) as seen:
        subprocess.run(["qemu-img", *opener, str(image)], capture_output=True)
    assert flags.OPEN in seen


@pytest.mark.parametrize("image", ["text", "embedded"])
def test_vmdk_naming_etc_passwd_is_refused(tmp_path: Path, image: str) -> None:
    if image == "text":
        path = tmp_path / "desc.vmdk"
        path.write_text(descriptor("/etc/passwd"))
    else:
        path = sparse_vmdk_naming(tmp_path, "/etc/passwd")
    with pytest.raises(UnsafeImage, match="/etc/passwd"):
        vet_image(path, None, LIMITS)


@pytest.mark.parametrize(
    ("kind", "fmt"),
    [
        ("qcow2", ImageFormat.QCOW2),
        ("raw", ImageFormat.RAW),
        ("vdi", ImageFormat.VDI),
        ("vmdk:monolithicSparse", ImageFormat.VMDK),
        ("vmdk:streamOptimized", ImageFormat.VMDK),
    ],
)
def test_accepts_self_contained_images(tmp_path: Path, kind: str, fmt: ImageFormat) -> None:
    image = data_image(tmp_path, kind)
    assert vet_image(image, None, LIMITS) == VettedImage(fmt, 8 * MiB)
    assert vet_image(image, fmt, LIMITS) == VettedImage(fmt, 8 * MiB)


def test_qcow2_truncated_to_half_is_corrupt(tmp_path: Path) -> None:
    image = data_image(tmp_path, "qcow2")
    os.truncate(image, image.stat().st_size // 2)
    with pytest.raises(CorruptImage, match=r"damaged|truncated"):
        vet_image(image, ImageFormat.QCOW2, LIMITS)


@pytest.mark.parametrize("kind", ["vdi", "vmdk:monolithicSparse", "vmdk:streamOptimized"])
def test_garbage_in_the_middle_is_corrupt(tmp_path: Path, kind: str) -> None:
    # An empty image is all metadata (VDI block map, VMDK grain tables), so its middle is too;
    # garbage in guest data would be indistinguishable from data.
    fmt, _, subformat = kind.partition(":")
    image = tmp_path / f"image.{fmt}"
    options = ["-o", f"subformat={subformat}"] if subformat else []
    run("qemu-img", "create", "-f", fmt, *options, str(image), "1G")
    vet_image(image, None, LIMITS)  # sound before the damage
    size = image.stat().st_size
    with image.open("r+b") as f:
        f.seek(size // 2 - 2048)
        f.write(os.urandom(4096))
    with pytest.raises(CorruptImage):
        vet_image(image, None, LIMITS)


# The runner itself.


def test_info_reads_what_qemu_img_reports(tmp_path: Path) -> None:
    image = data_image(tmp_path, "qcow2")
    info = qemu_img.info(image, ImageFormat.QCOW2, LIMITS)
    assert (info.virtual_size, info.format, info.backing_filename) == (8 * MiB, "qcow2", None)
    assert info.actual_size is not None and info.actual_size > 4 * MiB
    assert info.format_specific["type"] == "qcow2"


def test_info_shares_an_image_another_process_holds_open(tmp_path: Path) -> None:
    image = data_image(tmp_path, "qcow2")
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 10000", str(image)])
    try:
        time.sleep(0.5)
        locked = subprocess.run(
            ["qemu-img", "info", "-f", "qcow2", str(image)], capture_output=True
        )
        assert locked.returncode != 0  # without -U, the writer's lock refuses us
        assert qemu_img.info(image, "qcow2", LIMITS).virtual_size == 8 * MiB
    finally:
        holder.kill()
        holder.wait()


def test_info_errors_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        qemu_img.info(tmp_path / "missing.qcow2", "qcow2", LIMITS)
    with pytest.raises(CorruptImage, match=r"not in qcow2 format\.$"):
        qemu_img.info(data_image(tmp_path, "raw"), "qcow2", LIMITS)
    with pytest.raises(InvalidInput):
        qemu_img.info(data_image(tmp_path, "raw"), "cloop", LIMITS)


def test_limits_apply_to_qemu_img(tmp_path: Path) -> None:
    image = data_image(tmp_path, "raw")
    starved = QemuImgLimits(cpu_seconds=60, address_space=16 * MiB)
    with pytest.raises(CorruptImage, match="qemu-img could not read"):
        qemu_img.info(image, "raw", starved)
    assert qemu_img.info(image, "raw", LIMITS).virtual_size == 8 * MiB


def test_check_accepts_raw_which_has_no_checks(tmp_path: Path) -> None:
    qemu_img.check(data_image(tmp_path, "raw"), "raw", LIMITS)


def test_convert_reports_progress_and_copies_the_data(tmp_path: Path) -> None:
    src = data_image(tmp_path, "raw", size=64 * MiB)
    dst = tmp_path / "copy.qcow2"
    seen: list[float] = []
    qemu_img.convert(src, "raw", dst, "qcow2", LIMITS, seen.append)
    assert len(seen) >= 2
    assert seen == sorted(seen)
    assert seen[-1] == 100.0
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(dst))


def test_convert_refuses_to_overwrite(tmp_path: Path) -> None:
    src = data_image(tmp_path, "raw")
    dst = tmp_path / "taken.qcow2"
    dst.write_bytes(b"precious")
    with pytest.raises(Conflict):
        qemu_img.convert(src, "raw", dst, "qcow2", LIMITS)
    assert dst.read_bytes() == b"precious"


def test_failed_convert_leaves_no_file(tmp_path: Path) -> None:
    src = data_image(tmp_path, "raw")
    dst = tmp_path / "out.qcow2"
    with pytest.raises(StorageError, match="not in qcow2 format"):
        qemu_img.convert(src, "qcow2", dst, "qcow2", LIMITS)
    assert not dst.exists()


def test_convert_stops_qemu_img_when_the_callback_fails(tmp_path: Path) -> None:
    src = data_image(tmp_path, "raw", size=64 * MiB)
    dst = tmp_path / "out.qcow2"

    def cancel(_percent: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qemu_img.convert(src, "raw", dst, "qcow2", LIMITS, cancel)
    assert not dst.exists()


def test_resize_grows_an_image(tmp_path: Path) -> None:
    image = data_image(tmp_path, "qcow2")
    qemu_img.resize(image, "qcow2", 16 * MiB, LIMITS)
    assert qemu_img.info(image, "qcow2", LIMITS).virtual_size == 16 * MiB
