"""OVF descriptors (DMTF DSP0243): read 1.x and 2.x into a ForeignMachine; write 1.0.

Pure: text in, typed values out, and back; no file is opened here. Parsing goes through
``safe_fromstring``, which refuses any DOCTYPE, so no entity is ever declared, expanded
or fetched. Element and attribute names are matched by namespace and local name, never
by prefix: VMware writes ``ovf:`` prefixes, VirtualBox a default namespace.

What the reader understands: the References (file ids, names, sizes, gzip compression),
the DiskSection, one VirtualSystem (directly, or alone in a VirtualSystemCollection) with
its OperatingSystemSection and VirtualHardwareSection: CPUs (ResourceType 3), memory
(4), IDE/SCSI/SATA/NVMe controllers (5, 6, 20), disks (17) and NICs (10) with their MAC.
OVF 2.x also spells disks and NICs as ``StorageItem`` and ``EthernetPortItem``. The
machine UUID comes from Corral's own identity section, VirtualBox's ``vbox:Machine`` or
VMware's ``uuid.bios``. Everything else the descriptor asks for is named in ``dropped``.

The writer emits OVF 1.0 as both VMware (ovftool) and VirtualBox import it: every
element and attribute qualified, ``Info`` first in each section, the CIM properties of
each ``Item`` in the schema's (alphabetical) order, one SCSI (LSI Logic) controller,
VMware's streamOptimized VMDK format URI.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from corral.errors import InvalidInput
from corral.formats.domain_xml import safe_fromstring
from corral.formats.foreign import ForeignDisk, ForeignMachine, ForeignNic
from corral.formats.manifest import check_plain_name

OVF1 = "http://schemas.dmtf.org/ovf/envelope/1"
OVF2 = "http://schemas.dmtf.org/ovf/envelope/2"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW = "http://www.vmware.com/schema/ovf"
VBOX = "http://www.virtualbox.org/ovf/machine"
CORRAL = "https://corral.dev/xmlns/ovf/1"
"""Corral's extension section: the machine's UUID, which OVF has no standard place for."""
XML_NS = "http://www.w3.org/XML/1998/namespace"

VMDK_STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

# Process-wide, like domain_xml's; these pairs are the ones every OVF tool writes.
for _prefix, _uri in (("ovf", OVF1), ("rasd", RASD), ("vssd", VSSD), ("corralovf", CORRAL)):
    ET.register_namespace(_prefix, _uri)

# CIM ResourceType values (DSP1041/CIM_ResourceAllocationSettingData).
CPU, MEMORY, IDE, SCSI, NIC, FLOPPY, CDROM, DVD, DISK, SERIAL, OTHER_STORAGE = (
    3, 4, 5, 6, 10, 14, 15, 16, 17, 21, 20,
)
_CONTROLLER_BUS = {IDE: "ide", SCSI: "scsi", OTHER_STORAGE: "sata"}
_KNOWN_NOT_CARRIED = {
    1: "an 'other' device", 14: "the floppy drive", 15: "the CD drive", 16: "the DVD drive",
    19: "a storage extent", 21: "a serial port", 22: "a parallel port",
    23: "the USB controller", 24: "the graphics controller", 35: "the sound card",
}  # fmt: skip


# -- values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OvfFile:
    """One ``References/File``: a file of the package."""

    id: str
    href: str
    """A plain file name beside the descriptor (anything else is refused)."""
    size: int | None
    compression: str | None = None
    """``gzip`` when the file is stored compressed; ``None`` when stored as it is."""


@dataclass(frozen=True, slots=True)
class OvfPackage:
    """What a descriptor says: the machine, and the files it is made of."""

    machine: ForeignMachine
    files: tuple[OvfFile, ...]
    version: int
    """1 or 2: the OVF envelope's major version."""

    def file(self, href: str) -> OvfFile | None:
        return next((f for f in self.files if f.href == href), None)


