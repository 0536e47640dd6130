"""OVA packages: written in OVF's order, read back verified, and hostile ones refused.

The hostile archives are built here with tarfile, member by member, the way an attacker
would; each must be refused with a sentence that names the problem, leaving nothing in
the staging area and nothing anywhere else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from corral.errors import CorralError, CorruptImage, InvalidInput, StorageError, UnsafeImage
from corral.formats.ovf import OvfDiskSpec, OvfSpec, build_ovf
from corral.images.ova import members, read_ova, unpacked_ova, write_ova

DISK = b"".join(i.to_bytes(4, "little") for i in range(50_000))  # 200 kB, not all zeros
MAC = "52:54:00:0a:0b:0c"


def descriptor(disk_name: str = "m-disk1.vmdk", size: int = len(DISK)) -> bytes:
    spec = OvfSpec("m", 2, 128 << 20, (OvfDiskSpec(disk_name, size, 1 << 30),), (MAC,))
    return build_ovf(spec)


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


def sha(algorithm: str, data: bytes) -> str:
    return hashlib.new(algorithm, data).hexdigest()


def manifest(files: dict[str, bytes], algorithm: str = "SHA256") -> bytes:
    alg = algorithm.lower()
    return "".join(f"{algorithm}({n})= {sha(alg, d)}\n" for n, d in files.items()).encode()


def make_ova(path: Path, entries: Iterable[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


def good_entries(ovf: bytes | None = None) -> list[tuple[tarfile.TarInfo, bytes]]:
    ovf = ovf or descriptor()
    return [
        regular("m.ovf", ovf),
        regular("m.mf", manifest({"m.ovf": ovf, "m-disk1.vmdk": DISK})),
        regular("m-disk1.vmdk", DISK),
    ]


# -- writing and reading back -------------------------------------------------------------


def test_written_in_ovf_order_and_read_back_verified(tmp_path: Path, staging: Path) -> None:
    disk = tmp_path / "disk.vmdk"
    disk.write_bytes(DISK)
    ova = tmp_path / "m.ova"
    write_ova(ova, "m.ovf", descriptor(), [("m-disk1.vmdk", disk)])
    assert [name for name, _ in members(ova)] == ["m.ovf", "m-disk1.vmdk", "m.mf"]
    with tarfile.open(ova) as tar:
        assert all(m.isreg() and m.mode == 0o644 for m in tar.getmembers())
        mf = tar.extractfile("m.mf").read().decode()  # type: ignore[union-attr]
    assert f"SHA256(m-disk1.vmdk)= {sha('sha256', DISK)}" in mf.splitlines()
    with unpacked_ova(ova, staging) as unpacked:
        assert unpacked.manifest_checked and unpacked.notes == ()
        staged = unpacked.staged["m-disk1.vmdk"]
        assert staged.parent == unpacked.folder and staged.name == "file-1.vmdk"
        assert staged.read_bytes() == DISK
        machine = unpacked.machine()
        assert [d.path for d in machine.disks] == ["file-1.vmdk"]
        assert (machine.cpus, machine.memory_bytes, machine.nics[0].mac) == (2, 128 << 20, MAC)
    assert list(staging.iterdir()) == []  # the context removed its folder


def test_write_refuses_an_existing_file_and_leaves_it(tmp_path: Path) -> None:
    ova = tmp_path / "m.ova"
    ova.write_bytes(b"precious")
    with pytest.raises(InvalidInput, match="already exists"):
        write_ova(ova, "m.ovf", descriptor(), [])
    assert ova.read_bytes() == b"precious"


def test_a_failed_write_leaves_no_file(tmp_path: Path) -> None:
    ova = tmp_path / "m.ova"
    with pytest.raises(StorageError, match=r"Could not read .*missing\.vmdk"):
        write_ova(ova, "m.ovf", descriptor(), [("m-disk1.vmdk", tmp_path / "missing.vmdk")])
    assert not ova.exists()


def test_virtualbox_layout_sha1_manifest_after_the_disks(tmp_path: Path, staging: Path) -> None:
    ovf = descriptor()
    ova = make_ova(tmp_path / "vb.ova", [
        regular("m.ovf", ovf),
        regular("m-disk1.vmdk", DISK),
        regular("m.mf", manifest({"m.ovf": ovf, "m-disk1.vmdk": DISK}, "SHA1")),
    ])  # fmt: skip
    unpacked = read_ova(ova, staging)
    assert unpacked.manifest_checked
    assert unpacked.staged["m-disk1.vmdk"].read_bytes() == DISK


def test_without_a_manifest_the_package_is_read_with_a_note(tmp_path: Path, staging: Path) -> None:
    entries = [regular("m.ovf", descriptor()), regular("m-disk1.vmdk", DISK)]
    unpacked = read_ova(make_ova(tmp_path / "m.ova", entries), staging)
    assert not unpacked.manifest_checked
    assert any("no manifest" in n for n in unpacked.notes)


def test_a_gzip_compressed_disk_is_staged_decompressed(tmp_path: Path, staging: Path) -> None:
    packed = gzip.compress(DISK)
    ovf = descriptor(size=len(packed)).replace(
        b'ovf:id="file1"', b'ovf:compression="gzip" ovf:id="file1"'
    )
    ova = make_ova(tmp_path / "m.ova", [
        regular("m.ovf", ovf),
        regular("m.mf", manifest({"m.ovf": ovf, "m-disk1.vmdk": packed})),  # of the stored bytes
        regular("m-disk1.vmdk", packed),
    ])  # fmt: skip
    assert read_ova(ova, staging).staged["m-disk1.vmdk"].read_bytes() == DISK


def test_a_signature_is_noted_not_staged(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", [*good_entries(), regular("m.cert", b"-----BEGIN")])
    unpacked = read_ova(ova, staging)
    assert any("did not check the signature" in n for n in unpacked.notes)
    assert sorted(p.name for p in unpacked.folder.iterdir()) == ["file-1.vmdk"]


# -- hostile packages ---------------------------------------------------------------------


def refused(
    ova: Path, staging: Path, error: type[CorralError], match: str, **kwargs: int
) -> CorralError:
    with pytest.raises(error, match=match) as caught:
        read_ova(ova, staging, **kwargs)  # type: ignore[arg-type]
    assert list(staging.iterdir()) == [], "a refused package left files in the staging area"
    return caught.value


def test_path_traversal_is_refused(tmp_path: Path, staging: Path) -> None:
    entries = [*good_entries(), regular("../../escaped", b"owned")]
    refused(make_ova(tmp_path / "m.ova", entries), staging, UnsafeImage, r"climbs out with '\.\.'")
    assert not (tmp_path / "escaped").exists() and not Path("/escaped").exists()


def test_path_traversal_in_the_middle_of_a_name_is_refused(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", [regular("m.ovf", descriptor()),
                                        regular("a/../../m-disk1.vmdk", DISK)])
    refused(ova, staging, UnsafeImage, "climbs out")


def test_an_absolute_path_is_refused(tmp_path: Path, staging: Path) -> None:
    target = tmp_path / "absolute-target"
    ova = make_ova(tmp_path / "m.ova", [*good_entries(), regular(str(target), b"owned")])
    refused(ova, staging, UnsafeImage, "absolute path")
    assert not target.exists()


def test_a_symlink_is_refused_and_nothing_is_written_through_it(
    tmp_path: Path, staging: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"keep me")
    ova = make_ova(tmp_path / "m.ova", [
        regular("m.ovf", descriptor()),
        special("m-disk1.vmdk", tarfile.SYMTYPE, str(secret)),
        regular("m-disk1.vmdk", b"overwrite through the link"),
    ])  # fmt: skip
    refused(ova, staging, UnsafeImage, "symbolic link")
    assert secret.read_bytes() == b"keep me"


def test_a_hard_link_is_refused(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", [
        regular("m.ovf", descriptor()),
        special("m-disk1.vmdk", tarfile.LNKTYPE, "/etc/shadow"),
    ])  # fmt: skip
    refused(ova, staging, UnsafeImage, "hard link to '/etc/shadow'")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_are_refused(tmp_path: Path, staging: Path, kind: bytes) -> None:
    entries = [regular("m.ovf", descriptor()), special("m-disk1.vmdk", kind)]
    ova = make_ova(tmp_path / "m.ova", entries)
    refused(ova, staging, UnsafeImage, "device or FIFO")


def test_a_folder_is_refused(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", [*good_entries(), special("sub", tarfile.DIRTYPE)])
    refused(ova, staging, UnsafeImage, "holds a folder")


def test_a_duplicate_name_is_refused(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", [*good_entries(), regular("m-disk1.vmdk", b"second")])
    refused(ova, staging, UnsafeImage, "holds 'm-disk1.vmdk' twice")


def test_a_member_neither_file_lists_is_refused(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", [*good_entries(), regular("payload.sh", b"#!/bin/sh")])
    refused(ova, staging, UnsafeImage, "'payload.sh', which its manifest does not list")


def test_a_member_the_descriptor_does_not_list_is_refused(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", [regular("m.ovf", descriptor()), regular("x.vmdk", DISK)])
    refused(ova, staging, UnsafeImage, "'x.vmdk', which its descriptor does not list")


def test_a_manifest_that_does_not_match_is_refused(tmp_path: Path, staging: Path) -> None:
    ovf = descriptor()
    ova = make_ova(tmp_path / "m.ova", [
        regular("m.ovf", ovf),
        regular("m.mf", manifest({"m.ovf": ovf, "m-disk1.vmdk": DISK})),
        regular("m-disk1.vmdk", DISK[:-1] + b"\xff"),
    ])  # fmt: skip
    refused(ova, staging, UnsafeImage, "SHA256 digest of 'm-disk1.vmdk' .* does not match")


def test_a_tampered_descriptor_is_caught_by_a_late_manifest(tmp_path: Path, staging: Path) -> None:
    ovf = descriptor()
    tampered = ovf.replace(b"<rasd:VirtualQuantity>2<", b"<rasd:VirtualQuantity>8<")
    ova = make_ova(tmp_path / "m.ova", [
        regular("m.ovf", tampered),
        regular("m-disk1.vmdk", DISK),
        regular("m.mf", manifest({"m.ovf": ovf, "m-disk1.vmdk": DISK}, "SHA1")),
    ])  # fmt: skip
    refused(ova, staging, UnsafeImage, "SHA1 digest of 'm.ovf'")


def test_a_file_the_manifest_lists_but_the_package_lacks(tmp_path: Path, staging: Path) -> None:
    ovf = descriptor()
    listed = {"m.ovf": ovf, "m-disk1.vmdk": DISK, "m-disk2.vmdk": b"x"}
    ova = make_ova(tmp_path / "m.ova", [
        regular("m.ovf", ovf), regular("m.mf", manifest(listed)), regular("m-disk1.vmdk", DISK),
    ])  # fmt: skip
    refused(ova, staging, UnsafeImage, "lists 'm-disk2.vmdk', which the OVA lacks")


def test_an_external_entity_in_the_descriptor_is_refused(tmp_path: Path, staging: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root:x:0:0")
    ovf = descriptor().replace(
        b"<ovf:Envelope",
        f'<!DOCTYPE e [<!ENTITY x SYSTEM "file://{secret}">]>\n<ovf:Envelope'.encode(),
    ).replace(b"<ovf:Name>m</ovf:Name>", b"<ovf:Name>&x;</ovf:Name>")
    ova = make_ova(tmp_path / "m.ova", [regular("m.ovf", ovf), regular("m-disk1.vmdk", DISK)])
    refused(ova, staging, InvalidInput, "OVF descriptor has a DOCTYPE")


def test_the_descriptor_must_come_first(tmp_path: Path, staging: Path) -> None:
    entries = [regular("m-disk1.vmdk", DISK), regular("m.ovf", descriptor())]
    ova = make_ova(tmp_path / "m.ova", entries)
    refused(ova, staging, UnsafeImage, "begins with 'm-disk1.vmdk', not with its OVF descriptor")


def test_a_size_other_than_the_descriptor_says_is_refused(tmp_path: Path, staging: Path) -> None:
    ovf = descriptor(size=len(DISK) + 1)
    ova = make_ova(tmp_path / "m.ova", [regular("m.ovf", ovf), regular("m-disk1.vmdk", DISK)])
    refused(ova, staging, UnsafeImage, "but the descriptor says")


def test_the_size_cap_is_enforced(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", good_entries())
    cap = len(DISK) - 1
    refused(ova, staging, InvalidInput, "more than the 195.3 KiB Corral", max_bytes=cap)


def test_a_gzip_bomb_stops_at_the_cap(tmp_path: Path, staging: Path) -> None:
    bomb = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros in about 64 KiB
    ovf = descriptor(size=len(bomb)).replace(
        b'ovf:id="file1"', b'ovf:compression="gzip" ovf:id="file1"'
    )
    ova = make_ova(tmp_path / "m.ova", [regular("m.ovf", ovf), regular("m-disk1.vmdk", bomb)])
    refused(ova, staging, InvalidInput, "unpacks to more than the 1.0 MiB", max_bytes=1 << 20)


def test_a_truncated_archive_is_refused(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", good_entries())
    data = ova.read_bytes()
    ova.write_bytes(data[: len(data) // 2])
    with pytest.raises((CorruptImage, UnsafeImage)):
        read_ova(ova, staging)
    assert list(staging.iterdir()) == []


def test_a_package_missing_its_disk_is_refused(tmp_path: Path, staging: Path) -> None:
    ova = make_ova(tmp_path / "m.ova", [regular("m.ovf", descriptor())])
    refused(ova, staging, InvalidInput, "lacks 'm-disk1.vmdk', a disk its descriptor names")


def test_not_a_tar_archive(tmp_path: Path, staging: Path) -> None:
    ova = tmp_path / "m.ova"
    ova.write_bytes(os.urandom(4096))
    refused(ova, staging, CorruptImage, "not a tar archive")
