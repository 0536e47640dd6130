"""Filesystems this machine does not have, made for a test: btrfs and XFS (reflink=1) on
a loop device over a sparse file, unmounted and detached afterwards, pass or fail."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

MKFS = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"]}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=True)


@contextlib.contextmanager
def loop_mounted(fs: str, top: Path, size: int = 2 << 30) -> Iterator[Path]:
    """A fresh ``fs`` on a loop device over a ``size`` sparse file in ``top``, mounted
    on ``top/mnt``; unmounted and detached on the way out, whatever happened. Skips the
    test, saying why, where the tools or a loop device are missing."""
    if shutil.which(MKFS[fs][0]) is None:
        pytest.skip(f"{MKFS[fs][0]} is not installed (scripts/setup.sh installs it)")
    image, mnt = top / f"{fs}.img", top / "mnt"
    with image.open("wb") as f:
        f.truncate(size)
    mnt.mkdir()
    attach = subprocess.run(["losetup", "-f", "--show", str(image)],
                            capture_output=True, text=True, check=False)
    if attach.returncode != 0:
        pytest.skip(f"this machine has no free loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        run(*MKFS[fs], device)
        run("mount", device, str(mnt))
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        image.unlink(missing_ok=True)
