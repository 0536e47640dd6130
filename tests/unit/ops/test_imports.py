"""Locating and vetting a foreign machine's disk: real files and real qemu-img, no libvirt."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from corral.errors import InvalidInput, NotFound, UnsafeImage
from corral.formats.foreign import ForeignDisk
from corral.model import ImageFormat
from corral.ops.imports import locate_disk, machine_name
from corral.storage.qemu_img import QemuImgLimits

LIMITS = QemuImgLimits(cpu_seconds=30, address_space=1 << 30)


def _disk(folder: Path, name: str, subformat: str, size: str = "3G") -> Path:
    path = folder / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}",
                    str(path), size], check=True)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "vm").mkdir()
    return tmp_path / "vm"


def test_a_split_vmdk_is_read_through_a_descriptor_naming_only_its_extents(folder: Path) -> None:
    _disk(folder, "web.vmdk", "twoGbMaxExtentSparse")
    found = locate_disk(LIMITS, folder, ForeignDisk("web.vmdk", "scsi", "vmdk"))
    assert found.format is ImageFormat.VMDK and found.virtual_size == 3 << 30
    assert found.files == (str(folder / "web-s001.vmdk"), str(folder / "web-s002.vmdk"))
    assert found.descriptor is not None
    assert f'RW 4194304 SPARSE "{folder}/web-s001.vmdk"' in found.descriptor


def test_a_monolithic_vmdk_is_vetted_as_one_file(folder: Path) -> None:
    _disk(folder, "one.vmdk", "monolithicSparse", "64M")
    found = locate_disk(LIMITS, folder, ForeignDisk("one.vmdk", "ide", "vmdk"))
    assert (found.files, found.descriptor, found.virtual_size) == (
        (str(folder / "one.vmdk"),), None, 64 << 20)


def test_an_extent_outside_the_folder_is_refused_unless_named(folder: Path) -> None:
    outside = folder.parent / "elsewhere"
    outside.mkdir()
    _disk(outside, "x.vmdk", "twoGbMaxExtentSparse", "64M")
    descriptor = (outside / "x.vmdk").read_text().replace('"x-s001.vmdk"',
                                                          '"../elsewhere/x-s001.vmdk"')
    (folder / "web.vmdk").write_text(descriptor)
    disk = ForeignDisk("web.vmdk", "scsi", "vmdk")
    with pytest.raises(UnsafeImage, match="outside the machine's folder"):
        locate_disk(LIMITS, folder, disk)
    found = locate_disk(LIMITS, folder, disk, [outside])
    assert found.files == (str(outside / "x-s001.vmdk"),)


def test_links_out_of_the_folder_are_refused(folder: Path) -> None:
    secret = folder.parent / "secret.vmdk"
    _disk(folder.parent, "secret.vmdk", "monolithicSparse", "8M")
    (folder / "disk.vmdk").symlink_to(secret)
    with pytest.raises(UnsafeImage, match="symbolic link to"):
        locate_disk(LIMITS, folder, ForeignDisk("disk.vmdk", "scsi", "vmdk"))
    (folder / "sub").symlink_to(folder.parent, target_is_directory=True)
    with pytest.raises(UnsafeImage, match="symbolic link to"):
        locate_disk(LIMITS, folder, ForeignDisk("sub/secret.vmdk", "scsi", "vmdk"))
    # a link that stays inside the folder is still a link: the core refuses to follow it
    _disk(folder, "real.vmdk", "monolithicSparse", "8M")
    (folder / "alias.vmdk").symlink_to(folder / "real.vmdk")
    with pytest.raises(UnsafeImage, match="is a symbolic link"):
        locate_disk(LIMITS, folder, ForeignDisk("alias.vmdk", "scsi", "vmdk"))


def test_an_extent_that_is_not_what_its_type_says_is_refused(folder: Path) -> None:
    qcow2 = folder / "data.bin"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "8M"], check=True)
    (folder / "flat.vmdk").write_text('# Disk DescriptorFile\nversion=1\n'
                                      'createType="monolithicFlat"\n'
                                      'RW 16384 FLAT "data.bin" 0\n')
    with pytest.raises(UnsafeImage, match="declared raw but its contents are qcow2"):
        locate_disk(LIMITS, folder, ForeignDisk("flat.vmdk", "scsi", "vmdk"))


def test_missing_and_unsupported_disks_say_so(folder: Path) -> None:
    with pytest.raises(NotFound):
        locate_disk(LIMITS, folder, ForeignDisk("gone.vmdk", "scsi", "vmdk"))
    (folder / "d.vhd").write_bytes(b"conectix" + b"\0" * 504)
    with pytest.raises(InvalidInput, match="VHD image"):
        locate_disk(LIMITS, folder, ForeignDisk("d.vhd", "sata", "vhd"))


@pytest.mark.parametrize(("shown", "name"), [("Debian 12 (web)", "debian-12-web"),
                                             ("  ", "imported"), ("A" * 80, "a" * 63),
                                             ("Café-01", "caf-01")])
def test_display_names_become_machine_names(shown: str, name: str) -> None:
    assert machine_name(shown) == name


def _canary_opened(canary: Path, action: Callable[[], object]) -> bool:
    """Whether anything opened or read ``canary`` while ``action`` ran."""
    with INotify() as inotify:
        inotify.add_watch(str(canary), flags.OPEN | flags.ACCESS)
        action()
        # The kernel queues an event as the open happens, so nothing can arrive late.
        return bool(inotify.read(timeout=0))


def test_a_refused_disk_never_opens_the_file_it_names(folder: Path) -> None:
    canary = _disk(folder.parent, "canary.vmdk", "monolithicSparse", "8M")
    (folder / "split.vmdk").write_text('# Disk DescriptorFile\nversion=1\n'
                                       'createType="twoGbMaxExtentSparse"\n'
                                       'RW 16384 SPARSE "../canary.vmdk"\n')
    (folder / "link.vmdk").symlink_to(canary)

    def refused(path: str) -> Callable[[], object]:
        def attempt() -> None:
            with pytest.raises(UnsafeImage):
                locate_disk(LIMITS, folder, ForeignDisk(path, "scsi", "vmdk"))
        return attempt

    for path in ("split.vmdk", "link.vmdk", "../canary.vmdk", str(canary)):
        assert not _canary_opened(canary, refused(path)), path
    # control: qemu-img itself, given the same descriptor, opens the canary
    assert _canary_opened(canary, lambda: subprocess.run(
        ["qemu-img", "info", "-f", "vmdk", str(folder / "split.vmdk")], capture_output=True))
