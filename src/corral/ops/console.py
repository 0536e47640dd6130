"""Reading what guests print on their serial console (libvirt logs it to a file)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

READY_MARKER = "CORRAL-READY"
_FIELD = re.compile(r"([a-z-]+)=(\S+)")


@dataclass(frozen=True, slots=True)
class ReadyReport:
    """What a guest said about itself in its readiness line."""

    hostname: str
    instance_id: str
    mac: str


def find_line(log: Path | bytes, marker: str) -> str | None:
    """The first complete console line starting with ``marker``, or None.

    ``log`` is the console log file, or what was read of it (from a remote host). The
    serial port trickles out a few bytes at a time, so a last line without its newline
    may still be half-written: it does not count yet.
    """
    if isinstance(log, Path):
        try:
            data = log.read_bytes()
        except FileNotFoundError:
            return None
    else:
        data = log
    complete = data[: data.rfind(b"\n") + 1]
    for raw in complete.splitlines():
        line = raw.decode("utf-8", "replace").strip("\r\n \x00")
        if line.startswith(marker):
            return line
    return None


def read_ready(log: Path | bytes) -> ReadyReport | None:
    line = find_line(log, READY_MARKER)
    if line is None:
        return None
    fields = dict(_FIELD.findall(line))
    return ReadyReport(
        hostname=fields.get("hostname", ""),
        instance_id=fields.get("instance-id", ""),
        mac=fields.get("mac", ""),
    )
