"""VirtualBox ``.vbox`` machine files (VirtualBox 6 and 7) as a ForeignMachine.

Pure: text in, values out. The XML is parsed with DOCTYPEs refused (hence no entities,
external or otherwise). A disk is attached by the UUID of its medium; the machine's
``MediaRegistry`` maps that UUID to the file. VirtualBox 6 keeps ``StorageControllers``
beside ``Hardware``, VirtualBox 7 inside it: both are read. Settings Corral cannot carry
over are reported in ``ForeignMachine.dropped``, one sentence each.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from corral.errors import InvalidInput
from corral.formats.domain_xml import safe_fromstring
from corral.formats.foreign import ForeignDisk, ForeignMachine, ForeignNic

MAX_VBOX_BYTES = 4 << 20
DEFAULT_MEMORY_MIB = 256

# StorageController/@type -> the bus it emulates.
_BUSES = {
    "AHCI": "sata", "PIIX3": "ide", "PIIX4": "ide", "ICH6": "ide", "LsiLogic": "scsi",
    "BusLogic": "scsi", "LsiLogicSas": "scsi", "NVMe": "nvme", "VirtioSCSI": "scsi",
    "I82078": "floppy", "USB": "usb",
}
_FORMATS = {"VDI": "vdi", "VMDK": "vmdk", "VHD": "vhd", "RAW": "raw", "PARALLELS": "parallels",
            "QED": "qed", "QCOW": "qcow"}
_ATTACHMENTS = ("NAT", "NATNetwork", "BridgedInterface", "InternalNetwork",
                "HostOnlyInterface", "HostOnlyNetwork", "GenericInterface", "CloudNetwork")


def _local(tag: str) -> str:
    """A tag without its namespace: VirtualBox writes ``xmlns="http://www.virtualbox.org/"``."""
    return tag.rsplit("}", 1)[-1]


def _children(el: ET.Element, name: str) -> Iterator[ET.Element]:
    return (c for c in el if _local(c.tag) == name)


def _child(el: ET.Element | None, name: str) -> ET.Element | None:
    return None if el is None else next(_children(el, name), None)


def _descendants(el: ET.Element, name: str) -> Iterator[ET.Element]:
    return (d for d in el.iter() if _local(d.tag) == name)


def _uuid(raw: str | None) -> str | None:
    if raw is None:
        return None
    text = raw.strip().strip("{}").lower()
    return text if re.fullmatch(r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}", text) else None


def _true(el: ET.Element, attr: str, default: bool) -> bool:
    value = el.get(attr)
    return default if value is None else value.strip().lower() == "true"


def _number(el: ET.Element | None, attr: str, default: int) -> int:
    raw = None if el is None else el.get(attr)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"The VirtualBox setting {attr}=\"{raw}\" is not a whole number.") \
            from None
    if value < 1:
        raise InvalidInput(f"The VirtualBox setting {attr}=\"{raw}\" must be at least 1.")
    return value


def _position(dev: ET.Element, attr: str) -> int:
    raw = dev.get(attr, "0")
    if not raw.isdigit():
        raise InvalidInput(f"A VirtualBox attached device has {attr}=\"{raw}\", not a number.")
    return int(raw)


def vbox_mac(raw: str) -> str | None:
    """VirtualBox's ``080027A1B2C3`` as ``08:00:27:a1:b2:c3``; None if not a unicast MAC."""
    text = raw.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{12}", text) or int(text[:2], 16) & 1:
        return None
    return ":".join(text[i:i + 2] for i in range(0, 12, 2))


def parse_vbox(text: str) -> ForeignMachine:
    """The machine a ``.vbox`` file describes.

    Raises InvalidInput for a document that is not well-formed, has a DOCTYPE, or is not
    a VirtualBox machine.
    """
    if len(text) > MAX_VBOX_BYTES:
        raise InvalidInput(f"The VirtualBox machine file is {len(text)} characters long; "
                           "machine files are small.")
    root = safe_fromstring(text, what="VirtualBox machine file")
    machine = _child(root, "Machine") if _local(root.tag) == "VirtualBox" else None
    if machine is None:
        raise InvalidInput("The file is XML but not a VirtualBox machine: it has no "
                           "<VirtualBox><Machine> element.")
    hardware = _child(machine, "Hardware")
    dropped: list[str] = []
    media = _media(machine)
    controllers = [*_children_of(machine, "StorageControllers"),
                   *_children_of(hardware, "StorageControllers")]
    disks = _disks(controllers, media, dropped)
    nics = _nics(hardware, dropped)
    _others(hardware, dropped)
    if _child(machine, "Snapshot") is not None:
        dropped.append("The machine's snapshots were not carried over; only its current "
                       "state is imported.")
    firmware = _child(hardware, "Firmware")
    firmware_type = (firmware.get("type", "BIOS") if firmware is not None else "BIOS").upper()
    return ForeignMachine(
        name=machine.get("name") or "imported",
        cpus=_number(_child(hardware, "CPU"), "count", 1),
        memory_bytes=_number(_child(hardware, "Memory"), "RAMSize", DEFAULT_MEMORY_MIB) << 20,
        disks=disks,
        nics=nics,
        uuid=_uuid(machine.get("uuid")),
        firmware="efi" if firmware_type.startswith("EFI") else "bios",
        guest_os=machine.get("OSType"),
        dropped=tuple(dropped),
    )