@dataclass(frozen=True, slots=True)
class OvfDiskSpec:
    """One disk the writer describes: its file in the package and its size."""

    href: str
    file_size: int
    capacity: int
    """The disk's virtual size, bytes."""
    populated_size: int | None = None
    """Bytes of data in it, when known (a hint importers use to plan space)."""
    format_uri: str = VMDK_STREAM_OPTIMIZED


@dataclass(frozen=True, slots=True)
class OvfSpec:
    """The machine the writer describes."""

    name: str
    cpus: int
    memory_bytes: int
    disks: tuple[OvfDiskSpec, ...]
    macs: tuple[str, ...] = ()
    uuid: str | None = None
    network: str = "VM Network"
    """The logical network every NIC connects to; importers map it to one of theirs."""
    os_type: int = 101
    """CIM operating system type: 101 is "Linux 2.6.x 64-Bit" (any 64-bit Linux)."""
    os_description: str = "Linux (64-bit)"


# -- reading ------------------------------------------------------------------------------


def parse_ovf(text: str) -> OvfPackage:
    """What an OVF 1.x or 2.x descriptor describes.

    Raises InvalidInput for text that is not well-formed, has a DOCTYPE, is not an OVF
    envelope, describes no or several machines, or names files outside the package.
    """
    root = safe_fromstring(text, what="OVF descriptor")
    ns = _envelope_namespace(root)
    reader = _Reader(ns)
    files = reader.files(root)
    disks = reader.disks(root, {f.id: f for f in files})
    system = reader.virtual_system(root)
    machine = reader.machine(system, disks)
    return OvfPackage(machine=machine, files=files, version=1 if ns == OVF1 else 2)


def _envelope_namespace(root: ET.Element) -> str:
    for ns in (OVF1, OVF2):
        if root.tag == f"{{{ns}}}Envelope":
            return ns
    raise InvalidInput(
        "The OVF descriptor is not an OVF envelope (its root is not an Envelope of "
        "OVF 1.x or 2.x).",
        hint="Check that the file is the .ovf of the package.",
    )


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(el: ET.Element, *names: str) -> Iterator[ET.Element]:
    return (c for c in el if _local(c.tag) in names)


def _child_text(el: ET.Element, name: str) -> str | None:
    """The text of ``el``'s child with local name ``name``, whatever its namespace."""
    for child in _children(el, name):
        return (child.text or "").strip()
    return None


def _int(value: str | None, what: str) -> int:
    try:
        return int(value or "")
    except ValueError:
        raise InvalidInput(
            f"The OVF descriptor's {what} is not a whole number: '{value}'."
        ) from None


_UNIT = re.compile(r"^byte\s*(?:\*\s*(2|10)\s*\^\s*(\d+))?$", re.IGNORECASE)
_UNIT_WORDS = {
    "bytes": 1, "kilobytes": 1 << 10, "kb": 1 << 10, "megabytes": 1 << 20, "mb": 1 << 20,
    "gigabytes": 1 << 30, "gb": 1 << 30, "terabytes": 1 << 40, "tb": 1 << 40,
}  # fmt: skip


def unit_bytes(units: str | None, default: int) -> int:
    """Bytes per unit for a DSP0004 programmatic unit (``byte * 2^20``) or a word that
    VirtualBox and older tools write (``MegaBytes``); ``default`` when absent."""
    if units is None or not units.strip():
        return default
    text = units.strip()
    match = _UNIT.match(text)
    if match is not None:
        if match[1] is None:
            return 1
        base: int = int(match[1]) ** int(match[2])
        return base
    if text.lower() in _UNIT_WORDS:
        return _UNIT_WORDS[text.lower()]
    raise InvalidInput(f"The OVF descriptor uses the unit '{text}', which Corral cannot read.")


@dataclass(frozen=True, slots=True)
class _Disk:
    id: str
    file: OvfFile | None
    capacity: int
    format: str | None


def _format_of(uri: str | None) -> str | None:
    if not uri:
        return None
    lowered = uri.lower()
    for key in ("vmdk", "qcow", "vdi", "vhd"):
        if key in lowered:
            return {"qcow": "qcow2", "vhd": "vpc"}.get(key, key)
    return "raw" if "raw" in lowered else None


