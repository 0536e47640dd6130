"""`vm create --count 10 --wait` against the CPU-bound floor on this machine.

The floor is one boot's CPU time × 10 / cores: what ten boots cost if the cores did
nothing else. The ratio is Corral's wall time over that floor.
"""

from __future__ import annotations

import os
import statistics
import time

from bench._env import bench_context, row
from bench._guests import boot
from corral.model import MachineSpec
from corral.ops import lifecycle
from corral.ops.provision import create_machines, wait_ready

COUNT = 10
SOLO = 5


def run() -> None:
    with bench_context() as ctx:
        prefix = ctx.settings.pool_name
        single_cpu = statistics.median(boot(ctx, f"{prefix}-solo{i}")[1] for i in range(SOLO))
        cores = os.cpu_count() or 1
        floor = single_cpu * COUNT / cores
        began = time.monotonic()
        result = create_machines(ctx, MachineSpec(name=f"{prefix}-fleet", image="appliance"),
                                 COUNT)
        wait_ready(ctx, [m.name for m in result.created], 300)
        took = time.monotonic() - began
        for m in result.created:
            lifecycle.delete(ctx, m.name, force=True)
        row(f"single boot CPU time (median of {SOLO})", f"{single_cpu:.2f} s")
        row(f"floor: CPU × {COUNT} / {cores} cores", f"{floor:.2f} s")
        row(f"vm create --count {COUNT} --wait", f"{took:.2f} s",
            f"{took / floor:.2f}× the floor (goal ≤ 1.3)")
