"""First writes into a fresh linked clone: 4 KiB random writes against a raw disk (goal ≤ 2×).

A guest's first writes to a new linked clone land in clusters the overlay does not hold
yet. Each one allocates: with 64 KiB clusters and no subclusters, QEMU first copies the
cluster's other 60 KiB from the base (copy-on-write), then writes. This bench measures
that penalty against a raw disk of the same size, in this process, the way a guest sees
it: `qemu-io` with `-t none` (O_DIRECT, as with cache='none'; the same mode on both
sides), one 4 KiB write at a time at OPS distinct random 4 KiB-aligned offsets over the
first SPAN bytes of a VIRTUAL-byte disk, every configuration fed the same offsets. A
write's time is qemu-io's own measure of that command (no process start, no image open).

The base is a qcow2 template holding data over all of SPAN (what a guest overwrites in a
template's used space: copy-on-write must read it); the second column uses a base that
is sparse there (free space in the template: QEMU then writes zeros cheaply, by
fallocate, instead of copying).

Rows: the raw disk (sparse, as `qemu-img create -f raw` makes it; the baseline), the
overlay Corral wrote before this bench (64 KiB clusters), each setting alone (cluster
size, subclusters `extended_l2`, metadata preallocation, L2 cache size), and Corral's
defaults now. Every run writes into a fresh file. Rounds run every row back to back; a
row's ratio is the median over rounds of raw IOPS / the row's IOPS in the same round.
Then what metadata preallocation costs at creation, for 1 GiB to 1 TiB overlays.
"""

from __future__ import annotations

import random
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench._env import qemu_img, row
from corral.formats.qcow2 import OVERLAY_CLUSTER_BITS, OVERLAY_EXTENDED_L2, write_overlay

ROUNDS = 7
OPS = 4000
SPAN = 4 << 30
VIRTUAL = 8 << 30
KiB, MiB = 1 << 10, 1 << 20
_OPS_PER_SEC = re.compile(r" and ([\d.]+) ops/sec")


@dataclass(frozen=True)
class Setting:
    label: str
    make: Callable[[Path, Path], str]
    """Creates the disk at the path (of the base given); returns its qemu-io image spec."""
    options: str = ""
    """Extra ``--image-opts`` options (the L2 cache)."""


def _raw(path: Path, _base: Path) -> str:
    qemu_img("create", "-q", "-f", "raw", str(path), str(VIRTUAL))
    return "raw"


def _corral(cluster_bits: int, extended_l2: bool) -> Callable[[Path, Path], str]:
    def make(path: Path, base: Path) -> str:
        write_overlay(path, backing_file=str(base), backing_format="qcow2",
                      virtual_size=VIRTUAL, cluster_bits=cluster_bits, extended_l2=extended_l2)
        return "qcow2"
    return make


def _qemu_img(options: str) -> Callable[[Path, Path], str]:
    """For what Corral's writer does not write (metadata preallocation)."""
    def make(path: Path, base: Path) -> str:
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), "-o", options,
                 str(path), str(VIRTUAL))
        return "qcow2"
    return make


SETTINGS = [
    Setting("raw disk, sparse (baseline)", _raw),
    Setting("overlay as Corral wrote it: 64 KiB clusters", _corral(16, False)),
    Setting("cluster 128 KiB", _corral(17, False)),
    Setting("cluster 256 KiB", _corral(18, False)),
    Setting("cluster 2 MiB", _corral(21, False)),
    Setting("extended_l2 (subclusters), cluster 64 KiB", _corral(16, True)),
    Setting("extended_l2, cluster 128 KiB (4 KiB subclusters)", _corral(17, True)),
    Setting("extended_l2, cluster 256 KiB", _corral(18, True)),
    Setting("extended_l2, cluster 2 MiB", _corral(21, True)),
    Setting("preallocation=metadata (needs extended_l2), 64 KiB",
            _qemu_img("extended_l2=on,preallocation=metadata")),
    Setting("preallocation=metadata, extended_l2, 128 KiB",
            _qemu_img("cluster_size=128k,extended_l2=on,preallocation=metadata")),
    Setting("64 KiB, l2-cache-size 128 KiB (covers 1 GiB of 4)", _corral(16, False),
            "l2-cache-size=131072"),
    Setting("64 KiB, l2-cache-size 64 MiB (QEMU 7.2 default ≤ 32)", _corral(16, False),
            "l2-cache-size=67108864"),
    Setting("ext_l2 128 KiB, l2-cache-size 64 MiB", _corral(17, True),
            "l2-cache-size=67108864"),
    Setting(f"Corral's defaults now ({1 << OVERLAY_CLUSTER_BITS >> 10} KiB, extended_l2 "
            f"{'on' if OVERLAY_EXTENDED_L2 else 'off'})",
            _corral(OVERLAY_CLUSTER_BITS, OVERLAY_EXTENDED_L2)),
]


