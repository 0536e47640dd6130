"""Corral's `vm create` up to QEMU running, against raw `virsh create` of the same XML."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

import libvirt

from bench._env import bench_context, qemu_img, row, timed
from corral.formats.domain_xml import build_domain_xml
from corral.model import MachineSpec
from corral.ops import lifecycle
from corral.ops.hosts import local_host
from corral.ops.machines import domain_plan
from corral.ops.provision import create_machines

RUNS = 7


def run() -> None:
    with bench_context() as ctx:
        host, _ = local_host(ctx)
        prefix = ctx.settings.pool_name
        image = ctx.store.get_image("appliance")
        conn = libvirt.open(ctx.settings.host_uri)  # the baseline's own
        ours, virsh, in_process = [], [], []
        for i in range(RUNS):
            name = f"{prefix}-oh{i}"
            ours.append(timed(lambda name=name: create_machines(
                ctx, MachineSpec(name=name, image="appliance"))))
            machine = ctx.store.get_machine(name)
            ctx.driver.destroy(name)
            # the same domain, its disk made afresh, started the plain way
            plan = domain_plan(ctx, machine, host)
            xml_path = ctx.settings.state_dir / f"{name}.xml"
            xml_path.write_text(build_domain_xml(plan))
            ctx.driver.undefine(machine.identity.uuid)
            disk = Path(machine.disk_path)

            def fresh_disk(disk: Path = disk) -> None:
                disk.unlink(missing_ok=True)
                qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image.path,
                         str(disk))

            fresh_disk()
            virsh.append(timed(lambda xml_path=xml_path: subprocess.run(
                ["virsh", "-q", "-c", "qemu:///system", "create", str(xml_path)],
                check=True, capture_output=True)))
            ctx.driver.destroy(name)
            fresh_disk()
            in_process.append(timed(lambda xml_path=xml_path: conn.createXML(
                xml_path.read_text(), 0)))
            ctx.driver.destroy(name)
            ctx.driver.define(plan)
            lifecycle.delete(ctx, name, force=True)
        m_ours, m_virsh = statistics.median(ours) * 1000, statistics.median(virsh) * 1000
        m_lib = statistics.median(in_process) * 1000
        row("corral vm create → QEMU running (in-process)", f"{m_ours:.0f} ms")
        row("virsh create of the same XML", f"{m_virsh:.0f} ms",
            f"ratio {m_ours / m_virsh:.2f}× (goal ≤ 1.2)")
        row("libvirt createXML in-process (no virsh start-up)", f"{m_lib:.0f} ms",
            f"ratio {m_ours / m_lib:.2f}×")
