"""The power-state sweep behind the dashboard, over 1,000 libvirt domains.

libvirt's test driver holds 1,000 defined domains, a third of them running; it is
measured in-process (test:///default) and through libvirtd's RPC (test+unix:///default,
as a remote host is reached). Corral's sweep is one bulk call
(virConnectGetAllDomainStats with the state group). The baseline is what virsh list
--all does: list the domains, then ask each one for its state. Goal: under 100 ms.
"""

from __future__ import annotations

import statistics
import time

import libvirt

from bench._env import row
from corral.compute.libvirt_driver import LibvirtDriver

DOMAINS = 1_000
RUNS = 20
_XML = "<domain type='test'><name>{}</name><memory>65536</memory><os><type>hvm</type></os></domain>"


def _median_ms(fn: object) -> float:
    samples = []
    for _ in range(RUNS):
        began = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1000


def run() -> None:
    for uri in ("test:///default", "test+unix:///default"):
        _measure(uri)


def _measure(uri: str) -> None:
    driver = LibvirtDriver(uri)
    conn = libvirt.open(uri)  # in-process: the same test driver state as the driver's
    try:
        for i in range(DOMAINS):
            dom = conn.defineXML(_XML.format(f"sweep{i:04d}"))
            if i % 3 == 0:
                dom.create()
        states = driver.power_states()
        assert sum(n.startswith("sweep") for n in states) == DOMAINS

        def per_domain() -> dict[str, int]:
            return {d.name(): d.state()[0] for d in conn.listAllDomains(0)}

        corral = _median_ms(driver.power_states)
        baseline = _median_ms(per_domain)
    finally:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith("sweep"):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        conn.close()
        driver.close()
    print(f"  {DOMAINS:,} domains on {uri}, median of {RUNS}")
    row("Corral sweep (one getAllDomainStats call)", f"{corral:.2f} ms", "goal < 100 ms")
    row("baseline: listAllDomains + state() per domain", f"{baseline:.2f} ms",
        f"Corral = {corral / baseline:.2f}x")