def _iops(folder: Path, base: Path, setting: Setting, offsets: list[int]) -> float:
    disk = folder / "disk"
    try:
        driver = setting.make(disk, base)
        spec = f"driver={driver},file.filename={disk}"
        if setting.options:
            spec += f",{setting.options}"
        writes = [arg for off in offsets for arg in ("-c", f"write {off} 4k")]
        result = subprocess.run(["qemu-io", "-t", "none", "--image-opts", *writes, spec],
                                capture_output=True, text=True, check=True)
    finally:
        disk.unlink(missing_ok=True)
    rates = [float(r) for r in _OPS_PER_SEC.findall(result.stdout)]
    if len(rates) != len(offsets):
        raise RuntimeError(f"qemu-io reported {len(rates)} of {len(offsets)} writes: "
                           f"{result.stdout[-300:]} {result.stderr[-300:]}")
    return len(rates) / sum(1 / r for r in rates)


def _base(folder: Path, name: str, *, filled: bool) -> Path:
    base = folder / name
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(VIRTUAL))
    for at in range(0, SPAN if filled else 0, 1 << 30):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x5a {at} 1G", str(base)],
                       check=True, capture_output=True)
    return base


def _preallocation_cost(folder: Path, base: Path) -> None:
    print("\n  creating an overlay: time, and bytes allocated on the host")
    for label, size in (("1 GiB", 1 << 30), ("100 GiB", 100 << 30), ("1 TiB", 1 << 40)):
        for what, options in (("Corral's writer, defaults", None),
                              ("qemu-img, extended_l2 + preallocation=metadata",
                               "extended_l2=on,preallocation=metadata"),
                              ("the same, 128 KiB clusters",
                               "cluster_size=128k,extended_l2=on,preallocation=metadata")):
            path = folder / "created.qcow2"
            began = time.perf_counter()
            if options is None:
                write_overlay(path, backing_file=str(base), backing_format="qcow2",
                              virtual_size=size)
            else:
                qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                         "-o", options, str(path), str(size))
            took = time.perf_counter() - began
            allocated = path.stat().st_blocks * 512
            path.unlink()
            row(f"  {label}: {what}", f"{took * 1000:.1f} ms", f"{allocated / MiB:.1f} MiB")


def run() -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="corral-bench-fw-") as tmp:
        folder = Path(tmp)
        bases = {"base holds data": _base(folder, "filled.qcow2", filled=True),
                 "base sparse there": _base(folder, "sparse.qcow2", filled=False)}
        iops: dict[tuple[str, str], list[float]] = {
            (b, s.label): [] for b in bases for s in SETTINGS}
        rng = random.Random(6)
        for _ in range(ROUNDS):
            offsets = [slot * 4 * KiB for slot in rng.sample(range(SPAN // (4 * KiB)), OPS)]
            for name, base in bases.items():
                for setting in SETTINGS:
                    iops[name, setting.label].append(_iops(folder, base, setting, offsets))
        raw = SETTINGS[0].label
        print(f"  {OPS} writes of 4 KiB at random over {SPAN >> 30} GiB, qemu-io -t none, "
              f"median of {ROUNDS}; ratio = raw IOPS / IOPS (goal ≤ 2)")
        print(f"  {'':<52} {' | '.join(f'{b:<22}' for b in bases)}")
        for setting in SETTINGS:
            cells = []
            for name in bases:
                samples = iops[name, setting.label]
                ratio = statistics.median(
                    r / s for r, s in zip(iops[name, raw], samples, strict=True))
                cells.append(f"{statistics.median(samples):7.0f} IOPS {ratio:4.2f}×")
            print(f"  {setting.label:<52} {' | '.join(cells)}")
        _preallocation_cost(folder, bases["base holds data"])
