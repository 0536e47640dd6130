"""Reconciliation: unmanaged domains are listed and adoptable; vanished ones are marked."""

from __future__ import annotations

import subprocess

from .conftest import CorralEnv


def _virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], check=True, capture_output=True)


def test_sync_lists_unmanaged_adopts_and_marks_missing(with_appliance: CorralEnv) -> None:
    env = with_appliance
    outsider, ours = env.name("outsider"), env.name("ours")
    disk = env.root / "outsider.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True)
    xml = env.root / "outsider.xml"
    # a domain an administrator defined by hand, the way virt-install would
    xml.write_text(
        f"<domain type='qemu'><name>{outsider}</name><memory unit='MiB'>64</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>"
    )
    _virsh("define", str(xml))
    env.run("vm", "create", ours, "--image", "appliance", "--no-start")

    report = {r["name"]: r["status"] for r in env.json("sync")}
    assert report[outsider] == "unmanaged"
    assert ours not in report

    adopted = env.json("vm", "adopt", outsider)
    assert adopted["adopted"] is True and adopted["disk_path"] == str(disk)
    assert adopted["memory_bytes"] == 64 << 20
    assert outsider not in {r["name"] for r in env.json("sync")}

    _virsh("undefine", ours)  # behind Corral's back
    # sync covers the whole host; other domains there are not this test's business
    report = {r["name"]: r["status"] for r in env.json("sync") if r["name"].startswith(env.prefix)}
    assert report == {ours: "missing"}
    listed = {m["name"]: m for m in env.json("vm", "list")}
    assert listed[ours]["state"] == "missing" and listed[ours]["record"] == "missing"
    assert set(listed) == {ours, outsider}  # nothing deleted silently
