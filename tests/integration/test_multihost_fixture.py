"""tests/multihost.py works: three extra libvirt hosts at 127.0.0.2-4, isolated from
each other and from qemu:///system, able to run a TCG guest, and able to crash
(``kill()``) and come back (``start()``)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.multihost import TestHost, connection, start_hosts, stop_hosts

MAIN = "qemu:///system"


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[TestHost]]:
    base = Path("/var/tmp") / f"corral-test-mh-{secrets.token_hex(3)}"
    base.mkdir(mode=0o755)
    try:
        started = time.monotonic()
        found = start_hosts(base, 3, first_address=2)
        print(f"start_hosts(3) took {time.monotonic() - started:.2f} s")
        try:
            yield found
        finally:
            stop_hosts(found)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def domain_names(uri: str) -> set[str]:
    with connection(uri) as conn:
        return {d.name() for d in conn.listAllDomains(0)}


@contextlib.contextmanager
def removed_afterwards(host: TestHost, name: str) -> Iterator[None]:
    """Destroy and undefine domain ``name`` on ``host`` however the block ends."""
    try:
        yield
    finally:
        with contextlib.suppress(libvirt.libvirtError), connection(host.uri) as conn:
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()


def tiny_guest_xml(name: str) -> str:
    """A TCG guest with 64 MiB, no disk and no NIC: SeaBIOS runs and finds nothing to
    boot, which is all a guest needs to be "running"."""
    return f"""
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><boot dev='network'/></os>
  <devices>
    <memballoon model='none'/>
  </devices>
</domain>"""


def read_main_pid() -> int:
    return int(Path("/run/libvirtd.pid").read_text().strip())


def test_every_host_answers_on_its_own_uri(hosts: list[TestHost]) -> None:
    assert [h.uri for h in hosts] == [
        "qemu+tcp://127.0.0.2/system",
        "qemu+tcp://127.0.0.3/system",
        "qemu+tcp://127.0.0.4/system",
    ]
    for host in hosts:
        assert host.running
        with connection(host.uri) as conn:
            assert conn.getHostname() == host.name
            arch, memory_mib, cpus = conn.getInfo()[:3]
            assert arch == "x86_64" and memory_mib > 0 and cpus > 0
    pids = [h.pid for h in hosts]
    assert None not in pids
    assert len(set(pids)) == 3
    assert read_main_pid() not in pids


def test_a_domain_defined_on_one_host_is_seen_only_there(hosts: list[TestHost]) -> None:
    h2, h3, _ = hosts
    name = f"corral-test-mh-{secrets.token_hex(3)}"
    with removed_afterwards(h2, name):
        with connection(h2.uri) as conn:
            conn.defineXML(tiny_guest_xml(name))
        assert name in domain_names(h2.uri)
        assert name not in domain_names(h3.uri)
        assert name not in domain_names(MAIN)
        with connection(h2.uri) as conn:
            conn.lookupByName(name).undefine()
        assert name not in domain_names(h2.uri)


@pytest.mark.guest
def test_a_tcg_guest_runs_on_a_test_host(hosts: list[TestHost]) -> None:
    h3 = hosts[1]
    name = f"corral-test-mh-{secrets.token_hex(3)}"
    with removed_afterwards(h3, name):
        with connection(h3.uri) as conn:
            dom = conn.createXML(tiny_guest_xml(name), 0)
            state, _ = dom.state()
            assert state == libvirt.VIR_DOMAIN_RUNNING
            # QEMU runs, recorded in h3's private /run/libvirt, not in the main one.
            qemu_pid = int((h3.root / "run" / "qemu" / f"{name}.pid").read_text())
            assert Path(f"/proc/{qemu_pid}").exists()
            assert not Path(f"/run/libvirt/qemu/{name}.pid").exists()
            assert name not in domain_names(MAIN)
            dom.destroy()
        assert name not in domain_names(h3.uri)


@pytest.mark.guest
def test_a_killed_host_stops_answering_and_comes_back(hosts: list[TestHost]) -> None:
    h4 = hosts[2]
    name = f"corral-test-mh-{secrets.token_hex(3)}"
    with removed_afterwards(h4, name):
        with connection(h4.uri) as conn:
            conn.createXML(tiny_guest_xml(name), 0)
        qemu_pid = int((h4.root / "run" / "qemu" / f"{name}.pid").read_text())
        old_pid = h4.pid

        h4.kill()
        assert not h4.running
        with pytest.raises(libvirt.libvirtError):
            libvirt.open(h4.uri)
        # As on a real host whose daemon crashed, the guest keeps running.
        assert Path(f"/proc/{qemu_pid}").exists()

        started = time.monotonic()
        h4.start()
        print(f"restart of {h4.name} took {time.monotonic() - started:.2f} s")
        assert h4.running and h4.pid != old_pid
        with connection(h4.uri) as conn:
            assert conn.getHostname() == h4.name
            # ... and the new libvirtd takes the guest back.
            assert conn.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
