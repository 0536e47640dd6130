"""libvirt domain snapshot XML: built for Corral's two kinds of snapshot, parsed back.

Pure, like ``domain_xml``. Snapshots are *internal*: they live inside the machine's
own qcow2 file (a linked clone's overlay), so they cost no file of their own, move
with the disk, and deleting one from the middle of a tree only drops what no other
snapshot refers to. A running machine's snapshot also holds its memory and device
state, so reverting resumes it where it was; a stopped machine's holds its disk.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from corral.errors import InvalidInput
from corral.formats.domain_xml import ParsedDisk, safe_fromstring


@dataclass(frozen=True, slots=True)
class ParsedSnapshot:
    name: str
    parent: str | None
    created_at: datetime
    state: str
    """The domain's state when the snapshot was taken (``running``, ``shutoff``…)."""
    with_memory: bool
    """Memory and device state are in it: a revert resumes the running machine."""
    description: str | None


def build_snapshot_xml(name: str, *, with_memory: bool, description: str | None,
                       disks: Iterable[ParsedDisk]) -> str:
    """A snapshot of the machine's writable disks (internal to their qcow2 files), with
    its memory or not. Read-only disks (the NoCloud seed) never change: left out."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    if description:
        ET.SubElement(root, "description").text = description
    ET.SubElement(root, "memory", snapshot="internal" if with_memory else "no")
    listed = ET.SubElement(root, "disks")
    for disk in disks:
        if disk.target is not None and disk.device in ("disk", "cdrom", "lun"):
            ET.SubElement(listed, "disk", name=disk.target,
                          snapshot="no" if disk.readonly else "internal")
    return ET.tostring(root, encoding="unicode")


def parse_snapshot_xml(xml: str) -> ParsedSnapshot:
    root = safe_fromstring(xml, what="snapshot XML")
    if root.tag != "domainsnapshot":
        raise InvalidInput(f"Expected a <domainsnapshot> document, not <{root.tag}>.")
    memory = root.find("memory")
    created = root.findtext("creationTime")
    return ParsedSnapshot(
        name=root.findtext("name") or "",
        parent=root.findtext("parent/name"),
        created_at=datetime.fromtimestamp(int(created) if created else 0, tz=UTC),
        state=root.findtext("state") or "",
        with_memory=memory is not None and memory.get("snapshot") == "internal",
        description=root.findtext("description"),
    )
