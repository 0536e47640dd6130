"""One ComputeDriver suite, run against libvirt's test driver and the real qemu:///system.

Never mocks libvirt. On qemu:///system every domain, network and pool a test makes is
named ``ctest-<random>-…`` and removed afterwards, pass or fail, together with its files
under ``/var/lib/corral-test-<random>`` (QEMU runs as libvirt-qemu and must reach them).
Domains there boot SeaBIOS from an empty qcow2 disk and sit at "No bootable device":
enough for power-state tests under TCG, at 64 MiB each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import secrets
import shutil
import socket
import subprocess
import termios
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import libvirt
import pytest

from corral.compute.base import (
    CONSOLE,
    ComputeDriver,
    DomainSummary,
    available_compute_drivers,
    load_compute_driver,
)
from corral.compute.libvirt_driver import POWER_STATES, LibvirtDriver, bridge_name
from corral.errors import Conflict, DriverNotFound, HypervisorError, HypervisorUnavailable, NotFound
from corral.formats.domain_xml import build_domain_xml
from corral.identity import new_identity
from corral.identity.mac import random_mac
from corral.images.appliance import ApplianceArtifacts
from corral.model import Accelerator, DomainPlan, KernelBoot, PowerState
from tests.libvirt_cleanup import remove_prefixed
from tests.unit.formats.test_domain_xml import PLANS as GOLDEN_PLANS

TEST_URI = "test:///default"
QEMU_URI = "qemu:///system"
OFF_OR_STOPPING = {PowerState.RUNNING, PowerState.SHUTTING_DOWN, PowerState.SHUT_OFF}


def _qemu_reachable() -> str | None:
    try:
        with LibvirtDriver(QEMU_URI) as driver:
            driver.facts()
    except HypervisorUnavailable as exc:
        return str(exc)
    return None


_QEMU_MISSING = _qemu_reachable()


@dataclass
class Env:
    """A driver, a name prefix, a directory for files, and what to remove afterwards."""

    uri: str
    driver: ComputeDriver
    raw: Any
    """A libvirt connection of the test's own, for set-up the contract does not offer."""
    prefix: str
    files: Path
    networks: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)

    @property
    def real(self) -> bool:
        return self.uri == QEMU_URI

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def disk(self, name: str, backing: Path | None = None) -> Path:
        path = self.files / f"{name}.qcow2"
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing is not None:
            cmd += ["-F", "qcow2", "-b", str(backing)]
        subprocess.run([*cmd, str(path), "16M"], check=True)
        return path

    def plan(self, suffix: str, *, network: str | None = None, linked: bool = False) -> DomainPlan:
        name = self.name(suffix)
        base = self.disk(f"{name}-base") if linked else None
        return DomainPlan(
            name=name,
            identity=new_identity(name, random_mac()),
            accelerator=Accelerator.TCG,  # KVM hangs on this machine
            cpus=1,
            memory_bytes=64 << 20,
            disk_path=str(self.disk(name, base)),
            disk_backing=str(base) if base else None,
            seed_path=None,
            console_log=str(self.files / f"{name}.log"),
            network=network,
            kernel_boot=None,
        )

    def raw_state(self, name: str) -> int:
        return int(self.raw.lookupByName(name).state()[0])


@pytest.fixture(
    params=[
        TEST_URI,
        pytest.param(
            QEMU_URI,
            marks=pytest.mark.skipif(
                _QEMU_MISSING is not None, reason=f"libvirtd is not usable: {_QEMU_MISSING}"
            ),
        ),
    ],
    ids=["test-driver", "qemu-system"],
)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    uri: str = request.param
    token = secrets.token_hex(3)
    prefix = f"ctest-{token}"
    if uri == QEMU_URI:
        # Under /var/lib, every directory on the way is traversable by libvirt-qemu.
        files = Path(f"/var/lib/corral-test-{token}")
        files.mkdir(mode=0o755)
    else:
        files = tmp_path
    driver = load_compute_driver("libvirt", uri)
    raw = libvirt.open(uri)
    try:
        yield Env(uri, driver, raw, prefix, files)
    finally:
        driver.close()
        remove_prefixed(uri, prefix)
        raw.close()
        if uri == QEMU_URI:
            shutil.rmtree(files, ignore_errors=True)


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def _one_sentence(message: str) -> bool:
    return message[-1] in ".?" and not re.search(r"[.?!]\s+[A-Z]", message)


# -- loading -------------------------------------------------------------------------------


