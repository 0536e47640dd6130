"""The pure OVF reader (1.x and 2.x, as VMware and VirtualBox write them) and the 1.0 writer."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from corral.errors import InvalidInput
from corral.formats.ovf import (
    OVF1,
    RASD,
    OvfDiskSpec,
    OvfSpec,
    build_ovf,
    parse_ovf,
    unit_bytes,
)

SAMPLES = Path(__file__).parent / "ovf_samples"


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def test_vmware_ovftool_1_0() -> None:
    package = parse_ovf(sample("vmware-ovftool-1.0.ovf"))
    m = package.machine
    assert package.version == 1
    assert (m.name, m.cpus, m.memory_bytes) == ("web01", 2, 2048 << 20)
    assert [(d.path, d.bus, d.format) for d in m.disks] == [("web01-disk1.vmdk", "scsi", "vmdk")]
    assert [(n.mac, n.model) for n in m.nics] == [("00:50:56:ab:12:cd", "VmxNet3")]
    assert m.firmware == "efi"
    assert m.guest_os == "debian10_64Guest"
    assert m.uuid == "564d2a1b-3c4d-5e6f-7081-92a3b4c5d6e7"
    assert [(f.id, f.href, f.size) for f in package.files] == [
        ("file1", "web01-disk1.vmdk", 68608),
        ("file2", "web01-file1.nvram", 8684),
    ]
    dropped = " ".join(m.dropped)
    assert "'Video card'" in dropped and "'CD/DVD drive 1' (the CD drive)" in dropped
    assert "AnnotationSection" in dropped


def test_virtualbox_7_2_0_storage_and_ethernet_port_items() -> None:
    package = parse_ovf(sample("virtualbox-7-2.0.ovf"))
    m = package.machine
    assert package.version == 2
    # no <Name>: the VirtualSystem's id names the machine
    assert (m.name, m.cpus, m.memory_bytes) == ("db", 4, 1024 << 20)
    assert [(d.path, d.bus, d.format) for d in m.disks] == [("db-disk001.vmdk", "sata", "vmdk")]
    # the MAC lives only in VirtualBox's own section; the disabled adapter is no NIC
    assert [(n.mac, n.model) for n in m.nics] == [("08:00:27:a1:b2:c3", "E1000")]
    assert m.uuid == "6f2f8c2e-1a3b-4c5d-8e9f-0a1b2c3d4e5f"
    assert m.guest_os == "Debian_64"
    assert package.files[0].size is None  # VirtualBox writes no size
    dropped = " ".join(m.dropped)
    for device in ("'usb' (the USB controller)", "'sound' (the sound card)", "'cdrom1'"):
        assert device in dropped


def test_the_writer_reads_back_as_written() -> None:
    spec = OvfSpec(
        name="web-1",
        cpus=3,
        memory_bytes=300 << 20,
        disks=(OvfDiskSpec("web-1-disk1.vmdk", 12345, 1 << 30, 4096),),
        macs=("52:54:00:12:34:56",),
        uuid="0f6a1c1e-26b1-4fbf-9d43-1c2e3f4a5b6c",
    )
    package = parse_ovf(build_ovf(spec).decode())
    m = package.machine
    assert package.version == 1
    assert (m.name, m.cpus, m.memory_bytes) == ("web-1", 3, 300 << 20)
    assert [(d.path, d.format) for d in m.disks] == [("web-1-disk1.vmdk", "vmdk")]
    assert [n.mac for n in m.nics] == ["52:54:00:12:34:56"]
    assert m.uuid == spec.uuid
    assert m.dropped == ()
    assert [(f.href, f.size) for f in package.files] == [("web-1-disk1.vmdk", 12345)]


def test_the_writer_rounds_memory_up_to_whole_mib() -> None:
    spec = OvfSpec("odd", 1, (64 << 20) + 1, ())
    assert parse_ovf(build_ovf(spec).decode()).machine.memory_bytes == 65 << 20


def test_written_items_follow_the_cim_schema_order() -> None:
    """ovftool validates against the schema: each Item's properties in alphabetical order,
    Info first in every section, the envelope's References before its sections."""
    disk = OvfDiskSpec("d.vmdk", 1, 1 << 20)
    spec = OvfSpec("web", 1, 256 << 20, (disk,), ("52:54:00:00:00:01",))
    root = ET.fromstring(build_ovf(spec))
    assert root.tag == f"{{{OVF1}}}Envelope" and root.get(f"{{{OVF1}}}version") == "1.0"
    assert [c.tag.split("}")[1] for c in root] == [
        "References", "DiskSection", "NetworkSection", "VirtualSystem",
    ]  # fmt: skip
    items = root.findall(f".//{{{OVF1}}}Item")
    assert [i.findtext(f"{{{RASD}}}ResourceType") for i in items] == ["3", "4", "6", "17", "10"]
    for item in items:
        names = [c.tag.split("}")[1] for c in item]
        assert names == sorted(names)
        assert all(c.tag.startswith(f"{{{RASD}}}") for c in item)
    for section in root.iter():
        if section.tag.endswith("Section"):
            assert section[0].tag == f"{{{OVF1}}}Info"


