"""Export a real machine in every format, and prove each export stands without Corral.

One source machine (booted once, so its linked clone owns data of its own, then stopped)
is shared by the module. Each format is checked with the real qemu-img (standalone,
right subformat, and the same bytes as the source's whole chain), the OVF is read
back, the libvirt export is defined and booted as it is on a fresh libvirtd that has
never heard of Corral (127.0.0.10), and the OVA is imported back and boots.
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import shutil
import subprocess
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from corral.formats.ovf import OvfDiskSpec, OvfSpec, build_ovf, parse_ovf
from corral.formats.vmx import parse_vmx
from corral.images.appliance import ApplianceArtifacts
from corral.images.ova import members, read_ova
from corral.ops.console import read_ready
from tests.libvirt_cleanup import remove_prefixed
from tests.multihost import TestHost, connection, start_hosts, stop_hosts
from tests.serving import import_appliance

from .conftest import CorralEnv

pytestmark = pytest.mark.guest

BOOT_TIMEOUT = 120.0


@dataclass
class Source:
    env: CorralEnv
    name: str
    shown: dict[str, Any]
    refused_while_running: subprocess.CompletedProcess[str]
    running_dest: Path


@pytest.fixture(scope="module")
def env(appliance: ApplianceArtifacts) -> Iterator[CorralEnv]:
    """A Corral of this module's own (the per-test ``corral_env`` would boot per test)."""
    prefix = f"ct{secrets.token_hex(3)}"
    root = Path("/var/tmp") / f"corral-test-{prefix}"
    root.mkdir(mode=0o755)
    made = CorralEnv(root=root, prefix=prefix)
    made.env = {f"CORRAL_{k.upper()}": str(v) for k, v in made.settings_kwargs.items()}
    made.env["CORRAL_CONFIG"] = str(root / "none.toml")
    try:
        import_appliance(made.settings(), appliance)
        yield made
    finally:
        remove_prefixed("qemu:///system", prefix)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def source(env: CorralEnv) -> Source:
    name = env.name("src")
    env.run("vm", "create", name, "--image", "appliance", "--cpus", "2", "--memory", "320M",
            "--wait")
    running_dest = env.root / "while-running"
    running_dest.mkdir()
    refused = env.run("export", name, "--format", "qcow2", "--output", str(running_dest),
                      check=False)
    env.run("vm", "stop", name)
    shown = env.json("vm", "show", name)
    assert shown["state"] == "shut-off"
    assert shown["owned_bytes"] > 0 and shown["shared_bytes"] > 0  # a linked clone, used
    return Source(env, name, shown, refused, running_dest)


def export(source: Source, fmt: str) -> tuple[Path, str]:
    return export_named(source.env, source.name, fmt, f"export-{fmt}")


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def info(path: Path, fmt: str) -> dict[str, Any]:
    result = qemu_img("info", "-f", fmt, "--output=json", str(path))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def assert_same_disk_as_source(source: Source, exported: Path, fmt: str) -> None:
    """Byte for byte what the guest sees: the export against the source's whole chain."""
    result = qemu_img("compare", "-f", "qcow2", "-F", fmt, source.shown["disk_path"],
                      str(exported))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Images are identical" in result.stdout


def test_a_running_machine_is_refused_and_nothing_is_written(source: Source) -> None:
    refused = source.refused_while_running
    assert refused.returncode == 4  # Conflict
    assert "is running; Corral exports only stopped machines" in refused.stderr
    assert f"corral vm stop {source.name}" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert list(source.running_dest.iterdir()) == []


def test_qcow2_is_one_standalone_image(source: Source) -> None:
    dest, stdout = export(source, "qcow2")
    disk = dest / f"{source.name}.qcow2"
    assert sorted(p.name for p in dest.iterdir()) == [disk.name]  # no staging left behind
    assert str(disk) in stdout and "MiB" in stdout
    data = info(disk, "qcow2")
    assert "backing-filename" not in data and "full-backing-filename" not in data
    assert data["virtual-size"] == source.shown["virtual_size"]
    assert qemu_img("check", "-f", "qcow2", str(disk)).returncode == 0
    assert_same_disk_as_source(source, disk, "qcow2")


