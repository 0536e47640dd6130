"""Disk conversion on import against raw `qemu-img convert` of the same file (goal ≥ 0.95×).

A VMware disk of 2 GiB virtual size holding 1 GiB of random data (every other 64 MiB),
as a single sparse VMDK and split into 2 GiB extents. Corral's side is the whole
`corral import vmx --no-start` minus the command line: vetting every file, the job, the
conversion into the pool, the record and the domain. The baseline converts the same
file with `qemu-img convert -f vmdk -O qcow2`. Runs alternate, each after a `sync` so
that neither pays for the other's writeback, and both read a warm page cache; median
and best of 7. Throughput ratio = baseline time / Corral's time, per back-to-back pair.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from bench._env import bench_context, qemu_img, row, timed
from corral.formats.foreign import ForeignDisk, ForeignMachine
from corral.ops import lifecycle
from corral.ops.context import Context
from corral.ops.imports import import_machine

RUNS = 7
VIRTUAL = 2 << 30
CHUNK = 64 << 20


def _make_disk(folder: Path, subformat: str) -> Path:
    raw = folder / "disk.raw"
    if not raw.exists():
        with raw.open("wb") as f:
            f.truncate(VIRTUAL)
            for offset in range(0, VIRTUAL, 2 * CHUNK):
                f.seek(offset)
                f.write(os.urandom(CHUNK))
    disk = folder / f"{subformat}.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", str(raw),
             str(disk))
    return disk


def _ours(ctx: Context, disk: Path, run: int) -> float:
    name = f"{ctx.settings.pool_name}-{disk.stem.lower()}-{run}"
    foreign = ForeignMachine(name=name, cpus=1, memory_bytes=256 << 20,
                             disks=(ForeignDisk(disk.name, "scsi", "vmdk"),))
    os.sync()
    took = timed(lambda: import_machine(ctx, foreign, disk.parent, kernel_image="appliance",
                                        new_identity=True, start=False))
    lifecycle.delete(ctx, name, force=True)
    return took


def _baseline(folder: Path, disk: Path) -> float:
    out = folder / "baseline.qcow2"
    os.sync()
    took = timed(lambda: qemu_img("convert", "-f", "vmdk", "-O", "qcow2", str(disk), str(out)))
    out.unlink()
    return took


def run() -> None:
    with bench_context() as ctx:
        folder = ctx.settings.state_dir / "vmware"
        folder.mkdir()
        for subformat in ("monolithicSparse", "twoGbMaxExtentSparse"):
            disk = _make_disk(folder, subformat)
            ours, theirs = [], []
            for i in range(RUNS):
                theirs.append(_baseline(folder, disk))
                ours.append(_ours(ctx, disk, i))
            mine, base = statistics.median(ours), statistics.median(theirs)
            mib = VIRTUAL / (1 << 20)
            row(f"import, 2 GiB {subformat} VMDK (1 GiB data)",
                f"{mine:.2f} s", f"{mib / mine:.0f} MiB/s virtual, best {min(ours):.2f} s")
            row("  qemu-img convert of the same file", f"{base:.2f} s",
                f"{mib / base:.0f} MiB/s, best {min(theirs):.2f} s")
            # Each pair ran back to back, under the same load from whatever else runs.
            paired = statistics.median(t / o for t, o in zip(theirs, ours, strict=True))
            row("  throughput ratio, median of pairs (best)", f"{paired:.2f}×",
                f"({min(theirs) / min(ours):.2f}×)  goal ≥ 0.95")
