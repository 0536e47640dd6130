"""Foreign machines into Corral: VMware and VirtualBox disks made with qemu-img, machine
files written as those products write them, real conversions, real boots under TCG.

Booting is the slow part on two cores, so one test imports all four disk formats and
waits for the four guests together.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from corral.images.appliance import ApplianceArtifacts
from corral.ops.console import read_ready

from .conftest import CorralEnv, libvirt_domain_names

pytestmark = pytest.mark.guest

BOOT_TIMEOUT = 240.0


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _vmdk(base: Path, dest: Path, subformat: str) -> None:
    _qemu_img("convert", "-f", "qcow2", "-O", "vmdk", "-o", f"subformat={subformat}",
              str(base), str(dest))


def _vmx(folder: Path, disk: str, *, uuid: str, mac: str, name: str) -> Path:
    """A VMX file as VMware Workstation writes one: quoted values, mixed key case, the
    encoding line, PCI bridges and keys Corral ignores."""
    spaced = " ".join(uuid.replace("-", "")[i:i + 2] for i in range(0, 32, 2))
    bios = spaced[:23] + "-" + spaced[24:]
    text = f""".encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
pciBridge0.present = "TRUE"
pciBridge4.present = "TRUE"
pciBridge4.virtualDev = "pcieRootPort"
pciBridge4.functions = "8"
vmci0.present = "TRUE"
hpet0.present = "TRUE"
displayName = "{name}"
guestOS = "debian12-64"
tools.syncTime = "FALSE"
memsize = "256"
numvcpus = "1"
scsi0.virtualDev = "pvscsi"
scsi0.present = "TRUE"
scsi0:0.fileName = "{disk}"
scsi0:0.present = "TRUE"
ethernet0.connectionType = "nat"
ethernet0.addressType = "generated"
ethernet0.virtualDev = "vmxnet3"
ethernet0.present = "TRUE"
ethernet0.generatedAddress = "{mac.upper()}"
sound.present = "TRUE"
sound.virtualDev = "hdaudio"
uuid.bios = "{bios}"
cleanShutdown = "TRUE"
"""
    path = folder / f"{name}.vmx"
    path.write_text(text)
    return path


def _vbox(folder: Path, disk: str, *, uuid: str, mac: str, name: str) -> Path:
    text = f"""<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{{{uuid}}}" name="{name}" OSType="Debian_64">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{{0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3}}" location="{disk}"
                  format="VDI" type="Normal"/>
      </HardDisks>
    </MediaRegistry>
    <Hardware>
      <CPU count="1"/>
      <Memory RAMSize="256"/>
      <Network>
        <Adapter slot="0" enabled="true" MACAddress="{mac.replace(':', '').upper()}"
                 type="82540EM"><NAT/></Adapter>
      </Network>
      <StorageControllers>
        <StorageController name="SATA" type="AHCI" PortCount="1" Bootable="true">
          <AttachedDevice type="HardDisk" port="0" device="0">
            <Image uuid="{{0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3}}"/>
          </AttachedDevice>
        </StorageController>
      </StorageControllers>
    </Hardware>
  </Machine>
</VirtualBox>
"""
    path = folder / f"{name}.vbox"
    path.write_text(text)
    return path


def _wait_ready(env: CorralEnv, names: list[str]) -> dict[str, str]:
    """Each guest's MAC, as it printed it in its readiness line."""
    console = env.root / "state" / "console"
    deadline = time.monotonic() + BOOT_TIMEOUT
    macs: dict[str, str] = {}
    while len(macs) < len(names) and time.monotonic() < deadline:
        for name in names:
            report = read_ready(console / f"{name}.log")
            if report is not None:
                macs[name] = report.mac
        time.sleep(0.5)
    assert sorted(macs) == sorted(names), f"not ready in time: {set(names) - set(macs)}"
    return macs


def _domain_uuid(name: str) -> str:
    conn = libvirt.open("qemu:///system")
    try:
        return str(conn.lookupByName(name).UUIDString())
    finally:
        conn.close()


def _delete_all(env: CorralEnv) -> None:
    for machine in env.json("vm", "list"):
        env.run("vm", "delete", "--force", machine["name"], check=False)