@pytest.mark.parametrize(
    ("units", "expected"),
    [
        ("byte * 2^20", 1 << 20),
        ("byte*2^30", 1 << 30),
        ("byte * 10^9", 10**9),
        ("byte", 1),
        ("MegaBytes", 1 << 20),
        ("GigaBytes", 1 << 30),
        (None, 1 << 20),
    ],
)
def test_units(units: str | None, expected: int) -> None:
    assert unit_bytes(units, 1 << 20) == expected


def test_an_unknown_unit_is_refused() -> None:
    with pytest.raises(InvalidInput, match="'furlongs'"):
        unit_bytes("furlongs", 1)


def test_an_external_entity_is_refused_before_anything_is_read() -> None:
    evil = (
        '<?xml version="1.0"?>\n<!DOCTYPE Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
        f'<Envelope xmlns="{OVF1}"><References/>&x;</Envelope>'
    )
    with pytest.raises(InvalidInput, match="OVF descriptor has a DOCTYPE"):
        parse_ovf(evil)


def test_a_billion_laughs_is_refused() -> None:
    evil = (
        '<!DOCTYPE E [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        f'<Envelope xmlns="{OVF1}">&b;</Envelope>'
    )
    with pytest.raises(InvalidInput, match="DOCTYPE"):
        parse_ovf(evil)


def _replace(name: str, old: str, new: str) -> str:
    text = sample(name)
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('ovf:href="web01-disk1.vmdk"', 'ovf:href="../../etc/shadow"', "not a plain file name"),
        ('ovf:href="web01-disk1.vmdk"', 'ovf:href="/etc/shadow"', "not a plain file name"),
        ('ovf:href="web01-disk1.vmdk"', 'ovf:href="sub/disk.vmdk"', "not a plain file name"),
        ('ovf:fileRef="file1"', 'ovf:fileRef="file9"', "References do not list"),
        ("ovf:/disk/vmdisk1", "ovf:/disk/vmdisk7", "DiskSection does not describe"),
        ('ovf:capacity="16"', 'ovf:capacity="${disk.size}"', "does not evaluate"),
        ('ovf:size="68608"', 'ovf:size="68608" ovf:chunkSize="1000"', "in chunks"),
        ('ovf:size="68608"', 'ovf:size="68608" ovf:compression="bzip2"', "only gzip"),
        ("<rasd:VirtualQuantity>2048<", "<rasd:VirtualQuantity>lots<", "not a whole number"),
        (f'xmlns="{OVF1}"', 'xmlns="urn:not-ovf"', "not an OVF envelope"),
    ],
)
def test_malformed_descriptors_are_refused(old: str, new: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_ovf(_replace("vmware-ovftool-1.0.ovf", old, new))


def _system_span(text: str) -> tuple[int, int]:
    closing = "</VirtualSystem>"
    return text.index("  <VirtualSystem"), text.index(closing) + len(closing)


def test_several_machines_are_refused() -> None:
    text = sample("vmware-ovftool-1.0.ovf")
    start, end = _system_span(text)
    system = text[start:end]
    collection = (
        '<VirtualSystemCollection ovf:id="pair"><Info>two</Info>'
        + system
        + system.replace('ovf:id="web01"', 'ovf:id="web02"')
        + "</VirtualSystemCollection>"
    )
    with pytest.raises(InvalidInput, match=r"2 machines \(web01, web02\)"):
        parse_ovf(text[:start] + collection + text[end:])


def test_one_machine_in_a_collection_is_read() -> None:
    text = sample("vmware-ovftool-1.0.ovf")
    start, end = _system_span(text)
    wrapped = (
        text[:start]
        + '<VirtualSystemCollection ovf:id="one"><Info>one</Info>'
        + text[start:end]
        + "</VirtualSystemCollection>"
        + text[end:]
    )
    assert parse_ovf(wrapped).machine.name == "web01"


def test_an_empty_disk_is_dropped_with_a_sentence() -> None:
    text = _replace("vmware-ovftool-1.0.ovf", 'ovf:fileRef="file1" ', "")
    m = parse_ovf(text).machine
    assert m.disks == ()
    assert any("empty disk of 17179869184 bytes" in d for d in m.dropped)