def _normalise_mac(text: str | None) -> str | None:
    if not text:
        return None
    digits = re.sub(r"[^0-9A-Fa-f]", "", text)
    if len(digits) != 12:
        return None
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2)).lower()


def _normalise_uuid(text: str | None) -> str | None:
    if not text:
        return None
    digits = re.sub(r"[^0-9A-Fa-f]", "", text)
    if len(digits) != 32:
        return None
    d = digits.lower()
    return f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:]}"


class _Reader:
    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.dropped: list[str] = []

    def q(self, name: str) -> str:
        return f"{{{self.ns}}}{name}"

    def attr(self, el: ET.Element, name: str) -> str | None:
        # Producers qualify OVF attributes (ovf:id); a few write them bare.
        value = el.get(self.q(name))
        return value if value is not None else el.get(name)

    def files(self, root: ET.Element) -> tuple[OvfFile, ...]:
        refs = root.find(self.q("References"))
        found: list[OvfFile] = []
        for el in [] if refs is None else refs.findall(self.q("File")):
            file_id, href = self.attr(el, "id"), self.attr(el, "href")
            if not file_id or not href:
                raise InvalidInput("The OVF descriptor has a File without an id or an href.")
            check_plain_name(href, "The OVF descriptor")
            if self.attr(el, "chunkSize") is not None:
                raise InvalidInput(
                    f"The OVF descriptor stores '{href}' in chunks, which Corral does not read.",
                    hint="Export the machine again without chunking (ovftool's default).",
                )
            compression = self.attr(el, "compression") or None
            if compression not in (None, "identity", "gzip"):
                raise InvalidInput(
                    f"The OVF descriptor compresses '{href}' with '{compression}'; Corral "
                    "reads only gzip."
                )
            size = self.attr(el, "size")
            found.append(
                OvfFile(
                    id=file_id,
                    href=href,
                    size=_int(size, f"size of '{href}'") if size is not None else None,
                    compression=None if compression == "identity" else compression,
                )
            )
        if len({f.id for f in found}) != len(found) or len({f.href for f in found}) != len(found):
            raise InvalidInput("The OVF descriptor lists the same file twice.")
        return tuple(found)

    def disks(self, root: ET.Element, files: dict[str, OvfFile]) -> dict[str, _Disk]:
        found: dict[str, _Disk] = {}
        for section in root.iter(self.q("DiskSection")):
            for el in section.findall(self.q("Disk")):
                disk_id = self.attr(el, "diskId") or ""
                ref = self.attr(el, "fileRef")
                if ref is not None and ref not in files:
                    raise InvalidInput(
                        f"The OVF descriptor's disk '{disk_id}' names the file '{ref}', "
                        "which its References do not list."
                    )
                capacity_text = self.attr(el, "capacity") or ""
                if capacity_text.startswith("${"):
                    raise InvalidInput(
                        f"The OVF descriptor's disk '{disk_id}' takes its size from the "
                        f"property {capacity_text}, which Corral does not evaluate."
                    )
                units = unit_bytes(self.attr(el, "capacityAllocationUnits"), 1)
                found[disk_id] = _Disk(
                    id=disk_id,
                    file=files[ref] if ref is not None else None,
                    capacity=_int(capacity_text, f"capacity of disk '{disk_id}'") * units,
                    format=_format_of(self.attr(el, "format")),
                )
        return found

    def virtual_system(self, root: ET.Element) -> ET.Element:
        systems = list(root.iter(self.q("VirtualSystem")))
        if not systems:
            raise InvalidInput("The OVF descriptor describes no virtual machine.")
        if len(systems) > 1:
            names = ", ".join(self.attr(s, "id") or "?" for s in systems)
            raise InvalidInput(
                f"The OVF descriptor describes {len(systems)} machines ({names}); Corral "
                "imports one machine per package."
            )
        return systems[0]

    def machine(self, system: ET.Element, disks: dict[str, _Disk]) -> ForeignMachine:
        name = _child_text(system, "Name") or self.attr(system, "id") or ""
        hardware = system.find(self.q("VirtualHardwareSection"))
        if hardware is None:
            raise InvalidInput(f"The OVF descriptor's machine '{name}' has no hardware section.")
        items = list(_children(hardware, "Item", "StorageItem", "EthernetPortItem"))
        by_instance = {_child_text(i, "InstanceID") or "": i for i in items}
        cpus, memory = 1, 0
        foreign_disks: list[ForeignDisk] = []
        nics: list[ForeignNic] = []
        for item in items:
            kind = _int(_child_text(item, "ResourceType"), "ResourceType of an item")
            label = _child_text(item, "ElementName") or f"item {_child_text(item, 'InstanceID')}"
            if kind == CPU:
                cpus = _int(_child_text(item, "VirtualQuantity"), "number of CPUs")
            elif kind == MEMORY:
                units = _child_text(item, "AllocationUnits") or _child_text(
                    item, "VirtualQuantityUnits"
                )
                quantity = _int(_child_text(item, "VirtualQuantity"), "memory size")
                memory = quantity * unit_bytes(units, 1 << 20)  # OVF's customary MB
            elif kind == DISK:
                disk = self.disk(item, label, disks, by_instance)
                if disk is not None:
                    foreign_disks.append(disk)
            elif kind == NIC:
                nics.append(
                    ForeignNic(
                        mac=_normalise_mac(_child_text(item, "Address")),
                        model=_child_text(item, "ResourceSubType") or None,
                    )
                )
            elif kind in (IDE, SCSI, OTHER_STORAGE):
                continue  # read through each disk's Parent
            else:
                what = _KNOWN_NOT_CARRIED.get(kind, f"a device of ResourceType {kind}")
                self.dropped.append(f"'{label}' ({what}) was not carried over.")
        nics = self.with_vbox_macs(system, nics)
        if cpus < 1 or memory < 1:
            raise InvalidInput(f"The OVF descriptor's machine '{name}' has no CPU or no memory.")
        self.note_sections(system)
        return ForeignMachine(
            name=name,
            cpus=cpus,
            memory_bytes=memory,
            disks=tuple(foreign_disks),
            nics=tuple(nics),
            uuid=self.uuid(system),
            firmware=self.firmware(hardware),
            guest_os=self.guest_os(system),
            dropped=tuple(self.dropped),
        )

    def disk(
        self,
        item: ET.Element,
        label: str,
        disks: dict[str, _Disk],
        by_instance: dict[str, ET.Element],
    ) -> ForeignDisk | None:
        resource = _child_text(item, "HostResource") or ""
        disk_id = re.sub(r"^(ovf:)?/disk/", "", resource)
        disk = disks.get(disk_id)
        if disk is None or not resource:
            raise InvalidInput(
                f"The OVF descriptor's disk item '{label}' names '{resource}', which its "
                "DiskSection does not describe."
            )
        if disk.file is None:
            self.dropped.append(
                f"'{label}' is an empty disk of {disk.capacity} bytes with no file; it was "
                "not carried over."
            )
            return None
        controller = by_instance.get(_child_text(item, "Parent") or "")
        bus = "scsi"
        if controller is not None:
            kind = _int(_child_text(controller, "ResourceType"), "ResourceType of a controller")
            subtype = (_child_text(controller, "ResourceSubType") or "").lower()
            bus = "nvme" if "nvme" in subtype else _CONTROLLER_BUS.get(kind, "scsi")
            if "virtio" in subtype:
                bus = "virtio"
        return ForeignDisk(path=disk.file.href, bus=bus, format=disk.format)

    def with_vbox_macs(self, system: ET.Element, nics: list[ForeignNic]) -> list[ForeignNic]:
        """VirtualBox keeps MACs only in its own machine section: adapters in slot order."""
        adapters = [
            el
            for machine in system.iter(f"{{{VBOX}}}Machine")
            for el in machine.iter()
            if _local(el.tag) == "Adapter" and el.get("enabled", "true") == "true"
        ]
        adapters.sort(key=lambda el: _int(el.get("slot", "0"), "slot of a VirtualBox adapter"))
        macs = [_normalise_mac(el.get("MACAddress")) for el in adapters]
        return [
            replace(nic, mac=macs[n]) if nic.mac is None and n < len(macs) else nic
            for n, nic in enumerate(nics)
        ]

    def uuid(self, system: ET.Element) -> str | None:
        for el in system.iter(f"{{{CORRAL}}}Uuid"):
            return _normalise_uuid(el.text)
        for el in system.iter(f"{{{VBOX}}}Machine"):
            return _normalise_uuid(el.get("uuid"))
        for el in system.iter(f"{{{VMW}}}ExtraConfig"):
            if el.get(f"{{{VMW}}}key") == "uuid.bios":
                return _normalise_uuid(el.get(f"{{{VMW}}}value"))
        return None

    def firmware(self, hardware: ET.Element) -> str:
        for el in hardware.iter(f"{{{VMW}}}Config"):
            if el.get(f"{{{VMW}}}key") == "firmware":
                return "efi" if el.get(f"{{{VMW}}}value") == "efi" else "bios"
        return "bios"

    def guest_os(self, system: ET.Element) -> str | None:
        section = system.find(self.q("OperatingSystemSection"))
        if section is None:
            return None
        return (
            section.get(f"{{{VMW}}}osType")
            or _child_text(section, "Description")
            or (f"CIM OS type {self.attr(section, 'id')}" if self.attr(section, "id") else None)
        )

    def note_sections(self, system: ET.Element) -> None:
        for section in system:
            name = _local(section.tag)
            if name in ("ProductSection", "EulaSection", "AnnotationSection", "StartupSection"):
                self.dropped.append(f"The descriptor's {name} was not carried over.")


