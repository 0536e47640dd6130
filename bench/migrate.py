"""Moving machines between two real hosts (tests/multihost.py) against the raw tools.

- Live, shared storage: `corral vm migrate --live` (in process) of a running appliance
  guest between h30 and h31, against raw `virsh migrate --live --p2p` of the same guest
  with the same flags and a destination XML naming the target's network; each moves it
  both ways and goes first in half of the rounds, median of 6 each (goal ≤ 1.1×).
  One live move with its disk copied (to h32, another pool) is timed too, without a
  baseline.
- Cold: a stopped machine whose disk is 2 GiB virtual with 1 GiB allocated moves from
  the shared pool to h32's pool (sent in chunks, read back and compared by sha256),
  against `rsync --sparse` of the same file to a directory on the same filesystem;
  alternating after a `sync`, median of 3 (goal ≥ 0.9× rsync's throughput).
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import replace
from functools import partial
from pathlib import Path

from bench._env import bench_context, row, timed
from corral.model import CloneMode, HostPlacement, MachineSpec, PlacementHints
from corral.ops import hosts as host_ops
from corral.ops import lifecycle
from corral.ops.context import Context
from corral.ops.migrate import migrate
from corral.ops.provision import create_machines, wait_ready
from tests.multihost import TestHost, start_hosts, stop_hosts

RUNS = 3
ALLOCATED = 1 << 30


def run() -> None:
    with bench_context() as ctx:
        root = ctx.settings.state_dir.parent
        prefix = ctx.settings.pool_name
        hosts = start_hosts(root, 3, first_address=30)  # 127.0.0.30-32: no test uses them
        try:
            shared = root / "shared-pool"
            pools = [shared, shared, root / "h32-pool"]
            for h, pool in zip(hosts, pools, strict=True):
                host_ops.add_host(ctx, h.name, h.uri, pool_path=str(pool),
                                  network=f"{prefix}-{h.name}", placement=HostPlacement(),
                                  accelerator="tcg")
            _live(ctx, hosts)
            _cold(ctx, hosts)
        finally:
            for m in ctx.store.list_machines():
                lifecycle.delete(ctx, m.name, force=True)
            stop_hosts(hosts)


def _live(ctx: Context, hosts: list[TestHost]) -> None:
    h30, h31, h32 = hosts
    name = f"{ctx.settings.pool_name}-live"
    create_machines(ctx, MachineSpec(name=name, image="appliance",
                                     placement=PlacementHints(host=h30.name)))
    wait_ready(ctx, [name], 300)
    corral, raw = [], []
    # Each tool moves the guest both ways, and goes first in half of the rounds.
    for i in range(2 * RUNS):
        if i % 2 == 0:  # out with Corral, back with virsh
            corral.append(timed(partial(migrate, ctx, name, to=h31.name, live=True)))
            raw.append(_virsh_migrate(ctx, name, h31, h30))
        else:  # out with virsh, back with Corral
            raw.append(_virsh_migrate(ctx, name, h30, h31))
            corral.append(timed(partial(migrate, ctx, name, to=h30.name, live=True)))
    c, r = statistics.median(corral), statistics.median(raw)
    row("live, shared storage: corral vm migrate --live", f"{c:.2f} s", f"runs {_list(corral)}")
    row("live, shared storage: raw virsh migrate --live --p2p", f"{r:.2f} s",
        f"runs {_list(raw)}")
    row("corral / virsh", f"{c / r:.2f}×", "goal ≤ 1.1×")
    copied = timed(partial(migrate, ctx, name, to=h32.name, live=True))
    row("live, disk copied to another pool: corral", f"{copied:.2f} s",
        "memory and the overlay's own blocks")


def _virsh_migrate(ctx: Context, name: str, source: TestHost, target: TestHost) -> float:
    """The raw tool moving the guest back, then the store told where it went."""
    xml = subprocess.run(["virsh", "-c", source.uri, "dumpxml", "--migratable", name],
                         check=True, capture_output=True, text=True).stdout
    dom = ET.fromstring(xml)
    for nic in dom.iterfind("devices/interface[@type='network']/source"):
        nic.set("network", f"{ctx.settings.pool_name}-{target.name}")
    with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
        f.write(ET.tostring(dom, encoding="unicode"))
        f.flush()
        took = timed(lambda: subprocess.run(
            ["virsh", "-c", source.uri, "migrate", "--live", "--p2p", "--persistent",
             "--undefinesource", "--unsafe", "--auto-converge", "--migrateuri",
             f"tcp://{target.address}", "--xml", f.name, "--persistent-xml", f.name, name,
             target.uri], check=True, capture_output=True))
    m = ctx.store.get_machine(name)
    ctx.store.move_machine(replace(m, host=target.name), None)
    return took


def _cold(ctx: Context, hosts: list[TestHost]) -> None:
    h30, _h31, h32 = hosts
    name = f"{ctx.settings.pool_name}-cold"
    create_machines(ctx, MachineSpec(name=name, image="appliance", clone=CloneMode.FULL,
                                     disk_bytes=2 << 30, start=False,
                                     placement=PlacementHints(host=h30.name)))
    disk = Path(ctx.store.get_machine(name).disk_path)
    # 1 GiB of incompressible data at every other 64 MiB: allocated, and holes between
    subprocess.run(["qemu-io", "-f", "qcow2", *[
        arg for i in range(ALLOCATED // (64 << 20))
        for arg in ("-c", f"write -P {i + 1} {i * 128}M 64M")], str(disk)],
        check=True, capture_output=True)
    size = disk.stat().st_blocks * 512
    corral, raw = [], []
    with tempfile.TemporaryDirectory(dir=disk.parent.parent) as scratch:
        for i in range(RUNS):
            here = Path(ctx.store.get_machine(name).disk_path)
            subprocess.run(["sync"], check=True)
            raw.append(timed(partial(
                subprocess.run, ["rsync", "--sparse", str(here), f"{scratch}/copy-{i}.qcow2"],
                check=True)))
            subprocess.run(["sync"], check=True)
            target = h32.name if ctx.store.get_machine(name).host == h30.name else h30.name
            corral.append(timed(partial(migrate, ctx, name, to=target)))
    c, r = statistics.median(corral), statistics.median(raw)
    row(f"cold, {size / 2**30:.2f} GiB allocated of 2 GiB: corral", f"{size / c / 2**20:.0f} MiB/s",
        f"{c:.2f} s; runs {_list(corral)}")
    row("cold, same file: rsync --sparse", f"{size / r / 2**20:.0f} MiB/s",
        f"{r:.2f} s; runs {_list(raw)}")
    row("corral throughput / rsync's", f"{r / c:.2f}×", "goal ≥ 0.9×")


def _list(samples: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in samples)
