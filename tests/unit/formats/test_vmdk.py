"""VMDK descriptors: parsed, checked for files outside the machine's folder, re-rendered."""

from __future__ import annotations

import struct
from pathlib import PurePosixPath

import pytest

from corral.errors import CorruptImage, InvalidInput, UnsafeImage
from corral.formats import vmdk

# As `qemu-img create -f vmdk -o subformat=twoGbMaxExtentSparse` and VMware write it.
SPLIT = b"""# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=b3f1ab54
parentCID=ffffffff
createType="twoGbMaxExtentSparse"

# Extent description
RW 4194304 SPARSE "web-s001.vmdk"
RW 4194304 SPARSE "web-s002.vmdk"
RW 2097152 SPARSE "web-s003.vmdk"

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "10402"
ddb.geometry.heads = "16"
ddb.geometry.sectors = "63"
ddb.adapterType = "lsilogic"
ddb.uuid = "60 00 C2 9b 3c 1e 2f 8a-7b 1c 2d 3e 4f 5a 6b 7c"
"""

FOLDER = PurePosixPath("/imports/web")


def test_a_split_descriptor_lists_its_extents_and_capacity() -> None:
    d = vmdk.parse_descriptor(SPLIT)
    assert d.create_type == "twoGbMaxExtentSparse"
    assert d.files == ("web-s001.vmdk", "web-s002.vmdk", "web-s003.vmdk")
    assert d.capacity == (4194304 * 2 + 2097152) * 512
    assert d.ddb["adapterType"] == "lsilogic"
    assert d.parent_hint is None
    vmdk.check_importable(d, "web.vmdk")


def test_flat_and_vmfs_extents_keep_their_offsets() -> None:
    d = vmdk.parse_descriptor(b'createType="monolithicFlat"\nRW 20480 FLAT "a-flat.vmdk" 0\n'
                              b'RDONLY 100 FLAT "b.raw" 2048\nRW 8 VMFS "c-flat.vmdk"\n')
    assert [(e.access, e.kind, e.file, e.offset) for e in d.extents] == [
        ("RW", "FLAT", "a-flat.vmdk", 0), ("RDONLY", "FLAT", "b.raw", 2048),
        ("RW", "VMFS", "c-flat.vmdk", 0)]


def test_reading_stops_at_a_nul_like_qemu() -> None:
    d = vmdk.parse_descriptor(SPLIT.replace(b"RW 4194304 SPARSE \"web-s002", b"\0RW", 1))
    assert d.files == ("web-s001.vmdk",)


def test_extents_inside_the_folder_are_located() -> None:
    d = vmdk.parse_descriptor(SPLIT)
    located = vmdk.check_references(d.files, FOLDER, FOLDER)
    assert located[0] == FOLDER / "web-s001.vmdk"
    sub = vmdk.check_references(["disks/../disks/a.vmdk"], FOLDER, FOLDER)
    assert sub == (FOLDER / "disks/a.vmdk",)


@pytest.mark.parametrize("reference", ["../other/secret.vmdk", "/etc/passwd",
                                       "disks/../../web2/x.vmdk", "/imports/web/../web2/a"])
def test_an_extent_outside_the_folder_is_refused(reference: str) -> None:
    with pytest.raises(UnsafeImage, match="outside the machine's folder") as caught:
        vmdk.check_references([reference], FOLDER, FOLDER)
    assert "--allow-path" in str(caught.value)


def test_a_split_descriptor_with_a_parent_extent_is_refused_unless_allowed() -> None:
    hostile = SPLIT.replace(b'"web-s002.vmdk"', b'"../../etc/shadow"')
    d = vmdk.parse_descriptor(hostile)
    with pytest.raises(UnsafeImage, match="/etc/shadow"):
        vmdk.check_references(d.files, FOLDER, FOLDER)
    # The user named that exact file: then it is read (and still vetted by the caller).
    located = vmdk.check_references(d.files, FOLDER, FOLDER, [PurePosixPath("/etc/shadow")])
    assert located[1] == PurePosixPath("/etc/shadow")
    # Naming a folder allows what lies under it, and nothing beside it.
    allowed = [PurePosixPath("/imports/shared")]
    assert vmdk.check_references(["../shared/x.vmdk"], FOLDER, FOLDER, allowed)
    with pytest.raises(UnsafeImage):
        vmdk.check_references(["../shared-not/x.vmdk"], FOLDER, FOLDER, allowed)


