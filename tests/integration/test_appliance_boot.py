"""Booting the built appliance under plain QEMU with software emulation (TCG).

No libvirt here: QEMU is started directly, with a linked qcow2 overlay over the
appliance's disk, a NoCloud seed ISO made with pycdlib, and a NIC whose backend is a
UDP socket on 127.0.0.1 (nothing leaves the machine). The serial console goes to a
log file and to a Unix socket the test types into; QMP presses the power button.
Every QEMU is killed by its pid when a test ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from corral.identity.seed import SeedContent, write_seed
from corral.images.appliance import ApplianceArtifacts, build_appliance

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
        reason="skipped: qemu-system-x86_64 and qemu-img are not installed",
    ),
]

CACHE = Path(__file__).resolve().parents[2] / "build" / "cache"
BOOT_TIMEOUT = 60.0  # a boot takes about 1.5 s alone; CI machines are busy
MAC = "52:54:00:12:34:56"
KEYS = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@corral",
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 second@corral",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ApplianceArtifacts:
    return build_appliance(tmp_path_factory.mktemp("appliance") / "out", CACHE)


def free_udp_ports() -> tuple[int, int]:
    """Two distinct free UDP ports on 127.0.0.1."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as one,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as two,
    ):
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        return one.getsockname()[1], two.getsockname()[1]


def console_lines(log: Path) -> list[str]:
    """The console's complete lines, stripped as Corral strips them (ops.console).

    A line without its newline yet is left out: the UART sends 16 bytes at a time, so
    the log can end in the middle of the readiness line.
    """
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    return [raw.decode("utf-8", "replace").strip("\r\n \x00") for raw in complete.splitlines()]


@dataclass
class Guest:
    """One QEMU process and its console; ``stop()`` kills it by pid."""

    workdir: Path
    process: subprocess.Popen[bytes]
    started: float
    log: Path
    serial: socket.socket | None = None
    qmp: socket.socket | None = None
    _reader: threading.Thread | None = field(default=None, repr=False)

    def wait_for_line(self, prefix: str, *, count: int = 1, timeout: float = BOOT_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in console_lines(self.log) if line.startswith(prefix)]
            if len(found) >= count:
                return found[count - 1]
            if self.process.poll() is not None and len(found) < count:
                break
            time.sleep(0.02)
        raise AssertionError(
            f"no console line starting with {prefix!r} (#{count}); console:\n"
            + self.log.read_text(errors="replace")[-3000:]
        )

    def wait_for_text(self, text: str, *, after: int = 0, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log.read_text(errors="replace")
            if text in content[after:]:
                return content[after:]
            time.sleep(0.02)
        raise AssertionError(f"{text!r} never appeared; console:\n{content[-3000:]}")

    def connect_serial(self) -> None:
        self.serial = connect_unix(self.workdir / "serial.sock")

        def drain() -> None:  # the log file keeps everything; keep QEMU's socket flowing
            assert self.serial is not None
            try:
                while self.serial.recv(65536):
                    pass
            except OSError:
                return

        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()

    def run(self, command: str, *, timeout: float = 30.0) -> list[str]:
        """Type a command into the root shell on ttyS0; its output lines."""
        assert self.serial is not None
        nonce = time.monotonic_ns()
        begin, end = f"BEGIN-{nonce}", f"END-{nonce}"
        offset = len(self.log.read_text(errors="replace"))
        # The shell expands $n: the terminal's echo of the typed line never holds the
        # markers themselves, however it wraps.
        self.serial.sendall(f"n={nonce}; echo BEGIN-$n; {command}; echo END-$n\n".encode())
        text = self.wait_for_text(f"\n{end}", after=offset, timeout=timeout)
        lines = [line.strip("\r") for line in text.split("\n")]
        return lines[lines.index(begin) + 1 : lines.index(end)]

    def power_button(self) -> None:
        """What `virsh shutdown` does: an ACPI power button press (QMP system_powerdown)."""
        if self.qmp is None:
            self.qmp = connect_unix(self.workdir / "qmp.sock")
            self.qmp.recv(65536)  # greeting
            self.qmp.sendall(b'{"execute": "qmp_capabilities"}\n')
            self.qmp.recv(65536)
        self.qmp.sendall(b'{"execute": "system_powerdown"}\n')

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        for sock in (self.serial, self.qmp):
            if sock is not None:
                sock.close()
        if self.process.poll() is None:
            self.process.kill()  # by the pid we started, nothing else
        self.process.wait(timeout=30)


def connect_unix(path: Path) -> socket.socket:
    deadline = time.monotonic() + 30
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class BootFn(Protocol):
    def __call__(
        self,
        *,
        seed: tuple[str, str] | None = None,
        nic: bool = True,
        disk: bool = True,
        extra_cmdline: str = "",
    ) -> Guest: ...


@pytest.fixture
def boot(built: ApplianceArtifacts, tmp_path: Path) -> Iterator[BootFn]:
    guests: list[Guest] = []

    def start(
        *,
        seed: tuple[str, str] | None = None,
        nic: bool = True,
        disk: bool = True,
        extra_cmdline: str = "",
    ) -> Guest:
        workdir = tmp_path / f"guest{len(guests)}"
        workdir.mkdir()
        args = [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-machine", "pc",
            "-m", "256",
            "-smp", "1",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-kernel", str(built.kernel),
            "-initrd", str(built.initrd),
            "-append", f"{built.cmdline} {extra_cmdline}".strip(),
            "-chardev",
            f"socket,id=serial0,path={workdir / 'serial.sock'},server=on,wait=off,"
            f"logfile={workdir / 'console.log'}",
            "-serial", "chardev:serial0",
            "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        ]  # fmt: skip
        if disk:
            overlay = workdir / "disk.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                 "-b", str(built.disk), str(overlay)],
                check=True,
            )  # fmt: skip
            args += ["-drive", f"file={overlay},format=qcow2,if=virtio"]
        if seed is not None:
            write_seed(workdir / "seed.iso", SeedContent(*seed))  # Corral's own writer
            args += ["-drive", f"file={workdir / 'seed.iso'},format=raw,if=virtio,readonly=on"]
        if nic:
            # A UDP socket backend on loopback: the NIC exists, nothing leaves the host.
            peer, local = free_udp_ports()
            args += [
                "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
                "-netdev", f"socket,id=n0,udp=127.0.0.1:{peer},localaddr=127.0.0.1:{local}",
            ]  # fmt: skip
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, cwd=workdir)
        guest = Guest(workdir, process, time.monotonic(), workdir / "console.log")
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.stop()