def test_vmdk_and_vdi_machines_import_boot_and_keep_their_identity(
    with_appliance: CorralEnv, appliance: ApplianceArtifacts
) -> None:
    env = with_appliance
    base = appliance.disk
    # Past 2 GiB, so that twoGbMaxExtentSparse splits the disk into two extents.
    big = env.root / "big.qcow2"
    _qemu_img("convert", "-f", "qcow2", "-O", "qcow2", str(base), str(big))
    _qemu_img("resize", "-f", "qcow2", str(big), "2304M")
    sources = {
        "sparse": ("monolithicSparse", base),
        "split": ("twoGbMaxExtentSparse", big),
        "stream": ("streamOptimized", base),
    }
    identities = {
        "sparse": ("564d0001-1111-4aaa-8bbb-000000000001", "00:0c:29:00:00:01"),
        "split": ("564d0002-2222-4aaa-8bbb-000000000002", "00:0c:29:00:00:02"),
        "stream": ("564d0003-3333-4aaa-8bbb-000000000003", "00:0c:29:00:00:03"),
        "vdi": ("3b2a1c0d-4e5f-4a6b-8c7d-000000000004", "08:00:27:00:00:04"),
    }
    files: dict[str, Path] = {}
    for kind, (subformat, disk) in sources.items():
        folder = env.root / kind
        folder.mkdir()
        _vmdk(disk, folder / f"{kind} disk.vmdk", subformat)
        uuid, mac = identities[kind]
        files[kind] = _vmx(folder, f"{kind} disk.vmdk", uuid=uuid, mac=mac, name=kind)
    assert sorted(p.name for p in (env.root / "split").iterdir()) == [
        "split disk-s001.vmdk", "split disk-s002.vmdk", "split disk.vmdk", "split.vmx"]
    vdi_folder = env.root / "vbox"
    vdi_folder.mkdir()
    _qemu_img("convert", "-f", "qcow2", "-O", "vdi", str(base), str(vdi_folder / "web.vdi"))
    uuid, mac = identities["vdi"]
    files["vdi"] = _vbox(vdi_folder, "web.vdi", uuid=uuid, mac=mac, name="vdi")

    names = [env.name(kind) for kind in identities]
    try:
        for kind, file in files.items():
            command = "vbox" if kind == "vdi" else "vmx"
            result = env.run("import", command, str(file), "--name", env.name(kind),
                             "--kernel-from", "appliance")
            uuid, mac = identities[kind]
            assert f"UUID kept: {uuid}" in result.stdout
            assert f"MAC kept: {mac}" in result.stdout
            assert "Not carried over:" in result.stdout
            assert ("sound card (hdaudio)" if command == "vmx" else "attached to NAT") \
                in result.stdout
        macs = _wait_ready(env, names)
        shown = {m["name"]: m for m in env.json("vm", "list")}
        for kind, (uuid, mac) in identities.items():
            name = env.name(kind)
            assert macs[name] == mac, f"{kind}: the guest's NIC has {macs[name]}"
            assert shown[name]["uuid"] == uuid == _domain_uuid(name)
            assert shown[name]["state"] == "running"
        # the split disk kept its size; every disk is a standalone qcow2 in the pool
        assert shown[env.name("split")]["virtual_size"] == 2304 << 20
        for m in shown.values():
            info = subprocess.run(["qemu-img", "info", "-U", "--output=json", m["disk_path"]],
                                  check=True, capture_output=True, text=True).stdout
            assert '"format": "qcow2"' in info and "backing-filename" not in info
        # Importing the same machine again is a second copy: it needs an identity of its own.
        again = env.run("import", "vmx", str(files["sparse"]), "--name", env.name("again"),
                        "--kernel-from", "appliance", "--no-start", check=False)
        assert again.returncode == 4 and "--new-identity" in again.stderr
        copy = env.run("import", "vmx", str(files["sparse"]), "--name", env.name("copy"),
                       "--kernel-from", "appliance", "--no-start", "--new-identity",
                       "-o", "json")
        changed = {c["what"]: c for c in json.loads(copy.stdout)["identity"]}
        assert not changed["uuid"]["kept"] and not changed["mac"]["kept"]
        assert changed["mac"]["source"] == identities["sparse"][1]
        assert changed["uuid"]["value"] != identities["sparse"][0]
        # an imported machine clones like any other: a full copy, with the same kernel
        env.run("vm", "clone", env.name("copy"), env.name("copy-2"))
        a, b = env.json("vm", "show", env.name("copy")), env.json("vm", "show", env.name("copy-2"))
        assert a["uuid"] != b["uuid"] and a["mac"] != b["mac"]
        assert b["clone"] == "full" and b["image"] is None
        same = subprocess.run(["qemu-img", "compare", "-U", a["disk_path"], b["disk_path"]],
                              capture_output=True, text=True)
        assert same.returncode == 0, same.stdout + same.stderr
    finally:
        _delete_all(env)
    assert libvirt_domain_names(env.prefix) == set()
    assert list((env.root / "state" / "pool").iterdir()) == []


