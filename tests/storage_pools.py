"""Pools for the storage backends that need more than a directory: an LVM thin pool on
a loop device, a zpool on a file vdev, an RBD namespace in a configured Ceph pool. Each
is removed on the way out, pass or fail; :func:`missing_backend` says in one line what
this machine lacks for one. Used by the contract suite and bench/clone_backends.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=True)


RBD_POOL = "CORRAL_TEST_RBD_POOL"
"""The environment variable naming an RBD pool of a configured Ceph cluster to test in
(each test makes and removes an RBD namespace of its own there)."""


def missing_backend(name: str) -> str | None:
    """What this machine lacks to run a backend's case, in one line; None if nothing."""
    lacks: list[str] = []

    def tool(*names: str) -> None:
        lacks.extend(f"the {n} command" for n in names if shutil.which(n) is None)

    if name == "lvm-thin":
        tool("lvm", "losetup")
        if not Path("/dev/mapper/control").exists():
            lacks.append("device-mapper (/dev/mapper/control)")
        elif shutil.which("dmsetup") and "thin-pool" not in subprocess.run(
                ["dmsetup", "targets"], capture_output=True, text=True, check=False).stdout:
            lacks.append("the dm-thin-pool target")
    elif name == "zfs":
        tool("zfs", "zpool")
        if not Path("/dev/zfs").exists():
            lacks.append("the zfs kernel module (/dev/zfs)")
    else:
        if not os.environ.get(RBD_POOL):
            lacks.append(f"a Ceph pool named in {RBD_POOL}")
        tool("rbd")
        conf = Path(os.environ.get("CEPH_CONF", "/etc/ceph/ceph.conf"))
        if not conf.exists():
            lacks.append(f"a Ceph configuration ({conf})")
        if not Path("/sys/bus/rbd").exists():
            lacks.append("the rbd kernel module (/sys/bus/rbd)")
    return f"{name}: this machine lacks {', '.join(lacks)}" if lacks else None


def quiet(*args: str) -> None:
    """A cleanup command: its failure is printed, never raised over the test's error."""
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"cleanup: {' '.join(args)}: {result.stderr.strip()}")


@contextlib.contextmanager
def lvm_thin_pool(top: Path, vg: str, size: int = 2 << 30) -> Iterator[Path]:
    """A ``size`` loop-device PV, the volume group ``vg`` on it and a thin pool of three
    quarters of it; the pool's directory (with its pool.json) yielded; all removed on
    the way out."""
    image, root = top / "pv.img", top / "pool"
    with image.open("wb") as f:
        f.truncate(size)
    root.mkdir()
    (root / "pool.json").write_text(f'{{"volume_group": "{vg}", "thin_pool": "thin"}}')
    device = run("losetup", "-f", "--show", str(image)).stdout.strip()
    try:
        run("pvcreate", "-q", device)
        try:
            run("vgcreate", "-q", vg, device)
            try:
                run("lvcreate", "-q", "--type", "thin-pool", "-L", f"{size * 3 // 4 >> 20}m",
                    "-n", "thin", vg)
                yield root
            finally:
                quiet("vgremove", "-f", "-y", vg)
        finally:
            quiet("pvremove", "-y", device)
    finally:
        quiet("losetup", "-d", device)


@contextlib.contextmanager
def zfs_pool(top: Path, zpool: str, size: int = 2 << 30) -> Iterator[Path]:
    """A zpool on a ``size`` file vdev and a dataset mounted at the pool's directory
    (with its pool.json) yielded; the zpool destroyed on the way out."""
    vdev, root = top / "vdev.img", top / "pool"
    with vdev.open("wb") as f:
        f.truncate(size)
    run("zpool", "create", "-O", "mountpoint=none", zpool, str(vdev))
    try:
        run("zfs", "create", "-o", f"mountpoint={root}", f"{zpool}/corral")
        (root / "pool.json").write_text(f'{{"dataset": "{zpool}/corral"}}')
        yield root
    finally:
        quiet("zpool", "destroy", "-f", zpool)


@contextlib.contextmanager
def rbd_namespace(top: Path, namespace: str) -> Iterator[Path]:
    """The RBD namespace ``namespace`` in the pool CORRAL_TEST_RBD_POOL names; the pool's
    directory (with its pool.json) yielded; every image in it unmapped and removed,
    clones before their parents, and the namespace removed on the way out."""
    pool, root = os.environ[RBD_POOL], top / "pool"
    root.mkdir()
    (root / "pool.json").write_text(
        f'{{"rbd_pool": "{pool}", "namespace": "{namespace}"}}')
    run("rbd", "namespace", "create", f"{pool}/{namespace}")
    try:
        yield root
    finally:
        for _ in range(5):  # clones first: a parent goes in a later round
            listed = subprocess.run(["rbd", "ls", "--namespace", namespace, pool],
                                    capture_output=True, text=True, check=False).stdout.split()
            if not listed:
                break
            for image in listed:
                spec = f"{pool}/{namespace}/{image}"
                subprocess.run(["rbd", "device", "unmap", spec], capture_output=True,
                               check=False)
                snaps = subprocess.run(["rbd", "snap", "ls", "--format", "json", spec],
                                       capture_output=True, text=True, check=False).stdout
                for snap in json.loads(snaps or "[]"):
                    subprocess.run(["rbd", "snap", "unprotect", f"{spec}@{snap['name']}"],
                                   capture_output=True, check=False)
                subprocess.run(["rbd", "snap", "purge", spec], capture_output=True,
                               check=False)
                subprocess.run(["rbd", "rm", "--no-progress", spec], capture_output=True,
                               check=False)
        quiet("rbd", "namespace", "remove", f"{pool}/{namespace}")
