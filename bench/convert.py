"""Disk conversion on import against raw `qemu-img convert` of the same file (goal ≥ 0.95×).

A VMware disk of 2 GiB virtual size holding 1 GiB of random data (every other 64 MiB),
as a single sparse VMDK and split into 2 GiB extents. Three ways, in rounds:

- the baseline: `qemu-img convert -f vmdk -O qcow2` of the file;
- the import's disk conversion: locating and vetting every file the disk needs (header
  inspection, `qemu-img info` and `check`, the descriptor Corral writes for a split
  disk), then converting it into the pool, as the `disk.import` step does;
- the whole `corral import vmx --no-start` minus the command line: the above plus
  placement, the job and its records, and the domain's definition.

Each run follows a `sync`, so that none pays for another's writeback; all read a warm
page cache. On a shared machine single runs vary by 2×, so the ratio is the median
over rounds of baseline time / Corral's time, each round's runs back to back.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path

from bench._env import bench_context, qemu_img, row, timed
from corral.formats.foreign import ForeignDisk, ForeignMachine
from corral.ops import lifecycle
from corral.ops.context import Context
from corral.ops.imports import convert_into_pool, import_machine, locate_disk

RUNS = 9
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


def _synced(fn: Callable[[], object]) -> float:
    os.sync()
    return timed(fn)


def _baseline(disk: Path) -> float:
    out = disk.parent / "baseline.qcow2"
    took = _synced(lambda: qemu_img("convert", "-f", "vmdk", "-O", "qcow2", str(disk),
                                    str(out)))
    out.unlink()
    return took


def _disk_path(ctx: Context, disk: Path) -> float:
    dest = ctx.storage.volume_path("bench-import")
    handle = ctx.on(ctx.settings.host_name)

    def convert() -> None:
        source = locate_disk(ctx.limits, disk.parent, ForeignDisk(disk.name, "scsi", "vmdk"))
        convert_into_pool(ctx, handle, source.to_args(), dest)

    took = _synced(convert)
    dest.unlink()
    return took


def _whole_import(ctx: Context, disk: Path, run: str) -> float:
    name = f"{ctx.settings.pool_name}-{disk.stem.lower()}-{run}"
    foreign = ForeignMachine(name=name, cpus=1, memory_bytes=256 << 20,
                             disks=(ForeignDisk(disk.name, "scsi", "vmdk"),))
    took = _synced(lambda: import_machine(ctx, foreign, disk.parent, name=name,
                                          kernel_image="appliance", new_identity=True,
                                          start=False))
    lifecycle.delete(ctx, name, force=True)
    return took


def run() -> None:
    with bench_context() as ctx:
        folder = ctx.settings.state_dir / "vmware"
        folder.mkdir()
        _whole_import(ctx, _make_disk(folder, "monolithicSparse"), "warm")  # loads numpy & co
        for subformat in ("monolithicSparse", "twoGbMaxExtentSparse"):
            disk = _make_disk(folder, subformat)
            base, conv, whole = [], [], []
            for i in range(RUNS):
                base.append(_baseline(disk))
                conv.append(_disk_path(ctx, disk))
                whole.append(_whole_import(ctx, disk, str(i)))
            mib = VIRTUAL / (1 << 20)
            b = statistics.median(base)
            row(f"2 GiB {subformat} VMDK (1 GiB data)", "", "")
            row("  qemu-img convert", f"{b:.2f} s", f"{mib / b:.0f} MiB/s virtual")
            for label, times in (("  import's disk conversion (vet + convert)", conv),
                                 ("  whole import, --no-start", whole)):
                ratio = statistics.median(t / o for t, o in zip(base, times, strict=True))
                median = statistics.median(times)
                row(label, f"{median:.2f} s",
                    f"{mib / median:.0f} MiB/s, ratio {ratio:.2f}× (goal ≥ 0.95)")
