"""The sealer on small real ext4 images made with ``mkfs.ext4 -d`` (no root, no mounts)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from corral.images.seal import CannotSeal, find_filesystems, seal_disk

pytestmark = pytest.mark.skipif(
    shutil.which("debugfs") is None or shutil.which("mkfs.ext4") is None,
    reason="e2fsprogs is not installed",
)

FS_BYTES = 8 << 20

IDENTITY = {
    "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
    "var/lib/dbus/machine-id": "0123456789abcdef0123456789abcdef\n",
    "etc/ssh/ssh_host_ed25519_key": "private\n",
    "etc/ssh/ssh_host_ed25519_key.pub": "public\n",
    "etc/dropbear/dropbear_ed25519_host_key": "private\n",
    "var/lib/cloud/instances/i-1/sem/config_ssh": "done\n",
    "var/lib/cloud/data/instance-id": "i-1\n",
    "var/lib/cloud/sem/config_scripts_per_once.once": "done\n",
    "var/lib/dhcp/dhclient.eth0.leases": "lease {}\n",
    "var/lib/dhclient/dhclient.leases": "lease {}\n",
    "var/lib/NetworkManager/internal-1234-eth0.lease": "ADDRESS=10.0.0.2\n",
    "etc/udev/rules.d/70-persistent-net.rules": "SUBSYSTEM==\"net\"\n",
    "var/lib/corral/instance-id": "i-1\n",
}
KEPT = {
    "etc/ssh/sshd_config": "PermitRootLogin no\n",
    "etc/hostname": "web\n",
    "etc/udev/rules.d/99-local.rules": "# mine\n",
    "var/lib/NetworkManager/NetworkManager.state": "[main]\n",
    "var/lib/cloud/scripts/per-boot/hello.sh": "echo hi\n",
    "var/lib/corral/notes": "keep\n",
}


def make_fs(tmp_path: Path, files: dict[str, str], name: str = "fs.img") -> Path:
    tree = tmp_path / f"{name}.tree"
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    image = tmp_path / name
    with image.open("wb") as f:
        f.truncate(FS_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    shutil.rmtree(tree)
    return image


def read(image: Path, path: str, offset: int = 0) -> str | None:
    spec = f"{image}?offset={offset}" if offset else str(image)
    done = subprocess.run(["debugfs", "-R", f'stat "{path}"', spec], capture_output=True,
                          text=True, check=True)
    if "Inode:" not in done.stdout:
        return None
    return subprocess.run(["debugfs", "-R", f'cat "{path}"', spec], capture_output=True,
                          text=True, check=True).stdout


def fsck_clean(image: Path, offset: int = 0) -> bool:
    spec = f"{image}?offset={offset}" if offset else str(image)
    return subprocess.run(["e2fsck", "-fn", spec], capture_output=True).returncode == 0


def test_removes_the_identity_and_keeps_the_rest(tmp_path: Path) -> None:
    image = make_fs(tmp_path, {**IDENTITY, **KEPT})
    report = seal_disk(image)
    assert report.emptied == ("/etc/machine-id",)
    for rel in IDENTITY:
        if rel == "etc/machine-id":
            assert read(image, "/etc/machine-id") == ""
        else:
            assert read(image, f"/{rel}") is None, rel
    for rel, text in KEPT.items():
        assert read(image, f"/{rel}") == text, rel
    assert read(image, "/var/lib/cloud/instances") is None  # whole trees go
    assert [p.name for p in tmp_path.iterdir()] == ["fs.img"]  # no file of its own left
    assert "removed /etc/ssh/ssh_host_ed25519_key" in report.lines()
    assert "removed /var/lib/cloud/instances" in report.lines()
    assert fsck_clean(image)


def test_sealing_twice_removes_nothing_more(tmp_path: Path) -> None:
    image = make_fs(tmp_path, {**IDENTITY, **KEPT})
    seal_disk(image)
    assert seal_disk(image).lines() == []


def test_a_clean_machine_needs_nothing(tmp_path: Path) -> None:
    image = make_fs(tmp_path, KEPT)
    assert seal_disk(image).lines() == []
    for rel, text in KEPT.items():
        assert read(image, f"/{rel}") == text


def test_no_symbolic_link_is_followed(tmp_path: Path) -> None:
    """/etc/dropbear -> /keep in the guest: the sealer does not remove /keep's files."""
    tree = tmp_path / "tree"
    (tree / "keep").mkdir(parents=True)
    (tree / "keep/dropbear_rsa_host_key").write_text("not mine to remove\n")
    (tree / "etc").mkdir()
    (tree / "etc/dropbear").symlink_to("/keep")
    (tree / "var/lib").mkdir(parents=True)
    (tree / "var/lib/cloud").symlink_to("../../keep")
    (tree / "keep/instance").write_text("neither\n")
    image = tmp_path / "fs.img"
    with image.open("wb") as f:
        f.truncate(FS_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    assert seal_disk(image).lines() == []
    assert read(image, "/keep/dropbear_rsa_host_key") == "not mine to remove\n"
    assert read(image, "/keep/instance") == "neither\n"


def test_a_linked_machine_id_is_removed_not_followed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("web\n")
    (tree / "etc/machine-id").symlink_to("hostname")
    image = tmp_path / "fs.img"
    with image.open("wb") as f:
        f.truncate(FS_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    report = seal_disk(image)
    assert report.removed == ("/etc/machine-id",) and report.emptied == ()
    assert read(image, "/etc/machine-id") is None  # missing: "uninitialized" too
    assert read(image, "/etc/hostname") == "web\n"
    assert fsck_clean(image)


def _gpt_disk(tmp_path: Path, fs: Path, first_lba: int) -> Path:
    """A GPT disk (protective MBR, header, one Linux partition) holding ``fs``."""
    disk = tmp_path / "gpt.raw"
    sectors = first_lba + fs.stat().st_size // 512 + 34
    data = bytearray(sectors * 512)
    data[446:462] = struct.pack("<B3xB3xII", 0, 0xEE, 1, sectors - 1)
    data[510:512] = b"\x55\xaa"
    entry = (uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le + uuid.uuid4().bytes_le
             + struct.pack("<QQQ", first_lba, first_lba + fs.stat().st_size // 512 - 1, 0))
    data[1024:1024 + len(entry)] = entry
    header = b"EFI PART" + struct.pack("<IIIIQQQQ16sQII", 0x10000, 92, 0, 0, 1, sectors - 1,
                                       34, sectors - 34, uuid.uuid4().bytes, 2, 128, 128)
    data[512:512 + len(header)] = header
    data[first_lba * 512 : first_lba * 512 + fs.stat().st_size] = fs.read_bytes()
    disk.write_bytes(bytes(data))
    return disk


def _mbr_disk(tmp_path: Path, fs: Path, *, logical: bool) -> tuple[Path, int]:
    """An MBR disk with ``fs`` in partition 1, or in the first logical partition (5)."""
    disk = tmp_path / "mbr.raw"
    fs_sectors = fs.stat().st_size // 512
    data = bytearray((4096 + fs_sectors) * 512)
    data[510:512] = b"\x55\xaa"
    if logical:
        data[446:462] = struct.pack("<B3xB3xII", 0, 0x05, 2048, 2048 + fs_sectors)
        ebr = 2048 * 512
        data[ebr + 446 : ebr + 462] = struct.pack("<B3xB3xII", 0, 0x83, 2048, fs_sectors)
        data[ebr + 510 : ebr + 512] = b"\x55\xaa"
        start = 4096
    else:
        data[446:462] = struct.pack("<B3xB3xII", 0x80, 0x83, 2048, fs_sectors)
        start = 2048
    data[start * 512 : start * 512 + fs.stat().st_size] = fs.read_bytes()
    disk.write_bytes(bytes(data))
    return disk, start * 512


def test_a_gpt_partition_is_found_at_its_offset(tmp_path: Path) -> None:
    disk = _gpt_disk(tmp_path, make_fs(tmp_path, {**IDENTITY, **KEPT}), 2048)
    [fs] = find_filesystems(disk)
    assert (fs.offset, fs.where) == (2048 * 512, "partition 1")
    report = seal_disk(disk)
    assert "removed /etc/ssh/ssh_host_ed25519_key" in report.lines()
    assert read(disk, "/etc/ssh/ssh_host_ed25519_key", fs.offset) is None
    assert read(disk, "/etc/ssh/sshd_config", fs.offset) == KEPT["etc/ssh/sshd_config"]
    assert read(disk, "/etc/machine-id", fs.offset) == ""
    assert fsck_clean(disk, fs.offset)


@pytest.mark.parametrize("logical", [False, True], ids=["primary", "logical"])
def test_an_mbr_partition_is_found_at_its_offset(tmp_path: Path, logical: bool) -> None:
    disk, offset = _mbr_disk(tmp_path, make_fs(tmp_path, {**IDENTITY, **KEPT}),
                             logical=logical)
    [fs] = find_filesystems(disk)
    assert fs.offset == offset and fs.where == ("partition 5" if logical else "partition 1")
    seal_disk(disk)
    assert read(disk, "/var/lib/corral/instance-id", offset) is None
    assert read(disk, "/var/lib/corral/notes", offset) == "keep\n"


def test_another_filesystem_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "xfs.raw"
    disk.write_bytes(b"XFSB" + bytes(FS_BYTES - 4))
    with pytest.raises(CannotSeal, match=r"ext4.*xfs.*--no-seal"):
        seal_disk(disk)


def test_a_blank_disk_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "blank.raw"
    disk.write_bytes(bytes(1 << 20))
    with pytest.raises(CannotSeal, match="--no-seal"):
        seal_disk(disk)


def test_an_ext_filesystem_without_etc_is_refused(tmp_path: Path) -> None:
    """A /boot-like ext partition alone: the root is elsewhere, of another kind."""
    image = tmp_path / "boot.img"
    with image.open("wb") as f:
        f.truncate(FS_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    with pytest.raises(CannotSeal, match="/etc"):
        seal_disk(image)


def test_a_hostile_gpt_does_not_break_the_search(tmp_path: Path) -> None:
    disk = tmp_path / "hostile.raw"
    data = bytearray(1 << 20)
    data[446:462] = struct.pack("<B3xB3xII", 0, 0xEE, 1, 0xFFFFFFFF)
    data[510:512] = b"\x55\xaa"
    # 1024 entries of 4 KiB each, starting far past the end of the file.
    data[512:604] = b"EFI PART" + struct.pack("<IIIIQQQQ16sQII", 0x10000, 92, 0, 0, 1, 2**40,
                                              34, 2**40, bytes(16), 2**50, 1024, 4096)
    disk.write_bytes(bytes(data))
    with pytest.raises(CannotSeal):
        find_filesystems(disk)