def test_libvirt_is_a_registered_driver() -> None:
    assert "libvirt" in available_compute_drivers()
    driver = load_compute_driver("libvirt", TEST_URI)
    assert isinstance(driver, LibvirtDriver) and driver.uri == TEST_URI
    assert CONSOLE in driver.capabilities


def test_unknown_driver_names_the_ones_there_are() -> None:
    with pytest.raises(DriverNotFound) as caught:
        load_compute_driver("vmware", TEST_URI)
    assert caught.value.available == ["libvirt"]
    assert "libvirt" in str(caught.value)


# -- states ---------------------------------------------------------------------------------


def _libvirt_domain_states() -> dict[str, int]:
    """Every virDomainState constant the installed libvirt-python defines, by name."""
    source = inspect.getsource(libvirt)
    block = re.search(r"^# virDomainState\n((?:VIR_DOMAIN_\w+ = \d+\n)+)", source, re.MULTILINE)
    assert block is not None, "libvirt.py no longer marks its virDomainState block"
    names = re.findall(r"^(VIR_DOMAIN_\w+) =", block.group(1), re.MULTILINE)
    return {n: getattr(libvirt, n) for n in names if n != "VIR_DOMAIN_LAST"}


def test_state_table_covers_every_libvirt_domain_state() -> None:
    states = _libvirt_domain_states()
    assert len(states) >= 8
    missing = {n for n, v in states.items() if v not in POWER_STATES}
    assert not missing, f"POWER_STATES lacks {sorted(missing)}"
    # Cross-check with libvirt's own API description, where installed.
    api = Path("/usr/share/libvirt/api/libvirt-api.xml")
    if api.exists():
        enums = ET.parse(api).getroot().iter("enum")
        declared = {
            e.get("name"): int(e.get("value") or -1)
            for e in enums
            if e.get("type") == "virDomainState" and e.get("name") != "VIR_DOMAIN_LAST"
        }
        assert set(declared.values()) <= set(POWER_STATES)


def test_each_libvirt_state_has_its_own_power_state() -> None:
    assert len(set(POWER_STATES.values())) == len(POWER_STATES) == len(PowerState)
    assert POWER_STATES[libvirt.VIR_DOMAIN_PAUSED] is PowerState.PAUSED
    assert POWER_STATES[libvirt.VIR_DOMAIN_SHUTDOWN] is PowerState.SHUTTING_DOWN
    assert POWER_STATES[libvirt.VIR_DOMAIN_SHUTOFF] is PowerState.SHUT_OFF
    assert POWER_STATES[libvirt.VIR_DOMAIN_PMSUSPENDED] is PowerState.SUSPENDED


def test_bridge_names_fit_in_fifteen_characters() -> None:
    assert bridge_name("corral") == "cr-corral"
    long = [bridge_name("a-very-long-network-name"), bridge_name("a-very-long-network-other")]
    assert all(len(b) <= 15 for b in long) and long[0] != long[1]
    assert len(bridge_name("weird name/ä")) <= 15


# -- the host -------------------------------------------------------------------------------


def test_facts(env: Env) -> None:
    facts = env.driver.facts()
    assert facts.hostname and facts.arch and facts.hypervisor
    assert facts.cpus > 0 and facts.memory_bytes > 0
    assert re.match(r"\d+\.\d+\.\d+ \(libvirt \d+\.\d+\.\d+\)", facts.hypervisor_version)


def test_kvm_device_present_is_what_capabilities_say(env: Env) -> None:
    caps = env.raw.getCapabilities()
    assert env.driver.kvm_device_present() == ("<domain type='kvm'/>" in caps)


def test_ensure_network_is_isolated_and_idempotent(env: Env) -> None:
    name = env.name("net")
    env.driver.ensure_network(name)
    env.driver.ensure_network(name)
    net = env.raw.networkLookupByName(name)
    assert net.isActive() and net.isPersistent() and net.autostart()
    root = ET.fromstring(net.XMLDesc(0))
    assert root.find("forward") is None and root.find("ip") is None
    bridge = root.find("bridge")
    assert bridge is not None and bridge.get("name") == bridge_name(name)
    net.destroy()  # a stopped network is started again
    env.driver.ensure_network(name)
    assert net.isActive()


