"""Domain XML: golden files, round trips, and proof that every plan field is used.

Regenerate the golden files after an intended change with
``CORRAL_UPDATE_GOLDEN=1 pytest tests/unit/formats/test_domain_xml.py`` and review the diff.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from corral.errors import InvalidInput
from corral.formats.domain_xml import (
    NS,
    ParsedDisk,
    ParsedDomain,
    ParsedInterface,
    build_domain_xml,
    parse_domain_xml,
    relocate_domain_xml,
)
from corral.model import Accelerator, DomainPlan, Identity, KernelBoot

GOLDEN = Path(__file__).parent / "golden"

KERNEL_LINKED = DomainPlan(
    name="web-1",
    identity=Identity(
        uuid="6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9",
        mac="52:54:00:12:34:56",
        hostname="web-1.lab",
        instance_id="i-6f1e2d3c",
    ),
    accelerator=Accelerator.TCG,
    cpus=2,
    memory_bytes=512 << 20,
    disk_path="/var/lib/corral/pool/web-1-6f1e2d3c.qcow2",
    disk_backing="/var/lib/corral/images/debian-12.qcow2",
    seed_path="/var/lib/corral/pool/web-1-6f1e2d3c-seed.iso",
    console_log="/var/lib/corral/console/web-1.log",
    network="corral",
    kernel_boot=KernelBoot(
        kernel="/var/lib/corral/images/debian-12.vmlinuz",
        initrd="/var/lib/corral/images/debian-12.initrd",
        cmdline="console=ttyS0 root=/dev/vda rw",
    ),
)

DISK_FULL_KVM = DomainPlan(
    name="db",
    identity=Identity(
        uuid="0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3",
        mac=None,
        hostname="db",
        instance_id="i-0a1b2c3d",
    ),
    accelerator=Accelerator.KVM,
    cpus=4,
    memory_bytes=2 << 30,
    disk_path="/var/lib/corral/pool/db-0a1b2c3d.qcow2",
    disk_backing=None,
    seed_path=None,
    console_log="/var/lib/corral/console/db.log",
    network=None,
    kernel_boot=None,
)

PLANS = {
    "kernel_linked_seed_nic": KERNEL_LINKED,
    "disk_full_no_seed_no_nic_kvm": DISK_FULL_KVM,
}


def plan_from(parsed: ParsedDomain) -> DomainPlan:
    """What a parsed Corral domain says about the plan it was built from."""
    disk, seed = parsed.disk("vda"), parsed.disk("vdb")
    assert disk is not None and disk.source is not None and parsed.console_log is not None
    assert parsed.hostname is not None and parsed.instance_id is not None
    nic = parsed.interfaces[0] if parsed.interfaces else None
    return DomainPlan(
        name=parsed.name,
        identity=Identity(
            uuid=parsed.uuid,
            mac=nic.mac if nic else None,
            hostname=parsed.hostname,
            instance_id=parsed.instance_id,
        ),
        accelerator=Accelerator.KVM if parsed.domain_type == "kvm" else Accelerator.TCG,
        cpus=parsed.cpus,
        memory_bytes=parsed.memory_bytes,
        disk_path=disk.source,
        disk_backing=disk.backing[0] if disk.backing else None,
        seed_path=seed.source if seed else None,
        console_log=parsed.console_log,
        network=nic.network if nic else None,
        kernel_boot=parsed.kernel_boot,
    )


# -- golden files and round trips ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PLANS))
def test_matches_golden_file(name: str) -> None:
    path = GOLDEN / f"{name}.xml"
    xml = build_domain_xml(PLANS[name])
    if os.environ.get("CORRAL_UPDATE_GOLDEN") == "1":
        path.write_text(xml)
    assert xml == path.read_text()


@pytest.mark.parametrize("name", sorted(PLANS))
def test_parse_of_build_round_trips_every_field(name: str) -> None:
    plan = PLANS[name]
    parsed = parse_domain_xml(build_domain_xml(plan))
    assert plan_from(parsed) == plan
    assert parsed.corral_managed


@pytest.mark.parametrize("name", sorted(PLANS))
def test_golden_file_parses_to_its_plan(name: str) -> None:
    assert plan_from(parse_domain_xml((GOLDEN / f"{name}.xml").read_text())) == PLANS[name]


def test_kernel_linked_clone_in_detail() -> None:
    parsed = parse_domain_xml(build_domain_xml(KERNEL_LINKED))
    assert parsed.domain_type == "qemu"
    assert parsed.disks == (
        ParsedDisk(
            target="vda",
            source=KERNEL_LINKED.disk_path,
            device="disk",
            readonly=False,
            format="qcow2",
            backing=(KERNEL_LINKED.disk_backing or "",),
        ),
        ParsedDisk(
            target="vdb",
            source=KERNEL_LINKED.seed_path,
            device="disk",
            readonly=True,
            format="raw",
        ),
    )
    assert parsed.interfaces == (ParsedInterface("52:54:00:12:34:56", "corral", "virtio"),)
    assert parsed.macs == ("52:54:00:12:34:56",)


# -- every field counts ----------------------------------------------------------------------


def _alternatives(value: Any) -> list[Any]:
    """Other values a field could take (None is tried for every field that may hold it)."""
    if isinstance(value, Accelerator):
        return [a for a in Accelerator if a is not value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value * 2]
    if isinstance(value, str):
        return [value + "x"]
    return []


def _variants(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``obj`` with one leaf field changed, for every leaf field, nested dataclasses too."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        assert value is not None, f"the base plan must set {path}, or it is never exercised"
        if is_dataclass(value):
            for sub_path, sub in _variants(value, f"{path}."):
                yield sub_path, replace(obj, **{f.name: sub})
        for alt in _alternatives(value):
            yield path, replace(obj, **{f.name: alt})
        if "None" in str(f.type):
            yield f"{path}=None", replace(obj, **{f.name: None})


def test_every_plan_field_affects_the_xml() -> None:
    base = build_domain_xml(KERNEL_LINKED)
    seen = set()
    for path, variant in _variants(KERNEL_LINKED):
        seen.add(path.removesuffix("=None"))
        assert build_domain_xml(variant) != base, f"DomainPlan.{path} never reaches the XML"
    # Every leaf of DomainPlan, Identity and KernelBoot was tried.
    expected = {f.name for f in fields(DomainPlan)} - {"identity", "kernel_boot"}
    expected |= {f"identity.{f.name}" for f in fields(Identity)}
    expected |= {f"kernel_boot.{f.name}" for f in fields(KernelBoot)} | {"kernel_boot"}
    assert expected <= seen


# -- details of the built XML -----------------------------------------------------------------


def _tree(plan: DomainPlan) -> ET.Element:
    return ET.fromstring(build_domain_xml(plan))


def test_full_clone_declares_an_empty_backing_chain() -> None:
    disk = _tree(DISK_FULL_KVM).find("devices/disk")
    assert disk is not None
    backing = disk.find("backingStore")
    assert backing is not None and len(backing) == 0 and not backing.attrib


def test_mac_without_network_makes_no_interface() -> None:
    plan = replace(KERNEL_LINKED, network=None)
    assert _tree(plan).find("devices/interface") is None


def test_interface_without_mac_lets_libvirt_choose() -> None:
    plan = replace(KERNEL_LINKED, identity=replace(KERNEL_LINKED.identity, mac=None))
    nic = _tree(plan).find("devices/interface")
    assert nic is not None and nic.find("mac") is None


def test_kernel_without_initrd() -> None:
    boot = KernelBoot("/k/vmlinuz", None, "console=ttyS0")
    parsed = parse_domain_xml(build_domain_xml(replace(KERNEL_LINKED, kernel_boot=boot)))
    assert parsed.kernel_boot == boot


def test_memory_is_rounded_up_to_whole_kib() -> None:
    memory = _tree(replace(DISK_FULL_KVM, memory_bytes=(64 << 20) + 1)).find("memory")
    assert memory is not None and memory.text == str(64 * 1024 + 1)


def test_metadata_is_in_corrals_namespace_with_its_prefix() -> None:
    xml = build_domain_xml(DISK_FULL_KVM)
    assert f'xmlns:corral="{NS}"' in xml
    assert '<corral:machine managed="yes">' in xml
    assert _tree(DISK_FULL_KVM).find(f"metadata/{{{NS}}}machine") is not None


def test_no_graphics_no_usb_no_balloon_no_emulator() -> None:
    devices = _tree(KERNEL_LINKED).find("devices")
    assert devices is not None
    assert devices.find("graphics") is None and devices.find("emulator") is None
    assert devices.find("controller[@type='usb']").get("model") == "none"  # type: ignore[union-attr]
    assert devices.find("memballoon").get("model") == "none"  # type: ignore[union-attr]


# -- parsing what others wrote ----------------------------------------------------------------

FOREIGN = """<domain type='kvm' id='3'>
  <name>legacy</name>
  <uuid>AABBCCDD-0000-4000-8000-000000000001</uuid>
  <memory unit='GiB'>1</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='cdrom'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/legacy'/>
      <target dev='sda' bus='scsi'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sdb' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/top.qcow2' index='3'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/srv/mid.qcow2'/>
        <backingStore type='file' index='1'>
          <format type='raw'/>
          <source file='/srv/base.raw'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:AA:BB:CC'/>
      <source bridge='br0'/>
      <model type='e1000'/>
    </interface>
    <interface type='network'>
      <source network='lab'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/legacy-serial.log'/>
      <target port='0'/>
    </serial>
    <graphics type='vnc' port='-1'/>
  </devices>
  <metadata>
    <other:thing xmlns:other='https://example.org/x'/>
  </metadata>
