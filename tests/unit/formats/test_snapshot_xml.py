"""Snapshot XML: what Corral asks libvirt for, and what it reads back."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from corral.errors import InvalidInput
from corral.formats.domain_xml import ParsedDisk
from corral.formats.snapshot_xml import build_snapshot_xml, parse_snapshot_xml

DISKS = [
    ParsedDisk(target="vda", source="/pool/web.qcow2", device="disk", readonly=False,
               format="qcow2"),
    ParsedDisk(target="vdb", source="/pool/web-seed.iso", device="disk", readonly=True,
               format="raw"),
]


def test_a_running_machines_snapshot_holds_its_memory_and_skips_read_only_disks() -> None:
    root = ET.fromstring(build_snapshot_xml("s1", with_memory=True, description="a <note>",
                                            disks=DISKS))
    assert root.findtext("name") == "s1" and root.findtext("description") == "a <note>"
    assert root.find("memory").get("snapshot") == "internal"  # type: ignore[union-attr]
    assert {d.get("name"): d.get("snapshot") for d in root.iter("disk")} == {
        "vda": "internal", "vdb": "no"}


def test_a_stopped_machines_snapshot_is_its_disk() -> None:
    root = ET.fromstring(build_snapshot_xml("s2", with_memory=False, description=None,
                                            disks=DISKS[:1]))
    assert root.find("memory").get("snapshot") == "no"  # type: ignore[union-attr]
    assert root.find("description") is None


def test_parse_reads_the_tree_and_refuses_a_doctype() -> None:
    parsed = parse_snapshot_xml(
        "<domainsnapshot><name>s2</name><parent><name>s1</name></parent>"
        "<state>running</state><creationTime>1796137119</creationTime>"
        "<memory snapshot='internal'/></domainsnapshot>")
    assert (parsed.name, parsed.parent, parsed.state, parsed.with_memory) == (
        "s2", "s1", "running", True)
    assert parsed.created_at == datetime.fromtimestamp(1796137119, tz=UTC)
    with pytest.raises(InvalidInput):
        parse_snapshot_xml('<!DOCTYPE x [<!ENTITY e "e">]><domainsnapshot/>')
    with pytest.raises(InvalidInput):
        parse_snapshot_xml("<domain/>")