def test_ensure_network_never_starts_a_forwarding_network(env: Env) -> None:
    name = env.name("nat")
    env.raw.networkDefineXML(
        f"<network><name>{name}</name><forward mode='nat'/>"
        f"<bridge name='{bridge_name(name)}'/><ip address='192.0.2.1' netmask='255.255.255.0'/>"
        "</network>"
    )
    with pytest.raises(Conflict, match="forwards traffic"):
        env.driver.ensure_network(name)
    net = env.raw.networkLookupByName(name)
    assert not net.isActive() and not net.autostart()


def test_ensure_pool_is_idempotent(env: Env) -> None:
    name, path = env.name("pool"), env.files / "pool"
    env.driver.ensure_pool(name, str(path))
    env.driver.ensure_pool(name, str(path) + "/")
    pool = env.raw.storagePoolLookupByName(name)
    assert pool.isActive() and pool.isPersistent() and pool.autostart()
    if env.real:
        assert path.is_dir()
    pool.destroy()
    env.driver.ensure_pool(name, str(path))
    assert pool.isActive()


def test_ensure_pool_refuses_a_namesake_elsewhere(env: Env) -> None:
    name = env.name("pool")
    env.driver.ensure_pool(name, str(env.files / "one"))
    with pytest.raises(Conflict, match="already exists"):
        env.driver.ensure_pool(name, str(env.files / "two"))


# -- defining ------------------------------------------------------------------------------


def test_define_is_idempotent_and_leaves_the_domain_off(env: Env) -> None:
    plan = env.plan("a", linked=True)
    env.driver.define(plan)
    env.driver.define(plan)  # crash recovery: a second define is a no-op
    assert env.driver.state(plan.name) is PowerState.SHUT_OFF
    assert plan.name in env.driver.domain_names()
    dom = env.raw.lookupByName(plan.name)
    assert dom.isPersistent() and dom.UUIDString() == plan.identity.uuid


def test_libvirt_keeps_every_field_of_the_plan(env: Env) -> None:
    net = env.name("net")
    env.driver.ensure_network(net)
    plan = env.plan("a", network=net, linked=True)
    env.driver.define(plan)
    parsed = env.driver.domain_xml(plan.name)
    assert (parsed.name, parsed.uuid, parsed.domain_type) == (plan.name, plan.identity.uuid, "qemu")
    assert (parsed.cpus, parsed.memory_bytes) == (plan.cpus, plan.memory_bytes)
    assert parsed.macs == (plan.identity.mac,)
    assert parsed.interfaces[0].network == net
    vda = parsed.disk("vda")
    assert vda is not None and vda.source == plan.disk_path and vda.format == "qcow2"
    assert vda.backing == (plan.disk_backing,)
    assert parsed.console_log == plan.console_log
    assert parsed.corral_managed
    assert (parsed.hostname, parsed.instance_id) == (
        plan.identity.hostname,
        plan.identity.instance_id,
    )


def test_define_refuses_a_taken_name_or_uuid(env: Env) -> None:
    plan = env.plan("a")
    env.driver.define(plan)
    other_uuid = replace(plan, identity=new_identity(plan.name, random_mac()))
    with pytest.raises(Conflict, match="already exists"):
        env.driver.define(other_uuid)
    other_name = replace(plan, name=env.name("b"))
    with pytest.raises(Conflict, match="already belongs"):
        env.driver.define(other_name)
    assert env.name("b") not in env.driver.domain_names()
    assert env.raw.lookupByName(plan.name).UUIDString() == plan.identity.uuid


def test_a_failed_define_leaves_nothing(env: Env) -> None:
    plan = replace(env.plan("a"), cpus=0)  # libvirt refuses zero vCPUs
    with pytest.raises(HypervisorError) as caught:
        env.driver.define(plan)
    assert _one_sentence(caught.value.message), caught.value.message
    assert plan.name not in env.driver.domain_names()