def _children_of(parent: ET.Element | None, name: str) -> list[ET.Element]:
    holder = _child(parent, name)
    return [] if holder is None else list(holder)


def _media(machine: ET.Element) -> dict[str, tuple[ET.Element, ET.Element | None]]:
    """Medium UUID -> (its <HardDisk>, its parent <HardDisk> if it is a differencing one)."""
    found: dict[str, tuple[ET.Element, ET.Element | None]] = {}
    registry = _child(machine, "MediaRegistry")
    disks = _child(registry, "HardDisks")

    def walk(el: ET.Element, parent: ET.Element | None) -> None:
        for disk in _children(el, "HardDisk"):
            uuid = _uuid(disk.get("uuid"))
            if uuid is not None:
                found[uuid] = (disk, parent)
            walk(disk, disk)

    if disks is not None:
        walk(disks, None)
    return found


def _disks(controllers: list[ET.Element],
           media: dict[str, tuple[ET.Element, ET.Element | None]],
           dropped: list[str]) -> tuple[ForeignDisk, ...]:
    # The boot disk comes first: bootable controllers, then by port and device.
    attached: list[tuple[int, int, int, str, str, ET.Element]] = []
    for rank, ctl in enumerate(controllers):
        if _local(ctl.tag) != "StorageController":
            continue
        bus = _BUSES.get(ctl.get("type", ""), ctl.get("type", "unknown").lower())
        bootable = 0 if _true(ctl, "Bootable", True) else 1
        for dev in _children(ctl, "AttachedDevice"):
            port, unit = _position(dev, "port"), _position(dev, "device")
            attached.append((bootable, rank, port * 100 + unit, bus, ctl.get("name", bus), dev))
    disks: list[ForeignDisk] = []
    for *_, bus, ctl_name, dev in sorted(attached, key=lambda a: a[:3]):
        where = f"{ctl_name} port {dev.get('port', '0')} device {dev.get('device', '0')}"
        kind = dev.get("type", "")
        if kind != "HardDisk":
            what = {"DVD": "a CD/DVD drive", "Floppy": "a floppy drive"}.get(kind, kind)
            dropped.append(f"{where} is {what}; Corral imports disks only.")
            continue
        image = _child(dev, "Image")
        uuid = _uuid(image.get("uuid")) if image is not None else None
        if uuid is None or uuid not in media:
            raise InvalidInput(f"The disk at {where} names a medium that is not in the "
                               "machine's media registry.",
                               hint="Open and save the machine in VirtualBox, then import it.")
        disk, parent = media[uuid]
        if parent is not None:
            raise InvalidInput(
                f"The disk at {where} is a snapshot (differencing image) of "
                f"'{parent.get('location')}'.",
                hint="Delete the machine's snapshots in VirtualBox, then import it.",
            )
        location = disk.get("location")
        if not location:
            raise InvalidInput(f"The disk at {where} has no location.")
        fmt = disk.get("format", "")
        disks.append(ForeignDisk(path=location, bus=bus, format=_FORMATS.get(fmt.upper(),
                                                                             fmt.lower() or None)))
    return tuple(disks)


def _nics(hardware: ET.Element | None, dropped: list[str]) -> tuple[ForeignNic, ...]:
    adapters = sorted(
        (a for a in _children_of(hardware, "Network") if _local(a.tag) == "Adapter"),
        key=lambda a: int(a.get("slot", "0")),
    )
    nics: list[ForeignNic] = []
    for adapter in adapters:
        if not _true(adapter, "enabled", False):
            continue
        slot = adapter.get("slot", "0")
        raw = adapter.get("MACAddress", "")
        mac = vbox_mac(raw) if raw else None
        if raw and mac is None:
            dropped.append(f"Network adapter {slot}'s MAC address '{raw}' is not a unicast "
                           "MAC address; it gets a new one.")
        attachment = next((_local(c.tag) for c in adapter if _local(c.tag) in _ATTACHMENTS),
                          None)
        if attachment is not None:
            dropped.append(f"Network adapter {slot} was attached to {attachment}; Corral "
                           "connects machines to its own isolated network.")
        nics.append(ForeignNic(mac=mac, model=adapter.get("type", "Am79C973")))
    return tuple(nics)


def _others(hardware: ET.Element | None, dropped: list[str]) -> None:
    if hardware is None:
        return
    audio = _child(hardware, "AudioAdapter")
    if audio is not None and _true(audio, "enabled", False):
        dropped.append(f"The sound card ({audio.get('controller', 'AC97')}) was not carried "
                       "over; Corral machines have no such device.")
    usb = _child(hardware, "USB")
    if usb is not None and any(True for _ in _descendants(usb, "Controller")):
        dropped.append("The USB controller was not carried over; Corral machines have no "
                       "such device.")
    for folder in _descendants(hardware, "SharedFolder"):
        dropped.append(f"The shared folder '{folder.get('name')}' (host folder "
                       f"'{folder.get('hostPath')}') was not carried over; Corral machines "
                       "share no folders with their host.")
    nested = _child(_child(hardware, "CPU"), "NestedHWVirt")
    if nested is not None and _true(nested, "enabled", False):
        dropped.append("Nested virtualization was not carried over.")
    for port in _children_of(hardware, "UART"):
        if _local(port.tag) == "Port" and _true(port, "enabled", False):
            dropped.append(f"Serial port {port.get('slot', '0')} was not carried over; "
                           "Corral gives every machine its own serial console.")
