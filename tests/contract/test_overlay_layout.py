"""Every backend whose linked clone is a qcow2 overlay makes it with the layout
bench/first_write chose (128 KiB clusters with subclusters), as QEMU reports it."""

from __future__ import annotations

import json
import subprocess

from corral.formats.qcow2 import OVERLAY_CLUSTER_BITS, OVERLAY_EXTENDED_L2
from tests.contract.test_storage_backends import (  # noqa: F401 (env is a fixture)
    Env,
    MiB,
    env,
    make_base,
    overlays,
    qemu_img,
    reads,
)


def test_a_linked_clone_has_subclusters_and_reads_through_them(env: Env) -> None:  # noqa: F811
    base = make_base(env)
    clone = env.backend.volume_path("clone")
    env.backend.linked_clone(base, clone, 128 * MiB)
    info = json.loads(qemu_img("info", "-f", "qcow2", "--output=json", str(clone)).stdout)
    if not overlays(env):  # a reflinked copy of the base keeps the base's own layout
        assert "backing-filename" not in info
        return
    assert info["backing-filename"] == str(base)
    assert info["cluster-size"] == 1 << OVERLAY_CLUSTER_BITS == 128 << 10
    assert info["format-specific"]["data"]["extended-l2"] is OVERLAY_EXTENDED_L2 is True
    # A 4 KiB write inside a cluster the base filled: the rest still reads from the base.
    qemu_img("check", "-f", "qcow2", str(clone))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 132k 4k", str(clone)],
                   check=True, capture_output=True)
    assert reads(env, clone, 0xcd, "132k", "4k")
    assert reads(env, clone, 0xab, "128k", "4k") and reads(env, clone, 0xab, "136k", "120k")
    assert reads(env, base, 0xab, "132k", "4k")