def test_list_domains_reports_corral_metadata(env: Env) -> None:
    plan = env.plan("ours")
    env.driver.define(plan)
    foreign = env.name("foreign")
    env.raw.defineXML(
        f"<domain type='qemu'><name>{foreign}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    summaries = {s.name: s for s in env.driver.list_domains()}
    ours, theirs = summaries[plan.name], summaries[foreign]
    assert ours == DomainSummary(plan.name, plan.identity.uuid, PowerState.SHUT_OFF, ours.domain)
    assert ours.domain.corral_managed and not theirs.domain.corral_managed
    assert theirs.domain.memory_bytes == 64 << 20


# -- power -----------------------------------------------------------------------------------


def test_start_shutdown_destroy(env: Env) -> None:
    plan = env.plan("a")
    env.driver.define(plan)
    env.driver.start(plan.name)
    env.driver.start(plan.name)  # idempotent
    assert env.driver.state(plan.name) is PowerState.RUNNING

    began = time.monotonic()
    env.driver.shutdown(plan.name)  # ACPI: SeaBIOS ignores it, the test driver obeys
    assert time.monotonic() - began < 5
    assert env.driver.state(plan.name) in OFF_OR_STOPPING

    env.driver.destroy(plan.name)
    assert env.driver.state(plan.name) is PowerState.SHUT_OFF
    env.driver.destroy(plan.name)  # already off: fine
    env.driver.shutdown(plan.name)  # not running: fine
    with pytest.raises(Conflict, match="not running"):
        env.driver.reboot(plan.name)
    assert plan.name in env.driver.domain_names()  # destroy keeps the definition


def test_reboot_a_running_domain(env: Env) -> None:
    plan = env.plan("a")
    env.driver.define(plan)
    env.driver.start(plan.name)
    env.driver.reboot(plan.name)
    assert env.driver.state(plan.name) is PowerState.RUNNING


def test_paused_is_not_shut_off(env: Env) -> None:
    plan = env.plan("a")
    env.driver.define(plan)
    env.driver.start(plan.name)
    env.raw.lookupByName(plan.name).suspend()  # no contract verb for it; libvirt's own
    assert env.driver.state(plan.name) is PowerState.PAUSED
    (summary,) = [s for s in env.driver.list_domains() if s.name == plan.name]
    assert summary.state is PowerState.PAUSED
    env.driver.start(plan.name)  # active already: left as it is
    assert env.driver.state(plan.name) is PowerState.PAUSED
    with pytest.raises(Conflict, match="is paused"):
        env.driver.undefine(plan.name)
    env.driver.destroy(plan.name)
    assert env.driver.state(plan.name) is PowerState.SHUT_OFF


def test_undefine(env: Env) -> None:
    plan = env.plan("a")
    env.driver.define(plan)
    env.driver.start(plan.name)
    with pytest.raises(Conflict, match="is running"):
        env.driver.undefine(plan.name)
    assert env.driver.state(plan.name) is PowerState.RUNNING
    env.driver.undefine(plan.identity.uuid, force=True)  # by UUID, destroying first
    assert plan.name not in env.driver.domain_names()
    env.driver.undefine(plan.name)  # missing: fine
    env.driver.undefine(plan.identity.uuid)
    with pytest.raises(NotFound):
        env.driver.state(plan.name)
    assert Path(plan.disk_path).exists()  # disks are not libvirt's to delete


def test_run_transient(env: Env) -> None:
    plan = env.plan("probe")
    env.driver.run_transient(plan)
    env.driver.run_transient(plan)  # idempotent while it runs
    assert env.driver.state(plan.name) is PowerState.RUNNING
    assert not env.raw.lookupByName(plan.name).isPersistent()
    env.driver.destroy(plan.name)
    env.driver.destroy(plan.name)  # gone now: still fine
    assert plan.name not in env.driver.domain_names()


def test_run_transient_dies_with_the_connection(env: Env) -> None:
    if not env.real:
        pytest.skip("libvirt's test driver has no AUTODESTROY")
    plan = env.plan("probe")
    env.driver.run_transient(plan)
    env.driver.close()
    assert _wait_for(lambda: plan.name not in env.driver.domain_names())


def test_unknown_names(env: Env) -> None:
    name = env.name("nobody")
    for call in (
        env.driver.state,
        env.driver.start,
        env.driver.shutdown,
        env.driver.reboot,
        env.driver.domain_xml,
    ):
        with pytest.raises(NotFound) as caught:
            call(name)
        assert caught.value.message == f"No machine named '{name}'."
    env.driver.destroy(name)
    env.driver.undefine(name)


def test_libvirt_prints_nothing(env: Env, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    with pytest.raises(NotFound):
        env.driver.state(env.name("nobody"))
    assert capfd.readouterr().err == ""


def test_a_start_that_fails_says_why_in_one_sentence(env: Env) -> None:
    if not env.real:
        pytest.skip("libvirt's test driver does not open disk files")
    plan = env.plan("a")
    env.driver.define(plan)
    Path(plan.disk_path).unlink()
    with pytest.raises(HypervisorError) as caught:
        env.driver.start(plan.name)
    message = caught.value.message
    assert message.startswith(f"Could not start machine '{plan.name}': ")
    assert _one_sentence(message), message


# -- console -----------------------------------------------------------------------------------


def _attach_in_thread(
    driver: ComputeDriver, name: str, stdin: int, stdout: int
) -> threading.Thread:
    errors: list[BaseException] = []

    def attach() -> None:
        try:
            driver.attach_console(name, stdin, stdout)
        except BaseException as exc:  # handed to the test below
            errors.append(exc)

    thread = threading.Thread(target=attach, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.fixture
def running(env: Env) -> DomainPlan:
    """A started domain, for the console tests: libvirt's test driver has no consoles."""
    if not env.real:
        pytest.skip("libvirt's test driver has no console streams")
    plan = env.plan("a")
    env.driver.define(plan)
    env.driver.start(plan.name)
    return plan


def test_console_detaches_on_ctrl_bracket(env: Env, running: DomainPlan) -> None:
    plan = running
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        thread = _attach_in_thread(env.driver, plan.name, stdin_r, out_w)
        time.sleep(0.5)
        assert thread.is_alive()
        os.write(stdin_w, b"\r\x1d")
        thread.join(10)
        assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
        # The session is over: a second one may attach.
        thread = _attach_in_thread(env.driver, plan.name, stdin_r, out_w)
        time.sleep(0.3)
        os.write(stdin_w, b"\x1d")
        thread.join(10)
        assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
    finally:
        for fd in (stdin_r, stdin_w, out_r, out_w):
            os.close(fd)


def test_console_puts_a_terminal_in_raw_mode_and_restores_it(env: Env, running: DomainPlan) -> None:
    plan = running
    master, slave = os.openpty()
    out_r, out_w = os.pipe()
    try:
        cooked = termios.tcgetattr(slave)
        assert cooked[3] & termios.ICANON
        thread = _attach_in_thread(env.driver, plan.name, slave, out_w)
        assert _wait_for(lambda: not termios.tcgetattr(slave)[3] & termios.ICANON)
        # A second session is refused while this one holds the console.
        with pytest.raises(Conflict, match="Another session"):
            env.driver.attach_console(plan.name, out_r, out_w)
        os.write(master, b"\x1d")
        thread.join(10)
        assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
        assert termios.tcgetattr(slave) == cooked
    finally:
        for fd in (master, slave, out_r, out_w):
            os.close(fd)


def test_console_ends_when_the_domain_stops(env: Env, running: DomainPlan) -> None:
    plan = running
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        thread = _attach_in_thread(env.driver, plan.name, stdin_r, out_w)
        time.sleep(0.5)
        env.raw.lookupByName(plan.name).destroy()
        thread.join(10)
        assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
    finally:
        for fd in (stdin_r, stdin_w, out_r, out_w):
            os.close(fd)


def test_console_shows_what_the_guest_prints(
    env: Env, appliance: ApplianceArtifacts
) -> None:
    if not env.real:
        pytest.skip("libvirt's test driver runs no guest to print anything")
    kernel = appliance.kernel
    # A copy: libvirt relabels a guest's kernel, and that file is not ours to relabel.
    copy = env.files / "vmlinuz"
    shutil.copyfile(kernel, copy)
    # No root: it panics, and panic=-1 reboots it, printing its banner again and again.
    boot = KernelBoot(str(copy), None, "console=ttyS0 panic=-1")
    plan = replace(env.plan("a"), kernel_boot=boot, memory_bytes=128 << 20)  # 64 MiB: no boot
    env.driver.define(plan)
    env.driver.start(plan.name)
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    seen = bytearray()

    def drain() -> None:
        while chunk := os.read(out_r, 65536):
            seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        thread = _attach_in_thread(env.driver, plan.name, stdin_r, out_w)
        assert _wait_for(lambda: b"Linux version" in seen, timeout=60), bytes(seen[-500:])
        os.write(stdin_w, b"\x1d")
        thread.join(10)
        assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
        # virtlogd copied the same output to the plan's console log.
        assert b"Linux version" in Path(plan.console_log).read_bytes()
    finally:
        env.driver.destroy(plan.name)
        for fd in (stdin_r, stdin_w, out_w):
            os.close(fd)
        reader.join(5)
        os.close(out_r)


def test_console_of_a_stopped_domain_is_a_conflict(env: Env) -> None:
    plan = env.plan("a")
    env.driver.define(plan)
    with pytest.raises(Conflict, match="not running"):
        env.driver.attach_console(plan.name, 0, 1)


# -- an unreachable daemon -------------------------------------------------------------------


def test_missing_socket_is_hypervisor_unavailable_in_one_sentence() -> None:
    uri = "qemu+unix:///system?socket=/nonexistent/sock"
    with LibvirtDriver(uri) as driver, pytest.raises(HypervisorUnavailable) as caught:
        driver.state("anything")
    err = caught.value
    assert err.message == f"Cannot reach libvirtd at {uri}: is it running?"
    assert _one_sentence(err.message)
    assert err.hint is not None and "/nonexistent/sock" in err.hint
    assert isinstance(err.__cause__, libvirt.libvirtError)


def test_unknown_uri_scheme_is_hypervisor_unavailable() -> None:
    driver = LibvirtDriver("nosuchhypervisor:///system")
    with driver, pytest.raises(HypervisorUnavailable, match="No libvirt driver") as caught:
        driver.facts()
    assert _one_sentence(caught.value.message)


class _SocketProxy:
    """A Unix-socket relay to libvirtd whose connections the test can cut, so a lost
    connection is tested without touching the daemon everyone shares."""

    def __init__(self, path: Path, target: str) -> None:
        self.target = target
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.open.clear()

    def close(self) -> None:
        self.cut()
        self.server.close()


@pytest.mark.skipif(_QEMU_MISSING is not None, reason=f"libvirtd is not usable: {_QEMU_MISSING}")
def test_a_lost_connection_is_reported_then_reopened(tmp_path: Path) -> None:
    proxy = _SocketProxy(tmp_path / "sock", "/run/libvirt/libvirt-sock")
    uri = f"qemu+unix:///system?socket={tmp_path / 'sock'}"
    try:
        with LibvirtDriver(uri) as driver:
            driver.facts()
            proxy.cut()
            time.sleep(0.2)
            with pytest.raises(HypervisorUnavailable) as caught:
                driver.domain_names()
            assert caught.value.message == f"Lost the connection to libvirtd at {uri}."
            driver.facts()  # the next call opens a new connection
    finally:
        proxy.close()


@pytest.mark.parametrize("shape", sorted(GOLDEN_PLANS))
def test_every_domain_shape_passes_libvirts_schema(env: Env, shape: str) -> None:
    """define() skips libvirt's schema check for speed; this is where it is made."""
    if not env.real:
        pytest.skip("libvirt's test driver does not validate against the schema")
    name = env.name(shape.replace("_", "-"))
    plan = dataclasses.replace(
        GOLDEN_PLANS[shape],
        name=name,
        identity=dataclasses.replace(new_identity(name, random_mac()), mac=None),
    )
    env.raw.defineXMLFlags(build_domain_xml(plan), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    assert name in env.driver.domain_names()
    env.driver.undefine(name)


def test_snapshots_form_a_tree_that_survives_deleting_its_middle(env: Env) -> None:
    plan = env.plan("snap", linked=True)
    env.driver.define(plan)
    name = plan.name
    first = env.driver.snapshot_create(name, "s1", description="before the upgrade")
    assert (first.name, first.parent, first.with_memory) == ("s1", None, False)
    assert first.description == "before the upgrade" and first.state == "shutoff"
    second = env.driver.snapshot_create(name, "s2")
    third = env.driver.snapshot_create(name, "s3")
    assert (second.parent, third.parent) == ("s1", "s2")
    assert env.driver.snapshot_current(name) == "s3"
    with pytest.raises(Conflict, match="already has a snapshot named 's2'"):
        env.driver.snapshot_create(name, "s2")

    env.driver.snapshot_delete(name, "s2")  # the middle: its child moves up
    tree = {s.name: s.parent for s in env.driver.snapshots(name)}
    assert tree == {"s1": None, "s3": "s1"}
    env.driver.snapshot_revert(name, "s1")
    assert env.driver.snapshot_current(name) == "s1"
    assert env.driver.state(name) is PowerState.SHUT_OFF
    with pytest.raises(NotFound, match="snapshot"):
        env.driver.snapshot_revert(name, "s2")
    with pytest.raises(NotFound):
        env.driver.snapshot_delete(name, "nope")

    env.driver.start(name)  # a running machine's snapshot holds its memory
    live = env.driver.snapshot_create(name, "live")
    assert live.with_memory and live.state == "running" and live.parent == "s1"
    env.driver.destroy(name)
    env.driver.snapshot_revert(name, "live")  # resumes the machine where it was
    assert env.driver.state(name) is PowerState.RUNNING
    env.driver.undefine(plan.identity.uuid, force=True)  # snapshots do not block it
    assert name not in env.driver.domain_names()
