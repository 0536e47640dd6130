"""MACHINE@SNAPSHOT parsing, and qemu-img reading an internal snapshot out of a qcow2
overlay (real qemu-img on scratch files; no hypervisor)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from corral.errors import Conflict, InvalidInput, NotFound
from corral.ops.snapshot_clone import OVERLAY_OPTIONS, SnapshotRef
from corral.storage import qemu_img

LIMITS = qemu_img.QemuImgLimits(cpu_seconds=60, address_space=2 << 30)
MIB = 1 << 20


def test_a_reference_names_a_machine_and_one_of_its_snapshots() -> None:
    ref = SnapshotRef.parse("web-1@before-upgrade")
    assert (ref.machine, ref.snapshot) == ("web-1", "before-upgrade")
    assert str(ref) == "web-1@before-upgrade"


@pytest.mark.parametrize("text", ["web-1", "web-1@", "@snap", "@", "a@b@c", ""])
def test_a_bad_form_is_one_sentence(text: str) -> None:
    with pytest.raises(InvalidInput, match="is not MACHINE@SNAPSHOT"):
        SnapshotRef.parse(text)


@pytest.mark.parametrize("text", ["Web_1@snap", "web@Snap_1", "../x@snap"])
def test_names_are_checked_like_any_machine_or_snapshot_name(text: str) -> None:
    with pytest.raises(InvalidInput, match="not a valid"):
        SnapshotRef.parse(text)


def _io(disk: Path, *commands: str) -> str:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, str(disk)], check=True, capture_output=True,
                          text=True).stdout


def _map(disk: Path) -> list[dict[str, object]]:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(disk)],
                         check=True, capture_output=True, text=True).stdout
    extents: list[dict[str, object]] = json.loads(out)
    return extents


@pytest.fixture
def overlay(tmp_path: Path) -> Path:
    """A base with 8 MiB of 0x11; an overlay writing 1 MiB of 0x22, snapshot 's1', then
    2 MiB of 0x33 over it."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    _io(base, "write -P 0x11 0 8M")
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(top)], check=True)
    _io(top, f"write -P 0x22 {MIB} {MIB}")
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(top)], check=True)
    _io(top, f"write -P 0x33 {MIB} {2 * MIB}")
    return top


def test_info_lists_internal_snapshots(overlay: Path) -> None:
    (snap,) = qemu_img.info(overlay, "qcow2", LIMITS).snapshots
    assert (snap.id, snap.name) == ("1", "s1") and snap.date_sec > 0


def test_a_snapshot_becomes_an_overlay_of_the_same_base_holding_its_own_clusters(
        overlay: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    dest = tmp_path / "copy.qcow2"
    qemu_img.convert_snapshot(overlay, "s1", dest, LIMITS, backing=base,
                              options=OVERLAY_OPTIONS)
    info = qemu_img.info(dest, "qcow2", LIMITS)
    assert info.backing_filename == str(base) and info.snapshots == ()
    assert info.format_specific["data"]["extended-l2"] is True
    own = sum(int(str(e["length"])) for e in _map(dest) if e["depth"] == 0 and e["data"])
    assert own == MIB  # the snapshot's own data, not the base's, not what came after
    # as it was at the snapshot: 0x22 where it wrote, the base's 0x11 around it
    _io(dest, f"read -P 0x22 {MIB} {MIB}", f"read -P 0x11 {2 * MIB} {MIB}",
        f"read -P 0x11 0 {MIB}")
    # and the source is untouched
    _io(overlay, f"read -P 0x33 {MIB} {2 * MIB}")


def test_without_a_base_the_copy_stands_alone(overlay: Path, tmp_path: Path) -> None:
    dest = tmp_path / "flat.qcow2"
    qemu_img.convert_snapshot(overlay, "s1", dest, LIMITS, options=OVERLAY_OPTIONS)
    assert qemu_img.info(dest, "qcow2", LIMITS).backing_filename is None
    _io(dest, f"read -P 0x22 {MIB} {MIB}", f"read -P 0x11 {2 * MIB} {6 * MIB}")


def test_an_unknown_snapshot_is_not_found_and_leaves_no_file(overlay: Path,
                                                             tmp_path: Path) -> None:
    dest = tmp_path / "none.qcow2"
    with pytest.raises(NotFound, match="No snapshot named 'nope'"):
        qemu_img.convert_snapshot(overlay, "nope", dest, LIMITS)
    assert not dest.exists()


def test_an_existing_destination_is_never_overwritten(overlay: Path, tmp_path: Path) -> None:
    dest = tmp_path / "taken.qcow2"
    dest.write_bytes(b"mine")
    with pytest.raises(Conflict):
        qemu_img.convert_snapshot(overlay, "s1", dest, LIMITS)
    assert dest.read_bytes() == b"mine"
