"""Snapshots of a real guest: a live one with memory resumes a counter where it stood and
brings back the disk as it was; a stopped machine's snapshot brings back its disk; the
tree survives deleting its middle, with the disk intact."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.guest_shell import (
    counter,
    marker,
    start_counter,
    uptime_and_boot,
    write_marker,
)
from tests.integration.conftest import CorralEnv

pytestmark = pytest.mark.guest

URI = "qemu:///system"








def internal_snapshots(disk: str) -> set[str]:
    listed = subprocess.run(["qemu-img", "snapshot", "-l", "-U", disk], check=True,
                            capture_output=True, text=True).stdout
    return {line.split()[1] for line in listed.splitlines()[2:] if line.strip()}


def test_snapshots_revert_memory_and_disk_and_survive_deleting_the_middle(
        with_appliance: CorralEnv) -> None:
    env = with_appliance
    name = env.name("snap")
    try:
        env.run("vm", "create", name, "--image", "appliance", "--wait", timeout=600)
        write_marker(name, "one")
        start_counter(name)
        time.sleep(3)
        _, boot = uptime_and_boot(URI, name)
        at_snapshot = counter(name)
        made = env.json("vm", "snapshot", "create", name, "live", "--description", "one")
        assert made["memory"] is True and made["parent"] is None
        time.sleep(4)
        write_marker(name, "two")
        later = counter(name)
        assert later > at_snapshot + 2

        reverted = env.run("vm", "snapshot", "revert", name, "live")
        assert "running where it was" in reverted.stdout
        assert marker(name) == "one"  # the disk as it was
        resumed = counter(name)
        assert at_snapshot <= resumed < later  # the counter went on from where it stood
        assert uptime_and_boot(URI, name)[1] == boot  # resumed, not booted again

        # a stopped machine: its disk alone
        env.run("vm", "stop", name, timeout=300)
        made = env.json("vm", "snapshot", "create", name, "cold")
        assert made["memory"] is False and made["parent"] == "live"
        env.run("vm", "start", name)
        write_marker(name, "three")
        env.run("vm", "stop", name, timeout=300)
        env.run("vm", "snapshot", "revert", name, "cold")
        env.run("vm", "start", name)
        assert marker(name) == "one"
        env.run("vm", "stop", name, timeout=300)

        # a chain live -> cold -> third; deleting cold keeps third whole
        env.run("vm", "snapshot", "create", name, "third")
        listed = {s["name"]: s for s in env.json("vm", "snapshot", "list", name)}
        assert {n: s["parent"] for n, s in listed.items()} == {
            "live": None, "cold": "live", "third": "cold"}
        assert listed["third"]["current"]
        disk = env.json("vm", "show", name)["disk_path"]
        assert internal_snapshots(disk) == {"live", "cold", "third"}  # inside the qcow2
        env.run("vm", "snapshot", "delete", name, "cold")
        parents = {s["name"]: s["parent"] for s in env.json("vm", "snapshot", "list", name)}
        assert parents == {"live": None, "third": "live"}
        assert internal_snapshots(disk) == {"live", "third"}
        check = subprocess.run(["qemu-img", "check", "-U", disk], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        env.run("vm", "snapshot", "revert", name, "third")
        env.run("vm", "start", name)
        assert marker(name) == "one"

        # refusals: one sentence, nothing changed
        taken = env.run("vm", "snapshot", "create", name, "third", check=False)
        assert taken.returncode == 4 and "already has a snapshot named 'third'" in taken.stderr
        missing = env.run("vm", "snapshot", "revert", name, "cold", check=False)
        assert missing.returncode == 3 and "No snapshot" in missing.stderr
        bad = env.run("vm", "snapshot", "create", name, "Not_A_Name", check=False)
        assert bad.returncode == 2
        assert re.search(r"not a valid snapshot name", bad.stderr)
        assert {s["name"] for s in env.json("vm", "snapshot", "list", name)} == {
            "live", "third"}
    finally:
        env.run("vm", "delete", "--force", name, check=False)
