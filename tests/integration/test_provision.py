"""Real guests under TCG: identity, copy-on-write isolation, lifecycle, clone."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from corral.ops.console import read_ready

from .conftest import CORRAL, CorralEnv, libvirt_domain_names

pytestmark = pytest.mark.guest


def _console(env: CorralEnv, name: str) -> Path:
    return env.root / "state" / "console" / f"{name}.log"


def test_three_linked_clones_boot_each_with_its_own_identity(with_appliance: CorralEnv) -> None:
    env = with_appliance
    key = env.root / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2cUBh2s3ytest corral@test\n")
    env.run(
        "vm",
        "create",
        env.name("web"),
        "--image",
        "appliance",
        "--count",
        "3",
        "--cpus",
        "2",
        "--ssh-key",
        str(key),
        "--wait",
    )
    shown = {m["name"]: m for m in env.json("vm", "list")}
    names = [env.name(f"web-{i}") for i in (1, 2, 3)]
    assert sorted(shown) == names
    reports = {}
    for name in names:
        report = read_ready(_console(env, name))
        assert report is not None, f"{name} never said it was ready"
        reports[name] = report
        assert shown[name]["state"] == "running"
        assert report.hostname == shown[name]["hostname"] == name
        assert report.instance_id == shown[name]["instance_id"]
        assert report.mac == shown[name]["mac"]
    for attr in ("hostname", "instance_id", "mac"):
        assert len({getattr(r, attr) for r in reports.values()}) == 3
    assert len({m["uuid"] for m in shown.values()}) == 3
    # every machine's disk is an overlay on the same base; the base is shared, not copied
    assert all(m["shared_bytes"] > 1 << 20 for m in shown.values())
    # an operator on the serial console gets the guest's shell, and Ctrl-] detaches
    screen, code = _console_session(env, names[1], b"echo MARK-$(hostname)-$(nproc)\r")
    assert f"MARK-{names[1]}-2" in screen and code == 0  # and the guest sees its 2 vCPUs


def _console_session(env: CorralEnv, name: str, typed: bytes) -> tuple[str, int]:
    """Run `corral vm console NAME` on a pseudo-terminal, type, detach; (screen, exit)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child becomes the corral process
        os.environ.update(env.env)
        os.execv(CORRAL, [CORRAL, "vm", "console", name])
    screen = b""

    def read_for(seconds: float, until: bytes | None = None) -> None:
        nonlocal screen
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until is not None and until in screen:
                return
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    screen += os.read(fd, 4096)
                except OSError:
                    return

    try:
        # Type only once attached: on a loaded machine the CLI may take seconds to start.
        read_for(20, until=b"Ctrl-] detaches.")
        read_for(0.5)
        os.write(fd, b"\r" + typed)
        read_for(3)
        os.write(fd, b"\x1d")  # Ctrl-]
        read_for(2)
    finally:
        status = _reap(pid, timeout=10)
        os.close(fd)
    return screen.decode(errors="replace"), status


