"""Booting appliance guests and reading what they cost."""

from __future__ import annotations

import os
import time
from pathlib import Path

from corral.model import MachineSpec
from corral.ops import lifecycle
from corral.ops.context import Context
from corral.ops.provision import create_machines, wait_ready

CLK_TCK = os.sysconf("SC_CLK_TCK")


def qemu_cpu_seconds(name: str) -> float:
    """user + system CPU time of a running domain's QEMU process."""
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def boot(ctx: Context, name: str, memory: int = 256 << 20) -> tuple[float, float]:
    """Create and start one machine; (seconds to ready, QEMU CPU seconds at ready)."""
    began = time.monotonic()
    create_machines(ctx, MachineSpec(name=name, image="appliance", memory_bytes=memory))
    wait_ready(ctx, [name], 120)
    took = time.monotonic() - began
    cpu = qemu_cpu_seconds(name)
    lifecycle.delete(ctx, name, force=True)
    return took, cpu