# -- refusals and failures: nothing is left behind ----------------------------------------


def _leftovers(env: CorralEnv) -> dict[str, object]:
    pool = env.root / "state" / "pool"
    return {
        "domains": libvirt_domain_names(env.prefix),
        "pool files": sorted(p.name for p in pool.iterdir()) if pool.exists() else [],
        "records": [m["name"] for m in env.json("vm", "list")],
    }


NOTHING = {"domains": set(), "pool files": [], "records": []}


def _one_sentence(stderr: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert "Traceback" not in stderr


def test_disks_outside_the_folder_corrupt_or_disguised_are_refused_and_leave_nothing(
    with_appliance: CorralEnv, appliance: ApplianceArtifacts
) -> None:
    env = with_appliance
    folder = env.root / "vm"
    folder.mkdir()
    good = folder / "good.vmdk"
    _vmdk(appliance.disk, good, "monolithicSparse")
    split = folder / "split.vmdk"
    _vmdk(appliance.disk, split, "twoGbMaxExtentSparse")
    uuid, mac = "564d0009-9999-4aaa-8bbb-000000000009", "00:0c:29:00:00:09"

    def attempt(disk: str, *extra: str, kernel: str = "appliance"
                ) -> subprocess.CompletedProcess[str]:
        vmx = _vmx(folder, disk, uuid=uuid, mac=mac, name="bad")
        return env.run("import", "vmx", str(vmx), "--name", env.name("bad"),
                       "--kernel-from", kernel, *extra, check=False)

    # a disk named by an absolute path, or by a path that climbs out of the folder
    for disk in ("/etc/passwd", "../../../../etc/passwd"):
        result = attempt(disk)
        assert result.returncode == 5, result.stderr
        assert "outside the machine's folder" in result.stderr
        assert "--allow-path /etc/passwd" in result.stderr
        _one_sentence(result.stderr)
    # named explicitly it is read, and refused for what it is: text, not a VMDK
    result = attempt("/etc/passwd", "--allow-path", "/etc/passwd")
    assert result.returncode == 5 and "contents are raw" in result.stderr, result.stderr
    # a link inside the folder that leads out of it
    (folder / "link.vmdk").symlink_to("/etc/passwd")
    result = attempt("link.vmdk")
    assert result.returncode == 5 and "symbolic link to /etc/passwd" in result.stderr
    # a split descriptor whose second extent climbs out of the folder
    hostile = folder / "hostile.vmdk"
    hostile.write_text(split.read_text().replace(
        'RW 131072 SPARSE "split-s001.vmdk"',
        'RW 131072 SPARSE "split-s001.vmdk"\nRW 16 FLAT "../../../../etc/passwd" 0'))
    assert "etc/passwd" in hostile.read_text()
    result = attempt("hostile.vmdk")
    assert result.returncode == 5 and "'../../../../etc/passwd' is outside" in result.stderr
    # a sparse VMDK whose first grain lies past the end of the file
    corrupt = folder / "corrupt.vmdk"
    data = bytearray(good.read_bytes())
    for directory in struct.unpack_from("<QQ", data, 0x30):  # redundant and primary
        (table,) = struct.unpack_from("<I", data, directory * 512)
        struct.pack_into("<I", data, table * 512, 0x7FFFFF00)
    corrupt.write_bytes(bytes(data))
    result = attempt("corrupt.vmdk")
    assert result.returncode == 5 and "check the vmdk image" in result.stderr, result.stderr
    _one_sentence(result.stderr)
    # a VDI that says it is a VMDK
    _qemu_img("convert", "-f", "qcow2", "-O", "vdi", str(appliance.disk),
              str(folder / "disguised.vmdk"))
    result = attempt("disguised.vmdk")
    assert result.returncode == 5 and "contents are vdi" in result.stderr
    # a kernel image that has no kernel to lend
    _qemu_img("create", "-f", "qcow2", str(env.root / "plain.qcow2"), "8M")
    env.run("image", "import", str(env.root / "plain.qcow2"), "--name", env.name("plain"))
    result = attempt("good.vmdk", kernel=env.name("plain"))
    assert result.returncode == 2 and "no kernel to lend" in result.stderr
    assert _leftovers(env) == NOTHING


@pytest.mark.parametrize("failpoint", ["disk.import:after", "domain.define:after"])
def test_an_import_killed_midway_is_rolled_back_by_the_next_command(
    with_appliance: CorralEnv, appliance: ApplianceArtifacts, failpoint: str
) -> None:
    env = with_appliance
    folder = env.root / "vm"
    folder.mkdir()
    _vmdk(appliance.disk, folder / "disk.vmdk", "streamOptimized")
    vmx = _vmx(folder, "disk.vmdk", uuid="564d0008-8888-4aaa-8bbb-000000000008",
               mac="00:0c:29:00:00:08", name="crash")
    result = env.run("import", "vmx", str(vmx), "--name", env.name("crash"), "--kernel-from",
                     "appliance", env={"CORRAL_FAILPOINT": failpoint}, check=False)
    assert result.returncode == -9  # SIGKILL, in the middle of the job
    pool = env.root / "state" / "pool"
    assert any(p.name.startswith(env.name("crash")) for p in pool.iterdir())
    # the next command finds the dead job and rolls it back: disk, domain, record
    recovered = env.run("job", "list")
    assert "Recovered interrupted machine-import job" in recovered.stderr
    assert _leftovers(env) == NOTHING


def test_a_physical_disk_and_a_raw_image_are_captured_into_the_library(
    corral_env: CorralEnv,
) -> None:
    env = corral_env
    raw = env.root / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(32 << 20)
        f.seek(5 << 20)
        f.write(b"corral was here" * 1000)
    loop = subprocess.run(["losetup", "-f", "--show", str(raw)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        result = env.run("import", "disk", loop, "--name", env.name("phys"))
        assert "32.0 MiB" in result.stdout
        image = env.json("image", "show", env.name("phys"))
        assert image["source_format"] == "raw" and image["virtual_size"] == 32 << 20
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                        image["path"]], check=True, capture_output=True)
        # a mounted disk would be copied torn: refused
        subprocess.run(["mkfs.ext4", "-q", loop], check=True, capture_output=True)
        mnt = env.root / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", loop, str(mnt)], check=True, capture_output=True)
        try:
            refused = env.run("import", "disk", loop, "--name", env.name("torn"), check=False)
        finally:
            subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
        assert refused.returncode == 4 and "is mounted at" in refused.stderr
        _one_sentence(refused.stderr)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)
    env.run("import", "disk", str(raw), "--name", env.name("file"))
    assert env.json("image", "show", env.name("file"))["virtual_size"] == os.path.getsize(raw)
    names = {i["name"] for i in env.json("image", "list")}
    assert {env.name("phys"), env.name("file")} <= names
    assert env.name("torn") not in names
    qcow = env.root / "not-raw.qcow2"
    _qemu_img("create", "-f", "qcow2", str(qcow), "8M")
    result = env.run("import", "disk", str(qcow), "--name", env.name("q"), check=False)
    assert result.returncode == 5 and "corral image import" in result.stderr