def _reap(pid: int, timeout: float) -> int:
    """The child's exit code; a child that did not detach in time is killed (-9)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_fresh_linked_clone_owns_at_most_256_kib(with_appliance: CorralEnv) -> None:
    env = with_appliance
    env.run(
        "vm",
        "create",
        env.name("thin"),
        "--image",
        "appliance",
        "--no-start",
        "--disk-size",
        "100G",
    )
    shown = env.json("vm", "show", env.name("thin"))
    assert shown["owned_bytes"] <= 256 << 10
    assert shown["virtual_size"] == 100 << 30
    assert Path(shown["disk_path"]).stat().st_blocks * 512 == shown["owned_bytes"]


def _qemu_io(
    path: str, command: str, *, writable: bool = False
) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "qcow2"] + ([] if writable else ["-r", "-U"])
    return subprocess.run([*args, "-c", command, path], capture_output=True, text=True, check=False)


def test_writes_to_one_clone_reach_neither_its_sibling_nor_the_base(
    with_appliance: CorralEnv,
) -> None:
    env = with_appliance
    env.run("vm", "create", env.name("cow"), "--image", "appliance", "--count", "2", "--no-start")
    a, b = (env.json("vm", "show", env.name(f"cow-{i}")) for i in (1, 2))
    offset = 32 << 20  # inside the filesystem image, past its metadata
    wrote = _qemu_io(a["disk_path"], f"write -P 0xc7 {offset} 1M", writable=True)
    assert wrote.returncode == 0, wrote.stderr
    assert (
        "Pattern verification failed"
        not in _qemu_io(a["disk_path"], f"read -P 0xc7 {offset} 1M").stdout
    )
    base = env.json("image", "show", "appliance")["path"]
    for other in (b["disk_path"], base):
        probe = _qemu_io(other, f"read -P 0xc7 {offset} 1M")
        assert "Pattern verification failed" in probe.stdout, other
    assert env.json("vm", "show", env.name("cow-1"))["owned_bytes"] > 1 << 20
    assert env.json("vm", "show", env.name("cow-2"))["owned_bytes"] <= 256 << 10


def test_lifecycle_stop_start_reboot_kill_delete(with_appliance: CorralEnv) -> None:
    env = with_appliance
    name = env.name("life")
    env.run("vm", "create", name, "--image", "appliance", "--wait")

    refused = env.run("vm", "delete", name, check=False)
    assert refused.returncode == 4
    assert "is running" in refused.stderr and "--force" in refused.stderr

    stopped = env.run("vm", "stop", name)
    assert "forced" not in stopped.stdout  # the guest honoured ACPI
    assert env.json("vm", "show", name)["state"] == "shut-off"

    env.run("vm", "start", name)
    env.run("vm", "reboot", name)  # graceful reboot keeps it running
    assert env.json("vm", "show", name)["state"] == "running"
    env.run("vm", "kill", name)
    assert env.json("vm", "show", name)["state"] == "shut-off"

    shown = env.json("vm", "show", name)
    env.run("vm", "start", name)
    env.run("vm", "delete", "--force", name)
    assert name not in libvirt_domain_names(env.prefix)
    assert not Path(shown["disk_path"]).exists()
    assert not Path(shown["seed_path"]).exists()
    assert not _console(env, name).exists()
    assert env.json("vm", "list") == []
    assert env.run("vm", "show", name, check=False).returncode == 3


def test_clone_gives_a_stopped_machine_a_new_identity(with_appliance: CorralEnv) -> None:
    env = with_appliance
    src, new = env.name("src"), env.name("copy")
    env.run("vm", "create", src, "--image", "appliance", "--wait")
    refused = env.run("vm", "clone", src, new, check=False)
    assert refused.returncode == 4 and "Stop it" in refused.stderr
    env.run("vm", "stop", src)
    cloned = env.run("vm", "clone", src, new)
    a, b = env.json("vm", "show", src), env.json("vm", "show", new)
    for key in ("uuid", "mac", "hostname", "instance_id", "disk_path", "seed_path"):
        assert a[key] != b[key], key
    # the command says which identity the clone did not keep
    said = " ".join(cloned.stdout.split())
    for key in ("uuid", "mac"):
        assert f"{key} {a[key]} → {b[key]}" in said
    assert b["state"] == "shut-off" and b["image"] == "appliance"
    # the copy reads exactly as the source, and shares the same base
    same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", "-U",
                           a["disk_path"], b["disk_path"]], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr
    assert b["shared_bytes"] == a["shared_bytes"] > 0
    env.run("vm", "start", new)
    from corral.ops.provision import wait_ready

    with env.context() as ctx:
        report = wait_ready(ctx, [new], 120)[new]
    assert (report.hostname, report.mac, report.instance_id) == (new, b["mac"], b["instance_id"])