def test_snapshot_deltas_and_exotic_extents_cannot_be_imported() -> None:
    delta = vmdk.parse_descriptor(b'createType="monolithicSparse"\nparentCID=1234abcd\n'
                                  b'parentFileNameHint="web.vmdk"\nRW 8 SPARSE "web-000001.vmdk"\n')
    assert delta.files == ("web-000001.vmdk", "web.vmdk")
    with pytest.raises(InvalidInput, match=r"snapshot delta over the disk 'web\.vmdk'"):
        vmdk.check_importable(delta, "web-000001.vmdk")
    for line in (b'RW 8 VMFSSPARSE "d-delta.vmdk"', b"RW 8 ZERO", b'NOACCESS 8 FLAT "x" 0'):
        with pytest.raises(InvalidInput):
            vmdk.check_importable(vmdk.parse_descriptor(b'createType="vmfs"\n' + line), "d")
    with pytest.raises(InvalidInput, match="lists no extents"):
        vmdk.check_importable(vmdk.parse_descriptor(b'createType="vmfs"\n'), "d")


@pytest.mark.parametrize("line", [b'RW 8 SPARSE "a\nb"', b'RW 8 SPARSE "a\x01b"'])
def test_file_names_with_control_characters_are_refused(line: bytes) -> None:
    with pytest.raises((UnsafeImage, InvalidInput)):
        vmdk.parse_descriptor(b'createType="vmfs"\n' + line + b"\n")


def test_garbage_lines_are_refused() -> None:
    with pytest.raises(InvalidInput, match="not one Corral reads"):
        vmdk.parse_descriptor(b"version=1\nRW eight SPARSE x\n")


def test_the_rendered_descriptor_names_only_the_vetted_files() -> None:
    d = vmdk.parse_descriptor(SPLIT.replace(b"RW 2097152", b"RDONLY 2097152"))
    files = [str(p) for p in vmdk.check_references(d.files, FOLDER, FOLDER)]
    text = vmdk.render_descriptor(d, files)
    again = vmdk.parse_descriptor(text.encode())
    assert again.files == tuple(files)
    assert again.capacity == d.capacity
    assert (again.parent_hint, again.ddb) == (None, {})
    # qemu skips any extent that is not RW, and reads an extent line after a blank
    # line twice: the rendering has neither.
    assert "\n\n" not in text
    assert all(e.access == "RW" for e in again.extents)


def test_flat_offsets_survive_rendering_and_vmfs_gets_none() -> None:
    d = vmdk.parse_descriptor(b'createType="vmfs"\nRW 8 FLAT "a" 16\nRW 8 VMFS "b"\n')
    text = vmdk.render_descriptor(d, ["/x/a", "/x/b"])
    assert 'RW 8 FLAT "/x/a" 16\n' in text and 'RW 8 VMFS "/x/b"\n' in text


def _sparse_header(capacity_sectors: int, desc_offset: int, desc_size: int) -> bytes:
    return struct.pack("<4sIIQQQQ", b"KDMV", 1, 3, capacity_sectors, 128, desc_offset,
                       desc_size).ljust(512, b"\0")


def test_the_sparse_header_points_at_the_embedded_descriptor() -> None:
    h = vmdk.parse_sparse_header(_sparse_header(20480, 1, 20))
    assert h == vmdk.SparseHeader(version=1, capacity=20480 * 512, descriptor_offset=512,
                                  descriptor_size=20 * 512)
    assert vmdk.parse_sparse_header(b"# Disk DescriptorFile\n") is None
    assert vmdk.parse_sparse_header(_sparse_header(8, 0, 0)).descriptor_size == 0  # type: ignore[union-attr]
    with pytest.raises(CorruptImage):
        vmdk.parse_sparse_header(b"KDMV\1\0")


def test_text_descriptors_are_told_from_data_files() -> None:
    assert vmdk.is_text_descriptor(SPLIT)
    assert vmdk.is_text_descriptor(b"# comment\nversion=1\nRW 8 FLAT \"x\" 0\n")
    assert not vmdk.is_text_descriptor(_sparse_header(8, 1, 20))
    assert not vmdk.is_text_descriptor(b"\0" * 512)