def test_vmdk_is_monolithic_sparse_with_a_vmx_that_describes_the_machine(source: Source) -> None:
    dest, _ = export(source, "vmdk")
    disk, vmx = dest / f"{source.name}.vmdk", dest / f"{source.name}.vmx"
    assert sorted(p.name for p in dest.iterdir()) == sorted([disk.name, vmx.name])
    data = info(disk, "vmdk")
    assert data["format-specific"]["data"]["create-type"] == "monolithicSparse"
    assert "backing-filename" not in data
    assert qemu_img("check", "-f", "vmdk", str(disk)).returncode == 0
    assert_same_disk_as_source(source, disk, "vmdk")
    machine = parse_vmx(vmx.read_bytes())
    assert (machine.name, machine.cpus, machine.memory_bytes) == (source.name, 2, 320 << 20)
    assert [d.path for d in machine.disks] == [disk.name]
    assert [n.mac for n in machine.nics] == [source.shown["mac"]]
    assert machine.uuid == source.shown["uuid"]


def test_ova_is_a_valid_package_with_the_machine_in_it(source: Source) -> None:
    dest, _ = export(source, "ova")
    ova = dest / f"{source.name}.ova"
    assert sorted(p.name for p in dest.iterdir()) == [ova.name]
    vmdk_name = f"{source.name}-disk1.vmdk"
    # the order OVF requires: descriptor first; the manifest here comes last
    assert [n for n, _ in members(ova)] == [f"{source.name}.ovf", vmdk_name, f"{source.name}.mf"]
    staging = source.env.root / "ova-check"
    staging.mkdir()
    unpacked = read_ova(ova, staging)  # every SHA-256 in the manifest checked
    assert unpacked.manifest_checked and unpacked.notes == ()
    machine = unpacked.package.machine
    assert (machine.name, machine.cpus, machine.memory_bytes) == (source.name, 2, 320 << 20)
    assert [n.mac for n in machine.nics] == [source.shown["mac"]]
    assert machine.uuid == source.shown["uuid"]
    disk = unpacked.staged[vmdk_name]
    assert info(disk, "vmdk")["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert_same_disk_as_source(source, disk, "vmdk")
    assert unpacked.package.file(vmdk_name).size == disk.stat().st_size  # type: ignore[union-attr]
    assert parse_ovf(_ovf_text(ova, source.name)).machine == machine


def _ovf_text(ova: Path, name: str) -> str:
    with tarfile.open(ova) as tar:
        member = tar.extractfile(f"{name}.ovf")
        assert member is not None
        return member.read().decode()


def test_an_existing_file_is_never_overwritten(source: Source) -> None:
    dest = source.env.root / "occupied"
    dest.mkdir()
    (dest / f"{source.name}.ova").write_bytes(b"mine")
    result = source.env.run("export", source.name, "--format", "ova", "--output", str(dest),
                            check=False)
    assert result.returncode == 4 and "already exists" in result.stderr
    assert (dest / f"{source.name}.ova").read_bytes() == b"mine"
    assert [p.name for p in dest.iterdir()] == [f"{source.name}.ova"]


def test_a_failed_export_leaves_nothing_behind(source: Source) -> None:
    """The disk is written, then the kernel cannot be read: nothing of it may remain."""
    with connection("qemu:///system") as conn:
        kernel = Path(ET.fromstring(conn.lookupByName(source.name).XMLDesc(0)).findtext("os/kernel")
                      or "")
    assert kernel.is_file()
    hidden = kernel.with_name(kernel.name + ".hidden-by-test")
    dest = source.env.root / "failed"
    dest.mkdir()
    kernel.rename(hidden)
    try:
        result = source.env.run("export", source.name, "--format", "libvirt", "--output",
                                str(dest), check=False)
    finally:
        hidden.rename(kernel)
    assert result.returncode == 6, result.stderr  # StorageError
    assert "Could not copy the kernel" in result.stderr and "Traceback" not in result.stderr
    assert list(dest.iterdir()) == []  # neither the converted disk nor the staging folder


# -- the libvirt export on a libvirtd without Corral ----------------------------------------


@pytest.fixture
def bare_host(env: CorralEnv) -> Iterator[TestHost]:
    """A fresh libvirtd at 127.0.0.10: no Corral pool, network or domain ever existed there."""
    hosts = start_hosts(env.root, 1, first_address=10)
    try:
        yield hosts[0]
    finally:
        if hosts[0].running:
            remove_prefixed(hosts[0].uri, env.prefix)  # its network's bridge is the kernel's
        stop_hosts(hosts)


def console_until(dom: libvirt.virDomain, conn: libvirt.virConnect, marker: bytes,
                  timeout: float) -> bytes:
    """Resume a paused domain with its serial console attached; its output up to ``marker``."""
    stream = conn.newStream(0)
    dom.openConsole(None, stream, 0)
    seen = bytearray()
    found = threading.Event()

    def read() -> None:
        with contextlib.suppress(libvirt.libvirtError):  # the stream ends when the guest does
            while not found.is_set():
                data = stream.recv(4096)
                if not isinstance(data, bytes) or not data:
                    return
                seen.extend(data)
                at = seen.find(marker)
                if at >= 0 and b"\n" in seen[at:]:
                    found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    dom.resume()
    found.wait(timeout)
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()  # ends the stream, and with it the reader
    reader.join(10)
    return bytes(seen)


def test_libvirt_export_is_defined_and_boots_on_a_bare_libvirtd(
    source: Source, bare_host: TestHost
) -> None:
    dest, _ = export(source, "libvirt")
    xml_path = dest / f"{source.name}.xml"
    expected = {f"{source.name}.{ext}" for ext in ("xml", "qcow2", "kernel", "initrd")}
    assert {p.name for p in dest.iterdir()} == expected
    xml = xml_path.read_text()
    assert "corral" not in xml.lower().replace(str(source.env.root).lower(), "")
    root = ET.fromstring(xml)
    files = [*(s.get("file") for s in root.iter("source")), root.findtext("os/kernel"),
             root.findtext("os/initrd")]
    assert files and all(f is not None and f.startswith(str(dest) + "/") for f in files)
    assert info(dest / f"{source.name}.qcow2", "qcow2").get("backing-filename") is None
    assert_same_disk_as_source(source, dest / f"{source.name}.qcow2", "qcow2")
    with connection(bare_host.uri) as conn:
        assert conn.listAllDomains(0) == []
        # As it is, no edits; checked against libvirt's schema too (virsh define --validate).
        dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        try:
            assert dom.UUIDString() == source.shown["uuid"]
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            screen = console_until(dom, conn, b"CORRAL-READY", BOOT_TIMEOUT)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            dom.undefine()
    report = read_ready(screen)
    assert report is not None, f"no readiness line on the console:\n{screen[-2000:]!r}"
    assert report.mac == source.shown["mac"]  # the MAC survived the export
    # No seed travels with the export: the guest falls back to its own defaults.
    assert report.hostname == "appliance"


def test_a_machine_on_another_host_is_exported_through_libvirt(
    env: CorralEnv, bare_host: TestHost
) -> None:
    """The host's disk is flattened there, fetched over libvirt, and nothing stays behind."""
    pool = env.root / "far-pool"
    env.run("host", "add", "far", bare_host.uri, "--pool-path", str(pool), "--network",
            env.name("far"), "--accelerator", "tcg")
    name = env.name("far")
    env.run("vm", "create", name, "--image", "appliance", "--host", "far", "--no-start")
    try:
        before = sorted(p.name for p in pool.iterdir())
        dest, _ = export_named(env, name, "libvirt", "export-far")
        shown = env.json("vm", "show", name)
        disk = dest / f"{name}.qcow2"
        assert info(disk, "qcow2").get("backing-filename") is None
        # The pool is under /var/tmp, which every test host shares: compare with its chain.
        result = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", shown["disk_path"], str(disk))
        assert result.returncode == 0 and "Images are identical" in result.stdout
        kernel = ET.fromstring((dest / f"{name}.xml").read_text()).findtext("os/kernel")
        assert kernel == str(dest / f"{name}.kernel") and Path(kernel).stat().st_size > 1 << 20
        assert sorted(p.name for p in pool.iterdir()) == before  # the flattened copy is gone
    finally:
        env.run("vm", "delete", "--force", name)
        env.run("host", "remove", "far")  # the module's other tests place on the local host


def export_named(env: CorralEnv, name: str, fmt: str, folder: str) -> tuple[Path, str]:
    dest = env.root / folder
    dest.mkdir()
    return dest, env.run("export", name, "--format", fmt, "--output", str(dest)).stdout


# -- round trip ---------------------------------------------------------------------------


def wait_ready(env: CorralEnv, name: str) -> Any:
    log = env.root / "state" / "console" / f"{name}.log"
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if log.exists() and (report := read_ready(log)) is not None:
            return report
        time.sleep(0.5)
    raise AssertionError(f"{name} never said it was ready")


def test_round_trip_through_ova_boots(source: Source) -> None:
    env = source.env
    dest, _ = export_once(source)
    ova = dest / f"{source.name}.ova"
    # The same inventory still holds the source: keeping its identity is refused.
    refused = env.run("import", "ova", str(ova), "--name", env.name("back"), "--kernel-from",
                      "appliance", check=False)
    assert refused.returncode != 0 and "--new-identity" in refused.stderr
    assert "Traceback" not in refused.stderr
    back = env.name("back")
    result = env.run("import", "ova", str(ova), "--name", back, "--kernel-from", "appliance",
                     "--new-identity", "--host", "local")
    assert f"as machine {back}" in result.stdout
    shown = env.json("vm", "show", back)
    assert (shown["cpus"], shown["memory_bytes"]) == (2, 320 << 20)
    assert shown["mac"] != source.shown["mac"] and shown["uuid"] != source.shown["uuid"]
    report = wait_ready(env, back)
    assert report.mac == shown["mac"]  # its own new MAC, on the disk that came back
    # nothing of the package is left in Corral's state dir once imported
    assert not list((env.root / "state").glob("ova-*"))
    env.run("vm", "delete", "--force", back)


def export_once(source: Source) -> tuple[Path, str]:
    dest = source.env.root / "export-ova"
    if (dest / f"{source.name}.ova").exists():
        return dest, ""
    return export(source, "ova")


def test_a_hostile_ova_is_refused_by_the_cli_and_leaves_nothing(env: CorralEnv) -> None:
    descriptor = build_ovf(OvfSpec("m", 1, 64 << 20, (OvfDiskSpec("m.vmdk", 5, 1 << 20),)))
    evil = env.root / "evil.ova"
    target = env.root / "escaped"
    with tarfile.open(evil, "w") as tar:
        for name, data in [("m.ovf", descriptor), (f"../{target.name}", b"owned")]:
            info_ = tarfile.TarInfo(name)
            info_.size = len(data)
            tar.addfile(info_, io.BytesIO(data))
    result = env.run("import", "ova", str(evil), check=False)
    assert result.returncode == 5  # UnsafeImage
    assert "climbs out with '..'" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists()
    assert not list((env.root / "state").glob("ova-*"))  # the staging folder is gone