</domain>
"""


def test_foreign_domain_is_read_as_it_is() -> None:
    parsed = parse_domain_xml(FOREIGN)
    assert parsed.name == "legacy"
    assert parsed.uuid == "aabbccdd-0000-4000-8000-000000000001"
    assert parsed.domain_type == "kvm"
    assert parsed.memory_bytes == 1 << 30
    assert parsed.cpus == 2
    assert parsed.disks == (
        ParsedDisk("sda", "/dev/vg0/legacy", "disk", False, "raw"),
        ParsedDisk("sdb", None, "cdrom", True, "raw"),
        ParsedDisk("vdc", None, "disk", False, None),
        ParsedDisk(
            "vdd", "/srv/top.qcow2", "disk", False, None, ("/srv/mid.qcow2", "/srv/base.raw")
        ),
    )
    assert parsed.interfaces == (
        ParsedInterface("52:54:00:aa:bb:cc", None, "e1000"),
        ParsedInterface(None, "lab", None),
    )
    assert parsed.macs == ("52:54:00:aa:bb:cc",)
    assert parsed.kernel_boot is None
    assert parsed.console_log == "/var/log/legacy-serial.log"
    assert not parsed.corral_managed
    assert parsed.hostname is None and parsed.instance_id is None


def test_a_bare_domain_gives_empty_values() -> None:
    assert parse_domain_xml("<domain/>") == ParsedDomain(
        name="",
        uuid="",
        domain_type="",
        memory_bytes=0,
        cpus=1,
        disks=(),
        interfaces=(),
        kernel_boot=None,
        console_log=None,
        corral_managed=False,
    )


@pytest.mark.parametrize(
    ("unit", "factor"),
    [("b", 1), ("KiB", 1 << 10), ("k", 1 << 10), ("KB", 1000), ("M", 1 << 20), ("GiB", 1 << 30)],
)
def test_memory_units(unit: str, factor: int) -> None:
    xml = f"<domain><memory unit='{unit}'>3</memory></domain>"
    assert parse_domain_xml(xml).memory_bytes == 3 * factor


def test_garbage_numbers_are_tolerated() -> None:
    parsed = parse_domain_xml("<domain><memory>lots</memory><vcpu>many</vcpu></domain>")
    assert (parsed.memory_bytes, parsed.cpus) == (0, 1)


def test_corral_metadata_needs_managed_yes() -> None:
    xml = f"<domain><metadata><c:machine xmlns:c='{NS}' managed='no'/></metadata></domain>"
    assert not parse_domain_xml(xml).corral_managed


# -- parsing safely --------------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<domain><name>&lol3;</name></domain>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY secret SYSTEM "file:///etc/shadow">]>
<domain><name>&secret;</name></domain>
"""