# -- writing ------------------------------------------------------------------------------


def _ovf(name: str) -> str:
    return f"{{{OVF1}}}{name}"


def _el(tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.Element(tag, {_ovf(k): v for k, v in attrib.items()})
    el.text = text
    return el


def _with(parent: ET.Element, children: Iterable[ET.Element]) -> ET.Element:
    parent.extend(children)
    return parent


def _section(tag: str, info: str, children: Iterable[ET.Element], **attrib: str) -> ET.Element:
    return _with(_el(_ovf(tag), **attrib), [_el(_ovf("Info"), info), *children])


def _cim(namespace: str, tag: str, properties: dict[str, str]) -> ET.Element:
    """A CIM settings element; its properties in the schema's (alphabetical) order."""
    return _with(
        ET.Element(tag),
        [_el(f"{{{namespace}}}{key}", properties[key]) for key in sorted(properties)],
    )


def _item(properties: dict[str, str]) -> ET.Element:
    return _cim(RASD, _ovf("Item"), properties)


def _references(spec: OvfSpec) -> ET.Element:
    return _with(
        _el(_ovf("References")),
        [
            _el(_ovf("File"), href=d.href, id=f"file{n}", size=str(d.file_size))
            for n, d in enumerate(spec.disks, start=1)
        ],
    )


def _disk_section(spec: OvfSpec) -> ET.Element:
    disks = []
    for n, d in enumerate(spec.disks, start=1):
        attrib = {
            "capacity": str(d.capacity),
            "capacityAllocationUnits": "byte",
            "diskId": f"vmdisk{n}",
            "fileRef": f"file{n}",
            "format": d.format_uri,
        }
        if d.populated_size is not None:
            attrib["populatedSize"] = str(d.populated_size)
        disks.append(_el(_ovf("Disk"), **attrib))
    return _section("DiskSection", "Virtual disk information", disks)


def _network_section(spec: OvfSpec) -> ET.Element:
    network = _with(
        _el(_ovf("Network"), name=spec.network),
        [_el(_ovf("Description"), f"The network {spec.name} was connected to")],
    )
    return _section("NetworkSection", "The list of logical networks", [network])


def _hardware(spec: OvfSpec) -> ET.Element:
    system = _cim(
        VSSD,
        _ovf("System"),
        {
            "ElementName": "Virtual Hardware Family",
            "InstanceID": "0",
            "VirtualSystemIdentifier": spec.name,
            # vmx-07: the oldest hardware version every VMware product still imports.
            "VirtualSystemType": "vmx-07",
        },
    )
    mib = -(-spec.memory_bytes // (1 << 20))  # round up: never less memory than the machine had
    items = [
        _item({
            "AllocationUnits": "hertz * 10^6",
            "Description": "Number of Virtual CPUs",
            "ElementName": f"{spec.cpus} virtual CPU(s)",
            "InstanceID": "1",
            "ResourceType": str(CPU),
            "VirtualQuantity": str(spec.cpus),
        }),
        _item({
            "AllocationUnits": "byte * 2^20",
            "Description": "Memory Size",
            "ElementName": f"{mib}MB of memory",
            "InstanceID": "2",
            "ResourceType": str(MEMORY),
            "VirtualQuantity": str(mib),
        }),
        _item({
            "Address": "0",
            "Description": "SCSI Controller",
            "ElementName": "SCSI Controller 0",
            "InstanceID": "3",
            "ResourceSubType": "lsilogic",
            "ResourceType": str(SCSI),
        }),
    ]  # fmt: skip
    instance = 4
    for n, _disk in enumerate(spec.disks, start=1):
        items.append(_item({
            "AddressOnParent": str(n - 1),
            "ElementName": f"Hard Disk {n}",
            "HostResource": f"ovf:/disk/vmdisk{n}",
            "InstanceID": str(instance),
            "Parent": "3",
            "ResourceType": str(DISK),
        }))  # fmt: skip
        instance += 1
    for n, mac in enumerate(spec.macs, start=1):
        items.append(_item({
            "Address": mac,
            "AddressOnParent": str(6 + n),
            "AutomaticAllocation": "true",
            "Connection": spec.network,
            "Description": f"E1000 ethernet adapter on \"{spec.network}\"",
            "ElementName": f"Network adapter {n}",
            "InstanceID": str(instance),
            "ResourceSubType": "E1000",
            "ResourceType": str(NIC),
        }))  # fmt: skip
        instance += 1
    return _section("VirtualHardwareSection", "Virtual hardware requirements", [system, *items])


def _identity_section(uuid: str) -> ET.Element:
    # required="false": OVF consumers that do not know the section must ignore it.
    section = _el(f"{{{CORRAL}}}IdentitySection", required="false")
    return _with(
        section,
        [_el(_ovf("Info"), "The machine's identity in Corral"), _el(f"{{{CORRAL}}}Uuid", uuid)],
    )


def build_ovf(spec: OvfSpec) -> bytes:
    """An OVF 1.0 descriptor of ``spec``, UTF-8 encoded, with an XML declaration."""
    if spec.cpus < 1 or spec.memory_bytes < 1:
        raise InvalidInput("An OVF machine needs at least one CPU and some memory.")
    for disk in spec.disks:
        check_plain_name(disk.href, "The OVF writer")
    os_section = _section(
        "OperatingSystemSection",
        "The kind of installed guest operating system",
        [_el(_ovf("Description"), spec.os_description)],
        id=str(spec.os_type),
    )
    system_children = [
        _el(_ovf("Info"), "A virtual machine"),
        _el(_ovf("Name"), spec.name),
        os_section,
        _hardware(spec),
    ]
    if spec.uuid is not None:
        system_children.append(_identity_section(spec.uuid))
    envelope = _with(
        ET.Element(_ovf("Envelope"), {_ovf("version"): "1.0", f"{{{XML_NS}}}lang": "en-US"}),
        [
            _references(spec),
            _disk_section(spec),
            _network_section(spec),
            _with(_el(_ovf("VirtualSystem"), id=spec.name), system_children),
        ],
    )
    ET.indent(envelope)
    text: bytes = ET.tostring(envelope, encoding="utf-8", xml_declaration=True)
    return text + b"\n"
