"""Linked clone + domain define, against template size; and a full copy for scale.

Median of 20 for templates of 1 GiB, 100 GiB and 1 TiB virtual size. The baseline
is the same work done the usual way: `qemu-img create -b` then libvirt's define.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import libvirt

from bench._env import bench_context, median_ms, qemu_img, row, timed
from corral.formats.domain_xml import build_domain_xml
from corral.identity import new_identity
from corral.identity.mac import random_mac
from corral.model import Accelerator, DomainPlan, MachineSpec
from corral.ops import lifecycle
from corral.ops.context import Context
from corral.ops.provision import create_machines

RUNS = 20


def _plan(ctx: Context, name: str, disk: Path, base: Path) -> DomainPlan:
    return DomainPlan(
        name=name, identity=new_identity(name, random_mac()), accelerator=Accelerator.TCG,
        cpus=1, memory_bytes=256 << 20, disk_path=str(disk), disk_backing=str(base),
        seed_path=None, console_log=str(ctx.settings.console_dir / f"{name}.log"),
        network=ctx.settings.network_name, kernel_boot=None,
    )


def _corral_once(ctx: Context, base: Path, size: int) -> float:
    name = f"{ctx.settings.pool_name}-{secrets.token_hex(3)}"
    disk = ctx.storage.volume_path(name)
    plan = _plan(ctx, name, disk, base)
    took = timed(lambda: (ctx.storage.linked_clone(base, disk, size), ctx.driver.define(plan)))
    ctx.driver.undefine(name)
    ctx.storage.delete(disk)
    return took


def _baseline_once(ctx: Context, conn: libvirt.virConnect, base: Path, size: int) -> float:
    name = f"{ctx.settings.pool_name}-{secrets.token_hex(3)}"
    disk = ctx.storage.volume_path(name)
    xml = build_domain_xml(_plan(ctx, name, disk, base))

    def work() -> None:
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk),
                 str(size))
        conn.defineXML(xml)

    took = timed(work)
    ctx.driver.undefine(name)
    disk.unlink()
    return took


def run() -> None:
    with bench_context() as ctx:
        from corral.ops.hosts import local_host

        local_host(ctx)  # enrol: pool and network exist before timing
        conn = libvirt.open(ctx.settings.host_uri)  # the baseline's own connection
        sizes = {"1 GiB": 1 << 30, "100 GiB": 100 << 30, "1 TiB": 1 << 40}
        bases = {}
        for label, size in sizes.items():
            bases[label] = ctx.settings.image_dir / f"template-{size}.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", str(bases[label]), str(size))
        ours: dict[str, list[float]] = {label: [] for label in sizes}
        theirs: dict[str, list[float]] = {label: [] for label in sizes}
        # Round-robin over the sizes, so that drift in the machine's load hits all alike.
        for _ in range(RUNS):
            for label, size in sizes.items():
                ours[label].append(_corral_once(ctx, bases[label], size))
                theirs[label].append(_baseline_once(ctx, conn, bases[label], size))
        medians = {label: median_ms(samples) for label, samples in ours.items()}
        for label in sizes:
            baseline = median_ms(theirs[label])
            row(f"linked clone + define, {label} template", f"{medians[label]:.2f} ms",
                f"qemu-img + define {baseline:.2f} ms  (ratio {medians[label] / baseline:.2f}×)")
        row("1 TiB / 1 GiB", f"{medians['1 TiB'] / medians['1 GiB']:.2f}×", "(goal ≤ 1.1)")

        # the whole job as `vm create --no-start` runs it: record, clone, seed, define
        jobs = []
        for i in range(RUNS):
            spec = MachineSpec(name=f"{ctx.settings.pool_name}-job{i}", image="appliance",
                               start=False)
            jobs.append(timed(lambda spec=spec: create_machines(ctx, spec)))
            # Its claim goes with it: RUNS machines would outgrow a small host's vCPUs.
            lifecycle.delete(ctx, spec.name, force=True)
        row("whole provision job (--no-start), store fsyncs incl.", f"{median_ms(jobs):.2f} ms")

        # a full copy of a 1 GiB template filled with data
        raw = ctx.settings.state_dir / "filled.raw"
        subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=4M", "count=256",
                        "status=none"], check=True)
        filled = ctx.settings.image_dir / "filled.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(filled))
        raw.unlink()
        dest = ctx.storage.volume_path("full-copy")
        full = timed(lambda: ctx.storage.full_clone(filled, dest, 1 << 30)) * 1000
        linked_dest = ctx.storage.volume_path("linked-copy")
        linked = timed(lambda: ctx.storage.linked_clone(filled, linked_dest, 1 << 30)) * 1000
        row("full copy of a 1 GiB template full of data", f"{full:.0f} ms",
            f"linked clone of it {linked:.2f} ms  (full/linked {full / linked:.0f}×)")