@pytest.mark.parametrize(
    "xml",
    [
        BILLION_LAUGHS,
        EXTERNAL_ENTITY,
        "<!DOCTYPE domain><domain/>",
        "<!DOCTYPE domain SYSTEM 'http://example.org/domain.dtd'><domain/>",
    ],
    ids=["billion-laughs", "external-entity", "plain-doctype", "external-dtd"],
)
def test_doctype_is_refused(xml: str) -> None:
    with pytest.raises(InvalidInput, match="DOCTYPE"):
        parse_domain_xml(xml)


@pytest.mark.parametrize("xml", ["", "<domain>", "<domain>&undefined;</domain>", "not xml"])
def test_malformed_xml_is_invalid_input(xml: str) -> None:
    with pytest.raises(InvalidInput, match="not well-formed"):
        parse_domain_xml(xml)


def test_other_documents_are_refused() -> None:
    with pytest.raises(InvalidInput, match="<network>"):
        parse_domain_xml("<network><name>x</name></network>")


# -- relocation: the same domain as another host must read it ------------------------------


def test_relocation_renames_every_file_and_the_network_and_nothing_else() -> None:
    old, new = "/var/lib/corral/", "/srv/pool-b/"
    paths = {p: p.replace(old, new) for p in (
        KERNEL_LINKED.disk_path, KERNEL_LINKED.disk_backing, KERNEL_LINKED.seed_path,
        KERNEL_LINKED.console_log, KERNEL_LINKED.kernel_boot.kernel,  # type: ignore[union-attr]
        KERNEL_LINKED.kernel_boot.initrd,  # type: ignore[union-attr]
    )}
    moved = parse_domain_xml(relocate_domain_xml(build_domain_xml(KERNEL_LINKED), paths, "b-net"))
    here = parse_domain_xml(build_domain_xml(KERNEL_LINKED))
    disk = moved.disk("vda")
    assert disk is not None and disk.source == paths[KERNEL_LINKED.disk_path]
    assert disk.backing == (paths[KERNEL_LINKED.disk_backing],)  # type: ignore[index]
    assert moved.disk("vdb").source == paths[KERNEL_LINKED.seed_path]  # type: ignore[union-attr]
    assert moved.console_log == paths[KERNEL_LINKED.console_log]
    assert moved.kernel_boot is not None and here.kernel_boot is not None
    assert moved.kernel_boot.kernel.startswith(new) and moved.kernel_boot.initrd.startswith(new)  # type: ignore[union-attr]
    assert moved.kernel_boot.cmdline == here.kernel_boot.cmdline
    assert [i.network for i in moved.interfaces] == ["b-net"]
    # the guest-visible machine is the same: identity, size, devices
    assert (moved.name, moved.uuid, moved.cpus, moved.memory_bytes, moved.macs) == (
        here.name, here.uuid, here.cpus, here.memory_bytes, here.macs)
    assert [d.target for d in moved.disks] == [d.target for d in here.disks]


def test_relocation_leaves_unmapped_files_and_refuses_a_doctype() -> None:
    xml = build_domain_xml(DISK_FULL_KVM)
    assert parse_domain_xml(relocate_domain_xml(xml, {}, None)) == parse_domain_xml(xml)
    with pytest.raises(InvalidInput):
        relocate_domain_xml('<!DOCTYPE d [<!ENTITY x "y">]><domain/>', {}, None)
