"""The appliance's boot to ready under TCG: median and p90 of 10, one at a time."""

from __future__ import annotations

import statistics

from bench._env import bench_context, row
from bench._guests import boot

RUNS = 10


def run() -> None:
    with bench_context() as ctx:
        walls, cpus = [], []
        for i in range(RUNS):
            wall, cpu = boot(ctx, f"{ctx.settings.pool_name}-boot{i}")
            walls.append(wall)
            cpus.append(cpu)
        p90 = statistics.quantiles(walls, n=10)[-1]
        row("create → ready, median of 10", f"{statistics.median(walls):.2f} s",
            f"p90 {p90:.2f} s")
        row("QEMU CPU time per boot, median", f"{statistics.median(cpus):.2f} s")