def test_an_import_to_another_host_is_converted_here_and_sent_there(
    with_appliance: CorralEnv, appliance: ApplianceArtifacts
) -> None:
    """The remote pool is reached through libvirt only: the disk is converted on the
    controller, sent with its checksum verified, and the appliance's kernel copied."""
    from tests.libvirt_cleanup import remove_prefixed
    from tests.multihost import start_hosts, stop_hosts

    env = with_appliance
    folder = env.root / "vm"
    folder.mkdir()
    _vmdk(appliance.disk, folder / "disk.vmdk", "streamOptimized")
    uuid, mac = "564d0007-7777-4aaa-8bbb-000000000007", "00:0c:29:00:00:07"
    vmx = _vmx(folder, "disk.vmdk", uuid=uuid, mac=mac, name="remote")
    hosts = start_hosts(env.root, 1, first_address=17)  # 127.0.0.17: no other test's
    host = hosts[0]
    name = env.name("remote")
    try:
        pool = env.root / host.name / "pool"
        env.run("host", "add", host.name, host.uri, "--pool-path", str(pool),
                "--network", env.name(host.name), "--accelerator", "tcg")
        result = env.run("import", "vmx", str(vmx), "--name", name, "--kernel-from",
                         "appliance")
        assert f"on host {host.name}" in result.stdout and f"MAC kept: {mac}" in result.stdout
        machine = env.json("vm", "show", name)
        assert machine["host"] == host.name and machine["disk_path"].startswith(str(pool))
        deadline = time.monotonic() + BOOT_TIMEOUT
        console = pool / f"{name}.console.log"
        while time.monotonic() < deadline and read_ready(console) is None:
            time.sleep(0.5)
        report = read_ready(console)
        assert report is not None and report.mac == mac
        env.run("vm", "delete", "--force", name)
        assert not any(p.name.startswith(name) for p in pool.iterdir())
    finally:
        _delete_all(env)
        if host.running:
            remove_prefixed(host.uri, env.prefix)
        stop_hosts(hosts)
