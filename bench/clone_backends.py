"""Linked-clone time per storage backend, against template size and fragmentation.

Templates: qcow2 of 1 GiB, 64 GiB and 1 TiB virtual size (256 MiB written in one go), and a
file of about 40,000 extents (4 KiB written every 64 KiB of a 2.5 GiB file; raw where
the backend clones raw files, qcow2 with 40,000 clusters allocated for the qcow2
overlay). Backends: qcow2 overlays in a directory of /var/tmp; btrfs (a subvolume per
template, so a clone is a snapshot) and, for contrast, btrfs with the templates side
by side at the pool's top (a clone is then a reflink of the file); XFS reflink; and, where
this machine has what they need (else a row says what it lacks), lvm-thin (thin
snapshots of thin volumes on a loop-device PV), zfs (zfs clone, a dataset per template
on a file-vdev zpool) and rbd (RBD layering, in a namespace of the Ceph pool
CORRAL_TEST_RBD_POOL names). On lvm-thin and rbd the templates are raw block volumes,
converted in from local files. btrfs, XFS, the PV and the vdev are made over sparse
files in /var/tmp, removed afterwards.
Median of 31, taken round-robin, each round starting at another template, each clone
after a sync. Baseline: a plain sparse copy of each template.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench._env import median_ms, qemu_img, row, timed
from corral.storage.base import StorageBackend
from corral.storage.block import BlockVolumeBackend
from corral.storage.btrfs import BtrfsBackend
from corral.storage.lvm_thin import LvmThinBackend
from corral.storage.qcow2_dir import Qcow2DirBackend
from corral.storage.qemu_img import QemuImgLimits
from corral.storage.rbd import RbdBackend
from corral.storage.reflink import ReflinkBackend
from corral.storage.zfs import ZfsBackend
from tests.loopfs import loop_mounted
from tests.storage_pools import lvm_thin_pool, missing_backend, rbd_namespace, zfs_pool

RUNS = 31
LIMITS = QemuImgLimits(cpu_seconds=120, address_space=2 << 30)
STRIDE, CHUNK, EXTENTS = 64 << 10, 4 << 10, 40_000


def _sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _qcow2(path: Path, size: str) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    _sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 256M", str(path))


def _fragmented(path: Path, raw: bool) -> None:
    if raw:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            block = os.urandom(CHUNK)
            for i in range(EXTENTS):
                os.pwrite(fd, block, i * STRIDE)
        finally:
            os.close(fd)
        return
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(EXTENTS * STRIDE))
    script = "\n".join(f"write -P 0xab {i * STRIDE} {CHUNK}" for i in range(EXTENTS))
    subprocess.run(["qemu-io", "-f", "qcow2", str(path)], input=script + "\nquit\n",
                   check=True, capture_output=True, text=True)


def _extent_count(path: Path) -> int | None:
    """Extents as FIEMAP lists them (``filefrag`` alone merges physically adjacent ones);
    None for a block volume, which has no extents to list."""
    if not path.is_file():
        return None
    lines = _sh("filefrag", "-v", str(path)).splitlines()
    return sum(1 for line in lines if line.strip().split(":", 1)[0].isdigit())


def _templates(backend: StorageBackend, root: Path, own_subvolume: bool,
               raw: bool) -> dict[str, tuple[Path, int]]:
    """label -> (template, virtual size), made in the pool the way the backend keeps them."""
    made: dict[str, tuple[Path, int]] = {}
    for label, make, size in (
        ("1 GiB", lambda p: _qcow2(p, "1G"), 1 << 30),
        ("64 GiB", lambda p: _qcow2(p, "64G"), 64 << 30),
        ("1 TiB", lambda p: _qcow2(p, "1T"), 1 << 40),
        (f"{EXTENTS:,} extents", lambda p: _fragmented(p, raw), EXTENTS * STRIDE),
    ):
        name = f"tmpl-{len(made)}"
        path = backend.volume_path(name) if own_subvolume else root / f"{name}.img"
        if isinstance(backend, BlockVolumeBackend):  # a raw block volume, converted in
            local = root / f"{name}.local"
            make(local)
            backend.full_clone(local, path, 0)
            local.unlink()
        else:
            if isinstance(backend, ZfsBackend):
                backend.create_empty(path)  # its dataset; the template then fills the file
                path.unlink()
            elif own_subvolume and path.parent != root:
                _sh("btrfs", "subvolume", "create", str(path.parent))
            make(path)
        made[label] = (path, size)
    os.sync()
    return made


def _measure(name: str, backend: StorageBackend, root: Path, *, own_subvolume: bool,
             raw: bool, baseline: dict[str, float]) -> None:
    templates = _templates(backend, root, own_subvolume, raw)
    samples: dict[str, list[float]] = {label: [] for label in templates}
    order = list(templates.items())
    for i in range(RUNS):
        # Each round starts at another template, so that whatever the first clone of a
        # round pays for (btrfs commits a transaction per snapshot) falls on all alike.
        for label, (base, size) in order[i % len(order):] + order[: i % len(order)]:
            dest = backend.volume_path(f"c{i}-{secrets.token_hex(2)}")
            # Each clone starts from a written-back filesystem: a btrfs snapshot commits
            # a transaction, and would otherwise pay for whatever the last clone left.
            os.sync()
            samples[label].append(timed(lambda b=base, d=dest, s=size:
                                        backend.linked_clone(b, d, s)))
    medians = {label: median_ms(s) for label, s in samples.items()}
    for label, (base, _) in templates.items():
        extents = _extent_count(base)
        counted = "a block volume" if extents is None else f"{extents:,} extents"
        ratio = medians[label] / baseline[label]
        row(f"{name}: clone of {label} ({counted})", f"{medians[label]:.2f} ms",
            f"sparse copy {baseline[label]:.0f} ms (clone / copy {ratio:.3f})")
    spread = max(medians.values()) / min(medians.values())
    row(f"{name}: largest / smallest", f"{spread:.2f}×", "(goal ≤ 1.2)")


def _baseline(top: Path) -> dict[str, float]:
    """A plain sparse copy (no reflink) of each template, once, on /var/tmp."""
    src = top / "baseline"
    src.mkdir()
    made = {"1 GiB": src / "a.qcow2", "64 GiB": src / "b.qcow2", "1 TiB": src / "t.qcow2",
            f"{EXTENTS:,} extents": src / "c.raw"}
    _qcow2(made["1 GiB"], "1G")
    _qcow2(made["64 GiB"], "64G")
    _qcow2(made["1 TiB"], "1T")
    _fragmented(made[f"{EXTENTS:,} extents"], raw=True)
    os.sync()
    out: dict[str, float] = {}
    for label, path in made.items():
        copy = path.with_suffix(".copy")
        out[label] = timed(lambda p=path, c=copy: _sh(
            "cp", "--sparse=always", "--reflink=never", str(p), str(c))) * 1000
        copy.unlink()
    shutil.rmtree(src)
    return out


def run() -> None:
    top = Path("/var/tmp") / f"corral-bench-clone-{secrets.token_hex(3)}"
    top.mkdir()
    try:
        baseline = _baseline(top)
        pool = top / "qcow2"
        pool.mkdir()
        _measure("qcow2 dir", Qcow2DirBackend(pool, LIMITS), pool, own_subvolume=False,
                 raw=False, baseline=baseline)
        cases: list[tuple[str, str, Callable[[Path], StorageBackend], bool]] = [
            ("btrfs snapshot", "btrfs", lambda m: BtrfsBackend(m, LIMITS), True),
            ("btrfs file reflink", "btrfs", lambda m: BtrfsBackend(m, LIMITS), False),
            ("xfs reflink", "xfs", lambda m: ReflinkBackend(m, LIMITS), False),
        ]
        for name, fs, make, own_subvolume in cases:
            case = top / name.replace(" ", "-")
            case.mkdir()
            with loop_mounted(fs, case, 4 << 30) as mnt:
                _measure(name, make(mnt), mnt, own_subvolume=own_subvolume, raw=True,
                         baseline=baseline)
        pools: list[tuple[str, Callable[[Path, str], contextlib.AbstractContextManager[Path]],
                          Callable[[Path], StorageBackend]]] = [
            # 8 GiB: the 40,000-extent template maps its whole 2.5 GiB (a 4 KiB write
            # in every 64 KiB thin-pool chunk or ZFS record).
            ("lvm-thin", lambda t, n: lvm_thin_pool(t, n, 8 << 30),
             lambda r: LvmThinBackend(r, LIMITS)),
            ("zfs", lambda t, n: zfs_pool(t, n, 8 << 30), lambda r: ZfsBackend(r, LIMITS)),
            ("rbd", rbd_namespace, lambda r: RbdBackend(r, LIMITS)),
        ]
        for name, pool_of, make_backend in pools:
            lacking = missing_backend(name)
            if lacking is not None:
                row(name, "skipped", lacking.removeprefix(f"{name}: "))
                continue
            case = top / name
            case.mkdir()
            with pool_of(case, f"corral-bench-{secrets.token_hex(3)}") as pool_root:
                _measure(f"{name} clone", make_backend(pool_root), pool_root,
                         own_subvolume=True, raw=True, baseline=baseline)
    finally:
        shutil.rmtree(top, ignore_errors=True)
