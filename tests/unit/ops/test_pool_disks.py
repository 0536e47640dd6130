"""The backing file a disk in an added pool reads through, as its own header says."""

from __future__ import annotations

import subprocess
from pathlib import Path

from corral.ops.machines import backing_file_of


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_an_overlay_names_its_base_a_standalone_or_raw_disk_none(tmp_path: Path) -> None:
    base, overlay, alone = tmp_path / "base.qcow2", tmp_path / "o.qcow2", tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "16M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(overlay))
    qemu_img("create", "-f", "qcow2", str(alone), "16M")
    raw = tmp_path / "block"
    raw.write_bytes(b"\0" * 65536)
    assert backing_file_of(overlay) == str(base)  # a relative name, made absolute
    assert backing_file_of(alone) is None
    assert backing_file_of(raw) is None
