"""VMware ``.vmx`` machine files (Workstation, Player, Fusion, ESXi) as a ForeignMachine.

Pure: bytes in, values out. A VMX file is lines of ``key = "value"``; VMware writes
keys in mixed case and reads them case-insensitively, quotes every value, escapes
special characters as ``|XX`` (hex), and names the file's encoding on a first line
``.encoding = "UTF-8"``. Settings Corral cannot carry over are reported in
``ForeignMachine.dropped``, one sentence each; keys that describe only VMware's own
plumbing (PCI bridges, tools, VMCI, checkpoints…) are ignored without a word.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping
from dataclasses import dataclass

from corral.errors import InvalidInput
from corral.formats.foreign import ForeignDisk, ForeignMachine, ForeignNic

MAX_VMX_BYTES = 1 << 20
"""Real VMX files are a few KiB; anything this large is not one."""

DEFAULT_MEMORY_MIB = 256
"""What Corral gives a machine whose VMX names no ``memsize``."""

_LINE = re.compile(r"^([^\s=]+)\s*=\s*(.*?)$")
_ESCAPE = re.compile(r"\|([0-9A-Fa-f]{2})")
_DISK_SLOT = re.compile(r"^(scsi|ide|sata|nvme)(\d+):(\d+)$")
_NIC_SLOT = re.compile(r"^ethernet(\d+)$")
_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
# Where VMware's BIOS looks first when bios.hddOrder does not say: SCSI, then SATA,
# NVMe and IDE, each by controller and unit.
_BUS_RANK = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}
_CDROM_TYPES = frozenset({"cdrom-image", "cdrom-raw", "atapi-cdrom"})
_DISK_TYPES = frozenset({"disk", "plaindisk", "scsi-harddisk", "ata-harddisk",
                         "sata-harddisk", "nvme-harddisk", "rawdisk"})
_PASSTHROUGH_TYPES = frozenset({"scsi-passthru", "generic"})
_TRUE = frozenset({"true", "yes", "1", "on"})

# Devices that exist only on VMware's virtual hardware, reported when present.
_DEVICES = (
    ("sound", "the sound card"),
    ("usb", "the USB controller"),
    ("ehci", "the USB 2 controller"),
    ("usb_xhci", "the USB 3 controller"),
    ("floppy0", "the floppy drive"),
    ("floppy1", "the second floppy drive"),
    ("serial0", "serial port 0"),
    ("serial1", "serial port 1"),
    ("parallel0", "the parallel port"),
)


@dataclass(frozen=True, slots=True)
class _DiskSlot:
    bus: str
    controller: int
    unit: int

    @property
    def key(self) -> str:
        return f"{self.bus}{self.controller}:{self.unit}"


def parse_vmx(data: bytes, *, fallback_name: str = "imported") -> ForeignMachine:
    """The machine a VMX file describes. ``fallback_name``: when it has no ``displayName``.

    Raises InvalidInput when the bytes are not a VMX file or a number is not a number.
    """
    if len(data) > MAX_VMX_BYTES:
        raise InvalidInput(f"The VMX file is {len(data)} bytes long; a VMX file is a few KiB.")
    settings = read_settings(data)
    if not settings:
        raise InvalidInput("The file holds no 'key = \"value\"' lines: it is not a VMX file.")
    dropped: list[str] = []
    disks = _disks(settings, dropped)
    nics = _nics(settings, dropped)
    _devices(settings, dropped)
    _shared_folders(settings, dropped)
    return ForeignMachine(
        name=settings.get("displayname") or fallback_name,
        cpus=_number(settings, "numvcpus", 1),
        memory_bytes=_number(settings, "memsize", DEFAULT_MEMORY_MIB) << 20,
        disks=disks,
        nics=nics,
        uuid=_uuid(settings.get("uuid.bios")),
        firmware="efi" if settings.get("firmware", "bios").lower() == "efi" else "bios",
        guest_os=settings.get("guestos"),
        dropped=tuple(dropped),
    )


def read_settings(data: bytes) -> dict[str, str]:
    """Every ``key = "value"`` of a VMX file: keys lower-cased, values unquoted and unescaped.

    A key written twice keeps its last value, as VMware does.
    """
    text = _decode(data)
    settings: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(stripped)
        if match is None:
            raise InvalidInput(
                f"The VMX line '{stripped[:60]}' is not of the form key = \"value\"."
            )
        key, raw = match.groups()
        settings[key.lower()] = _value(raw)
    return settings


def _decode(data: bytes) -> str:
    # The .encoding line is ASCII in every encoding VMware writes, so it can be read first.
    head = data[:512].decode("ascii", "replace")
    match = re.search(r'^\s*\.encoding\s*=\s*"([^"]+)"', head, re.MULTILINE | re.IGNORECASE)
    encoding = "utf-8"
    if match:
        try:
            encoding = codecs.lookup(match.group(1)).name
        except LookupError:
            raise InvalidInput(
                f"The VMX file names the unknown encoding '{match.group(1)}'."
            ) from None
    if b"\0" in data:
        raise InvalidInput("The file holds NUL bytes: it is not a VMX file.")
    return data.decode(encoding, "replace").removeprefix("\ufeff")


def _value(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    elif "#" in raw:  # an unquoted value may carry a trailing comment
        raw = raw.split("#", 1)[0].rstrip()
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), raw)


def _true(settings: Mapping[str, str], key: str) -> bool:
    return settings.get(key, "").strip().lower() in _TRUE


def _number(settings: Mapping[str, str], key: str, default: int) -> int:
    raw = settings.get(key)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidInput(f"The VMX setting {key} = \"{raw}\" is not a whole number.") from None
    if value < 1:
        raise InvalidInput(f"The VMX setting {key} = \"{raw}\" must be at least 1.")
    return value


def _uuid(raw: str | None) -> str | None:
    """``56 4d 12 … 9a bc-de f0 …`` (VMware's spelling) as ``564d12…-…``; None if malformed."""
    if raw is None:
        return None
    digits = re.sub(r"[\s\-{}]", "", raw).lower()
    if not re.fullmatch(r"[0-9a-f]{32}", digits):
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def normalise_mac(raw: str) -> str | None:
    """``00:0C:29:AB:CD:EF`` or ``00-0c-29-ab-cd-ef`` as ``00:0c:29:ab:cd:ef``; None if not
    a unicast MAC address."""
    mac = raw.strip().lower().replace("-", ":")
    if not _MAC.match(mac) or int(mac[:2], 16) & 1:
        return None
    return mac


# -- disks --------------------------------------------------------------------------------


def _disks(settings: Mapping[str, str], dropped: list[str]) -> tuple[ForeignDisk, ...]:
    slots: list[_DiskSlot] = []
    for key in settings:
        prefix, _, field = key.rpartition(".")
        match = _DISK_SLOT.match(prefix)
        if match and field == "present":
            bus, controller, unit = match.groups()
            slots.append(_DiskSlot(bus, int(controller), int(unit)))
    order = [s.strip().lower() for s in settings.get("bios.hddorder", "").split(",") if s.strip()]

    def rank(slot: _DiskSlot) -> tuple[int, int, int, int]:
        named = order.index(slot.key) if slot.key in order else len(order)
        return (named, _BUS_RANK[slot.bus], slot.controller, slot.unit)

    disks: list[ForeignDisk] = []
    for slot in sorted(slots, key=rank):
        disk = _disk(settings, slot, dropped)
        if disk is not None:
            disks.append(disk)
    return tuple(disks)


def _disk(settings: Mapping[str, str], slot: _DiskSlot, dropped: list[str]) -> ForeignDisk | None:
    key = slot.key
    controller = f"{slot.bus}{slot.controller}"
    if not _true(settings, f"{key}.present"):
        return None
    if f"{controller}.present" in settings and not _true(settings, f"{controller}.present"):
        return None  # VMware ignores devices on a controller that is not present
    file_name = settings.get(f"{key}.filename", "")
    device_type = settings.get(f"{key}.devicetype", "").lower()
    if not device_type:
        # VMware's default is a hard disk; only an ISO image is taken for a CD.
        device_type = "cdrom-image" if file_name.lower().endswith(".iso") else "disk"
    if device_type in _CDROM_TYPES:
        what = f" ('{file_name}')" if file_name and device_type == "cdrom-image" else ""
        dropped.append(f"{key} is a CD/DVD drive{what}; Corral imports disks only.")
        return None
    if device_type in _PASSTHROUGH_TYPES:
        dropped.append(f"{key} passes a host device through ({device_type}); "
                       "Corral does not pass host devices to machines.")
        return None
    if device_type not in _DISK_TYPES:
        dropped.append(f"{key} has the device type '{device_type}', which Corral does not know; "
                       "it was left out.")
        return None
    if not file_name:
        dropped.append(f"{key} is a disk without a fileName; it was left out.")
        return None
    return ForeignDisk(path=file_name, bus=slot.bus, format="vmdk")


# -- network ------------------------------------------------------------------------------


def _nics(settings: Mapping[str, str], dropped: list[str]) -> tuple[ForeignNic, ...]:
    slots = sorted(
        int(m.group(1))
        for key in settings
        if key.endswith(".present") and (m := _NIC_SLOT.match(key.removesuffix(".present")))
    )
    nics: list[ForeignNic] = []
    for n in slots:
        prefix = f"ethernet{n}"
        if not _true(settings, f"{prefix}.present"):
            continue
        model = settings.get(f"{prefix}.virtualdev") or "vlance"  # VMware's default
        address_type = settings.get(f"{prefix}.addresstype", "generated").lower()
        if address_type == "static":
            raw = settings.get(f"{prefix}.address", "")
        elif address_type in ("generated", "vpx"):
            raw = settings.get(f"{prefix}.generatedaddress", "")
        else:
            dropped.append(f"{prefix} has the address type '{address_type}', which Corral "
                           "does not know; it gets a new MAC address.")
            raw = ""
        mac = normalise_mac(raw) if raw else None
        if raw and mac is None:
            dropped.append(f"{prefix}'s MAC address '{raw}' is not a unicast MAC address; "
                           "it gets a new one.")
        connection = settings.get(f"{prefix}.connectiontype")
        network = settings.get(f"{prefix}.networkname") or settings.get(f"{prefix}.vnet")
        if connection or network:
            where = " ".join(filter(None, [connection, f"'{network}'" if network else None]))
            dropped.append(f"{prefix} was connected to {where}; Corral connects machines to "
                           "its own isolated network.")
        nics.append(ForeignNic(mac=mac, model=model))
    return tuple(nics)


# -- everything else that VMware has and Corral does not ----------------------------------


def _devices(settings: Mapping[str, str], dropped: list[str]) -> None:
    for prefix, what in _DEVICES:
        if _true(settings, f"{prefix}.present"):
            model = settings.get(f"{prefix}.virtualdev")
            kind = f" ({model})" if model else ""
            beyond = " beyond its serial console" if prefix.startswith("serial") else ""
            dropped.append(f"{what[0].upper()}{what[1:]}{kind} was not carried over; a Corral "
                           f"machine has no such device{beyond}.")
    cores = settings.get("cpuid.corespersocket")
    if cores and cores.strip() not in ("", "1"):
        dropped.append(f"The CPU topology of {cores.strip()} cores per socket was not carried "
                       "over; Corral gives each vCPU a socket of its own.")
    if _true(settings, "vhv.enable"):
        dropped.append("Nested virtualization (vhv.enable) was not carried over.")
    if _true(settings, "mks.enable3d"):
        dropped.append("3D graphics (mks.enable3d) were not carried over; Corral machines "
                       "have a serial console only.")


def _shared_folders(settings: Mapping[str, str], dropped: list[str]) -> None:
    folders = sorted(
        key.removesuffix(".present")
        for key in settings
        if re.fullmatch(r"sharedfolder\d+\.present", key)
    )
    for folder in folders:
        if not _true(settings, f"{folder}.present"):
            continue
        name = settings.get(f"{folder}.guestname", folder)
        host_path = settings.get(f"{folder}.hostpath")
        source = f" (host folder '{host_path}')" if host_path else ""
        dropped.append(f"The shared folder '{name}'{source} was not carried over; Corral "
                       "machines share no folders with their host.")
