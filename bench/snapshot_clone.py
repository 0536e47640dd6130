"""A disk from a snapshot (`vm create --from-snapshot`) against `qemu-img convert` of the chain.

The source is a linked clone: a qcow2 base of VIRTUAL bytes holding BASE_DATA bytes,
and an overlay in which the "guest" wrote OWN bytes before the snapshot and as many
again after it. Two ways to make the new machine's disk as it was at the snapshot:

- the baseline: `qemu-img convert -l snapshot.name=S -O qcow2` of the whole chain, a
  standalone copy (what copying the snapshot without knowing its base gives);
- Corral's: `storage.qemu_img.convert_snapshot` with the source's base (`-B`), the new
  overlay's layout and Corral's qemu-img limits, as the `disk.from-snapshot` step runs it.

Each run writes a fresh file after a `sync`; rounds run both back to back, and the ratio
is the median over rounds of baseline time / Corral's time. Bytes are those allocated.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench._env import qemu_img, row, timed
from corral.ops.snapshot_clone import OVERLAY_OPTIONS
from corral.storage import qemu_img as qi

ROUNDS = 7
VIRTUAL = 2 << 30
BASE_DATA = 512 << 20
OWN = 32 << 20
LIMITS = qi.QemuImgLimits(cpu_seconds=600, address_space=4 << 30)


def _io(disk: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(disk)], check=True, capture_output=True)


def _source(folder: Path) -> tuple[Path, Path]:
    base = folder / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(VIRTUAL))
    # data every other 64 MiB, as a used template's is spread over its disk
    _io(base, *(f"write -P 0x5a {off} {64 << 20}" for off in range(0, 2 * BASE_DATA, 128 << 20)))
    top = folder / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), "-o",
             ",".join(f"{k}={v}" for k, v in OVERLAY_OPTIONS.items()), str(top))
    # the guest's own writes: 1 MiB every 16 MiB, then a snapshot, then as many again
    _io(top, *(f"write -P 0x11 {off} {1 << 20}" for off in range(0, OWN * 16, 16 << 20)))
    qemu_img("snapshot", "-c", "snap", str(top))
    _io(top, *(f"write -P 0x22 {off} {1 << 20}" for off in range(8 << 20, OWN * 16, 16 << 20)))
    return base, top


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def run() -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="corral-bench-snapclone-") as d:
        folder = Path(d)
        base, top = _source(folder)
        flat, linked = folder / "flat.qcow2", folder / "linked.qcow2"
        ratios, flat_times, linked_times = [], [], []
        sizes = (0, 0)
        for _ in range(ROUNDS):
            for f in (flat, linked):
                f.unlink(missing_ok=True)
            os.sync()
            t_flat = timed(lambda: qemu_img("convert", "-U", "-f", "qcow2", "-l",
                                            "snapshot.name=snap", "-O", "qcow2", str(top),
                                            str(flat)))
            os.sync()
            t_linked = timed(lambda: qi.convert_snapshot(top, "snap", linked, LIMITS,
                                                         backing=base,
                                                         options=OVERLAY_OPTIONS))
            sizes = (_allocated(flat), _allocated(linked))
            flat_times.append(t_flat)
            linked_times.append(t_linked)
            ratios.append(t_flat / t_linked)
        mib = 1 << 20
        row("source: base data / overlay's own before the snapshot",
            f"{BASE_DATA // mib} / {OWN // mib} MiB", f"virtual {VIRTUAL >> 30} GiB")
        row("qemu-img convert of the chain (baseline)",
            f"{statistics.median(flat_times) * 1000:.0f} ms", f"{sizes[0] / mib:.1f} MiB")
        row("convert_snapshot onto the same base (Corral)",
            f"{statistics.median(linked_times) * 1000:.0f} ms", f"{sizes[1] / mib:.1f} MiB")
        row("time: baseline / Corral (median of rounds)", f"{statistics.median(ratios):.1f}x",
            f"min {min(ratios):.1f}x, max {max(ratios):.1f}x")
        row("bytes: baseline / Corral", f"{sizes[0] / max(sizes[1], 1):.1f}x")
