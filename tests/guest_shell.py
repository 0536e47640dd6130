"""Run a command in a running appliance guest through its serial console (a shell on
ttyS0), over libvirt's console stream: works for a guest on any test host."""

from __future__ import annotations

import contextlib
import re
import threading
import time

import libvirt

from tests.multihost import connection


def run_in_guest(uri: str, name: str, command: str, answer: str, timeout: float = 60) -> str:
    """Type ``command`` on the guest's console and return the first match of the regex
    ``answer`` in what the guest prints after it (group 1 if the pattern has one)."""
    pattern = re.compile(answer)
    with connection(uri) as conn:
        stream = conn.newStream(0)
        conn.lookupByName(name).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        received = bytearray()
        lock = threading.Lock()

        def read() -> None:
            try:
                while chunk := stream.recv(4096):
                    if isinstance(chunk, int):  # -2: would block; not on a blocking stream
                        continue
                    with lock:
                        received.extend(chunk)
            except libvirt.libvirtError:
                return  # the stream was aborted: done

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + timeout
            next_send = 0.0
            while time.monotonic() < deadline:
                if time.monotonic() >= next_send:  # again, in case the shell was not there yet
                    stream.send(f"\n{command}\n".encode())
                    next_send = time.monotonic() + 5
                with lock:
                    text = received.decode(errors="replace")
                found = pattern.search(text)
                if found:
                    return found.group(1) if pattern.groups else found.group(0)
                time.sleep(0.2)
            raise AssertionError(f"{name} never answered {command!r}; its console showed:\n"
                                 f"{text[-2000:]}")
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            reader.join(timeout=5)


def uptime_and_boot(uri: str, name: str) -> tuple[float, str]:
    """The guest's uptime in seconds and its boot id (which changes on every boot)."""
    marker = f"U{time.monotonic_ns()}"
    line = run_in_guest(
        uri, name,
        f"echo {marker} $(cut -d' ' -f1 /proc/uptime) $(cat /proc/sys/kernel/random/boot_id)",
        rf"{marker} ([0-9.]+ [0-9a-f-]{{36}})",
    )
    uptime, boot_id = line.split()
    return float(uptime), boot_id


# -- what the snapshot tests read and write in an appliance guest on qemu:///system --------

LOCAL = "qemu:///system"


def marker(name: str, uri: str = LOCAL) -> str:
    """The word in /root/marker (on the guest's disk)."""
    return run_in_guest(uri, name, "echo M=$(cat /root/marker)", r"M=(\w+)")


def write_marker(name: str, value: str, uri: str = LOCAL) -> None:
    run_in_guest(uri, name, f"echo {value} >/root/marker && sync && echo W{value}", f"W{value}")


def start_counter(name: str, uri: str = LOCAL) -> None:
    """A counter in memory only (/run is tmpfs), one a second: it survives a revert only
    if the guest's memory does."""
    run_in_guest(uri, name, "(i=0; while :; do i=$((i+1)); echo $i >/run/counter; "
                 "sleep 1; done) >/dev/null 2>&1 & echo STARTED", "STARTED")


def counter(name: str, uri: str = LOCAL) -> int:
    return int(run_in_guest(uri, name, "echo C=$(cat /run/counter)", r"C=(\d+)"))