SEED = (
    'instance-id: "6f1c9e0a-2b1d-4c7e-9f00-0123456789ab"\nlocal-hostname: "meta-name"\n',
    "#cloud-config\n"
    'hostname: "web-1"\n'
    "ssh_authorized_keys:\n" + "".join(f'  - "{key}"\n' for key in KEYS),
)


def test_boots_to_ready_with_the_seeds_identity(boot: BootFn) -> None:
    guest = boot(seed=SEED)
    line = guest.wait_for_line("CORRAL-READY")
    elapsed = time.monotonic() - guest.started
    cpu = guest.cpu_seconds()
    print(f"\nready after {elapsed:.2f} s wall, {cpu:.2f} s of QEMU CPU: {line}")
    assert line == (
        f"CORRAL-READY hostname=web-1 instance-id=6f1c9e0a-2b1d-4c7e-9f00-0123456789ab mac={MAC}"
    )
    assert [x for x in console_lines(guest.log) if x.startswith("CORRAL-")] == [line]

    guest.connect_serial()
    guest.wait_for_text(":~# ")
    assert guest.run("cat /root/.ssh/authorized_keys") == list(KEYS)
    assert guest.run("stat -c '%a %U' /root/.ssh /root/.ssh/authorized_keys") == [
        "700 root",
        "600 root",
    ]
    assert guest.run("cat /var/lib/corral/instance-id; hostname; cat /etc/hostname") == [
        "6f1c9e0a-2b1d-4c7e-9f00-0123456789ab",
        "web-1",
        "web-1",
    ]
    assert guest.run("ip -o link show eth0 | grep -c ',UP'") == ["1"]
    # The seed was read from the ISO's Rock Ridge names, and let go afterwards.
    assert guest.run("grep -c /mnt/seed /proc/mounts") == ["0"]


def test_power_button_powers_off_within_seconds(boot: BootFn) -> None:
    guest = boot(seed=SEED)
    guest.wait_for_line("CORRAL-READY")
    pressed = time.monotonic()
    guest.power_button()
    assert guest.process.wait(timeout=10) == 0
    print(f"\npowered off {time.monotonic() - pressed:.2f} s after the button")


def test_guest_reboot_comes_back_ready(boot: BootFn) -> None:
    guest = boot(seed=SEED)
    first = guest.wait_for_line("CORRAL-READY")
    guest.connect_serial()
    guest.wait_for_text(":~# ")
    guest.serial.sendall(b"reboot\n")  # type: ignore[union-attr]
    assert guest.wait_for_line("CORRAL-READY", count=2) == first
    assert guest.process.poll() is None


def test_without_seed_or_nic_it_reports_defaults(boot: BootFn) -> None:
    guest = boot(seed=None, nic=False)
    assert (
        guest.wait_for_line("CORRAL-READY")
        == "CORRAL-READY hostname=appliance instance-id=none mac=none"
    )


def test_probe_mode_says_ok_and_powers_off_before_any_disk(boot: BootFn) -> None:
    guest = boot(disk=False, nic=False, extra_cmdline="corral.probe")
    assert guest.process.wait(timeout=BOOT_TIMEOUT) == 0  # it powered itself off
    lines = console_lines(guest.log)
    assert "CORRAL-PROBE-OK" in lines
    assert not any(line.startswith(("CORRAL-READY", "CORRAL-ERROR")) for line in lines)


def test_ready_is_fast_under_tcg(boot: BootFn) -> None:
    """Median over 3 boots; the goal is about 3 s, the bound leaves room for a busy host."""
    times = []
    for _ in range(3):
        guest = boot(seed=SEED)
        guest.wait_for_line("CORRAL-READY")
        times.append(time.monotonic() - guest.started)
        guest.stop()
    median = sorted(times)[1]
    print(f"\nboot to ready: {', '.join(f'{t:.2f}' for t in times)} s; median {median:.2f} s")
    assert median < 10
