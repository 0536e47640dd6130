"""The exported domain XML: the machine as it ran, and nothing only Corral has.

libvirt's schema check of it runs in tests/integration/test_export.py, on a real libvirtd.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from corral.errors import InvalidInput
from corral.formats.domain_export import ExportedDomain, build_exported_domain_xml
from corral.formats.domain_xml import parse_domain_xml
from corral.model import KernelBoot

BOOT = KernelBoot("/srv/out/web.kernel", "/srv/out/web.initrd", "console=ttyS0 root=/dev/vda")
DOMAIN = ExportedDomain(
    name="web",
    uuid="0f6a1c1e-26b1-4fbf-9d43-1c2e3f4a5b6c",
    domain_type="qemu",
    cpus=2,
    memory_bytes=320 << 20,
    disk_path="/srv/out/web.qcow2",
    mac="52:54:00:12:34:56",
    kernel_boot=BOOT,
)


def test_reads_back_as_the_machine() -> None:
    parsed = parse_domain_xml(build_exported_domain_xml(DOMAIN))
    assert (parsed.name, parsed.uuid, parsed.domain_type) == ("web", DOMAIN.uuid, "qemu")
    assert (parsed.cpus, parsed.memory_bytes) == (2, 320 << 20)
    assert parsed.kernel_boot == BOOT
    assert [(d.target, d.source, d.format, d.backing) for d in parsed.disks] == [
        ("vda", "/srv/out/web.qcow2", "qcow2", ())
    ]
    assert [(i.mac, i.network, i.model) for i in parsed.interfaces] == [
        ("52:54:00:12:34:56", None, "virtio")
    ]
    assert not parsed.corral_managed and parsed.console_log is None


def test_nothing_only_corral_has() -> None:
    root = ET.fromstring(build_exported_domain_xml(DOMAIN))
    assert root.find("metadata") is None
    assert [i.get("type") for i in root.iter("interface")] == ["user"]
    assert root.find("devices/serial/log") is None
    assert len(root.findall("devices/disk")) == 1  # no seed
    # the chain is spelled out as empty: libvirt never probes the disk for a backing file
    assert root.find("devices/disk/backingStore") is not None
    assert len(root.find("devices/disk/backingStore")) == 0  # type: ignore[arg-type]


def test_relative_paths_are_refused() -> None:
    from dataclasses import replace

    with pytest.raises(InvalidInput, match="absolute path"):
        build_exported_domain_xml(replace(DOMAIN, disk_path="web.qcow2"))
