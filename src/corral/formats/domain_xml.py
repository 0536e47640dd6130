"""libvirt domain XML: built from a DomainPlan, parsed back into typed values.

Pure: no libvirt, no I/O. Elements are built by one small function each, every one
returning a fresh element (nothing mutates a tree it did not just create), and
serialized by ElementTree, never by string formatting. Parsing is tolerant, because
it also reads domains defined outside Corral (a missing element gives ``None`` or an
empty value), and safe: a document with a DOCTYPE, hence with entities, is refused.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from xml.parsers import expat

from corral.errors import InvalidInput
from corral.model import Accelerator, DomainPlan, Identity, KernelBoot

NS = "https://corral.dev/xmlns/domain/1"
"""Namespace of Corral's own ``<metadata>`` element."""
NS_PREFIX = "corral"

# ElementTree's prefix table is process-wide; registering the same pair again is harmless.
ET.register_namespace(NS_PREFIX, NS)

_MACHINE = f"{{{NS}}}machine"
_HOSTNAME = f"{{{NS}}}hostname"
_INSTANCE_ID = f"{{{NS}}}instance-id"

DISK_TARGET = "vda"
SEED_TARGET = "vdb"


# -- parsed values ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedDisk:
    target: str | None
    """Guest device name, e.g. ``vda``."""
    source: str | None
    """File or block device path; ``None`` for network or pool-volume disks."""
    device: str
    """``disk``, ``cdrom``, ``floppy`` or ``lun`` (libvirt's default is ``disk``)."""
    readonly: bool
    format: str | None
    """The driver's format (``qcow2``, ``raw``…); ``None`` when libvirt would probe."""
    backing: tuple[str, ...] = ()
    """Backing files declared in the XML, nearest first."""


@dataclass(frozen=True, slots=True)
class ParsedInterface:
    mac: str | None
    network: str | None
    """The libvirt network, for ``type='network'`` interfaces."""
    model: str | None


@dataclass(frozen=True, slots=True)
class ParsedDomain:
    name: str
    uuid: str
    domain_type: str
    """``qemu`` (TCG), ``kvm``…; empty when the XML does not say."""
    memory_bytes: int
    """0 when the XML does not say."""
    cpus: int
    disks: tuple[ParsedDisk, ...]
    interfaces: tuple[ParsedInterface, ...]
    kernel_boot: KernelBoot | None
    console_log: str | None
    corral_managed: bool
    """The domain carries Corral's ``<corral:machine managed='yes'/>`` metadata."""
    hostname: str | None = None
    """From Corral's metadata; ``None`` for domains Corral did not define."""
    instance_id: str | None = None

    @property
    def macs(self) -> tuple[str, ...]:
        return tuple(i.mac for i in self.interfaces if i.mac)

    def disk(self, target: str) -> ParsedDisk | None:
        return next((d for d in self.disks if d.target == target), None)


# -- building: one function per element ----------------------------------------------------


def _leaf(tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.Element(tag, attrib)
    el.text = text
    return el


def _with(parent: ET.Element, children: Iterable[ET.Element]) -> ET.Element:
    """``parent`` with ``children`` appended: assembles a tree that is still being built."""
    parent.extend(children)
    return parent


def _metadata(identity: Identity) -> ET.Element:
    # The hostname and instance-id make a domain self-describing even without the store.
    machine = _with(
        ET.Element(_MACHINE, managed="yes"),
        [_leaf(_HOSTNAME, identity.hostname), _leaf(_INSTANCE_ID, identity.instance_id)],
    )
    return _with(ET.Element("metadata"), [machine])


def _memory(memory_bytes: int) -> ET.Element:
    kib = -(-memory_bytes // 1024)  # round up: never give a guest less than asked
    return _leaf("memory", str(kib), unit="KiB")


def _os(boot: KernelBoot | None) -> ET.Element:
    children = [_leaf("type", "hvm", arch="x86_64", machine="pc")]
    if boot is None:
        children.append(_leaf("boot", dev="hd"))
    else:
        children.append(_leaf("kernel", boot.kernel))
        if boot.initrd is not None:
            children.append(_leaf("initrd", boot.initrd))
        children.append(_leaf("cmdline", boot.cmdline))
    return _with(ET.Element("os"), children)


def _features() -> ET.Element:
    # ACPI lets virDomainShutdown press the virtual power button.
    return _with(ET.Element("features"), [_leaf("acpi")])


def _backing_store(chain: tuple[str, ...]) -> ET.Element:
    """The whole backing chain spelled out, ending in an empty ``<backingStore/>``.

    libvirt then never probes the images for backing files: a probed chain is what
    lets a hostile image name any file on the host as its base.
    """
    if not chain:
        return ET.Element("backingStore")
    return _with(
        ET.Element("backingStore", type="file"),
        [_leaf("format", type="qcow2"), _leaf("source", file=chain[0]), _backing_store(chain[1:])],
    )


def _is_block(path: str) -> bool:
    """A disk under /dev is a block device: the lvm-thin and rbd storage backends' volumes,
    which hold raw disks (corral.storage.block)."""
    return path.startswith("/dev/")


def _disk(
    target: str, path: str, fmt: str, *, backing: tuple[str, ...] = (), readonly: bool = False
) -> ET.Element:
    # No <metadata_cache>: QEMU 7.2's own L2 cache (up to 32 MiB) maps 256 GiB of an
    # overlay, and bench/first_write measured no gain from 64 MiB (a 128 KiB cache, too
    # small for the 4 GiB written, made first writes 9-12x slower than raw).
    driver = {"name": "qemu", "type": fmt}
    if not readonly:
        driver["discard"] = "unmap"  # the guest's TRIM frees space in the pool
    block = _is_block(path)
    children = [
        _leaf("driver", **driver),
        _leaf("source", dev=path) if block else _leaf("source", file=path),
        _backing_store(backing),
        _leaf("target", dev=target, bus="virtio"),
    ]
    if readonly:
        children.append(_leaf("readonly"))
    return _with(ET.Element("disk", type="block" if block else "file", device="disk"), children)


def _interface(network: str, mac: str | None) -> ET.Element:
    # No option ROM: iPXE would spend ~0.1 s of emulated CPU per boot, and Corral's
    # machines never boot from the network.
    children = [
        _leaf("source", network=network),
        _leaf("model", type="virtio"),
        _leaf("rom", enabled="no"),
    ]
    if mac is not None:
        children.insert(0, _leaf("mac", address=mac))
    return _with(ET.Element("interface", type="network"), children)


def _serial(log_file: str) -> ET.Element:
    # A pty serial port gives an interactive console; virtlogd also copies it to the log.
    return _with(
        ET.Element("serial", type="pty"),
        [_leaf("log", file=log_file, append="off"), _leaf("target", port="0")],
    )


def _console() -> ET.Element:
    return _with(ET.Element("console", type="pty"), [_leaf("target", type="serial", port="0")])


def _devices(plan: DomainPlan) -> ET.Element:
    backing = (plan.disk_backing,) if plan.disk_backing is not None else ()
    fmt = "raw" if _is_block(plan.disk_path) else "qcow2"
    children = [_disk(DISK_TARGET, plan.disk_path, fmt, backing=backing)]
    if plan.seed_path is not None:
        children.append(_disk(SEED_TARGET, plan.seed_path, "raw", readonly=True))
    if plan.network is not None:
        children.append(_interface(plan.network, plan.identity.mac))
    children += [
        _serial(plan.console_log),
        _console(),
        _leaf("controller", type="usb", model="none"),
        # No balloon: Corral does not resize memory at run time, and it costs a device.
        _leaf("memballoon", model="none"),
    ]
    return _with(ET.Element("devices"), children)


def _domain_type(accelerator: Accelerator) -> str:
    return {Accelerator.KVM: "kvm", Accelerator.TCG: "qemu"}[accelerator]


def build_domain_xml(plan: DomainPlan) -> str:
    """The persistent definition of ``plan``'s domain, as libvirt domain XML."""
    domain = _with(
        ET.Element("domain", type=_domain_type(plan.accelerator)),
        [
            _leaf("name", plan.name),
            _leaf("uuid", plan.identity.uuid),
            _metadata(plan.identity),
            _memory(plan.memory_bytes),
            _leaf("vcpu", str(plan.cpus)),
            _os(plan.kernel_boot),
            _features(),
            _leaf("on_poweroff", "destroy"),
            _leaf("on_reboot", "restart"),
            _leaf("on_crash", "destroy"),
            _devices(plan),
        ],
    )
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


# -- parsing -------------------------------------------------------------------------------

_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": 1 << 10, "kib": 1 << 10,
    "mb": 1000**2, "m": 1 << 20, "mib": 1 << 20,
    "gb": 1000**3, "g": 1 << 30, "gib": 1 << 30,
    "tb": 1000**4, "t": 1 << 40, "tib": 1 << 40,
    "pb": 1000**5, "p": 1 << 50, "pib": 1 << 50,
    "eb": 1000**6, "e": 1 << 60, "eib": 1 << 60,
}  # fmt: skip


def _qualified(name: str) -> str:
    # expat joins namespace and local name with the separator; ElementTree wants {ns}name.
    return "{" + name if "}" in name else name


def safe_fromstring(text: str, *, what: str = "domain XML") -> ET.Element:
    """An ElementTree built straight from expat, refusing any DOCTYPE.

    No DOCTYPE means no entity declarations, so nothing can be expanded (billion laughs)
    or fetched (external entities). Raises InvalidInput naming ``what``.
    """

    def refuse(*_args: Any) -> NoReturn:
        raise InvalidInput(
            f"The {what} has a DOCTYPE, which Corral refuses to parse.",
            hint="libvirt never writes one, so the document did not come from libvirt.",
        )

    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")
    parser.buffer_text = True
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = lambda tag, attrs: builder.start(
        _qualified(tag), {_qualified(k): v for k, v in attrs.items()}
    )
    parser.EndElementHandler = lambda tag: builder.end(_qualified(tag))
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(text, True)
    except expat.ExpatError as exc:
        raise InvalidInput(f"The {what} is not well-formed ({exc}).") from exc
    return builder.close()


def _attr(el: ET.Element | None, name: str) -> str | None:
    return None if el is None else el.get(name)


def _text(el: ET.Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    return el.text.strip()


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _parse_memory(el: ET.Element | None) -> int:
    unit = (_attr(el, "unit") or "KiB").lower()
    return _int(_text(el), 0) * _UNITS.get(unit, 1 << 10)


def _parse_backing(el: ET.Element | None) -> tuple[str, ...]:
    chain: list[str] = []
    while el is not None:
        source = el.find("source")
        path = _attr(source, "file") or _attr(source, "dev")
        if path is None:
            break  # the empty terminator, or a network source that has no path
        chain.append(path)
        el = el.find("backingStore")
    return tuple(chain)


def _parse_disk(el: ET.Element) -> ParsedDisk:
    source = el.find("source")
    return ParsedDisk(
        target=_attr(el.find("target"), "dev"),
        source=_attr(source, "file") or _attr(source, "dev"),
        device=el.get("device", "disk"),
        readonly=el.find("readonly") is not None,
        format=_attr(el.find("driver"), "type"),
        backing=_parse_backing(el.find("backingStore")),
    )


def _parse_interface(el: ET.Element) -> ParsedInterface:
    mac = _attr(el.find("mac"), "address")
    return ParsedInterface(
        mac=mac.lower() if mac is not None else None,
        network=_attr(el.find("source"), "network") if el.get("type") == "network" else None,
        model=_attr(el.find("model"), "type"),
    )


def _parse_kernel_boot(os_el: ET.Element | None) -> KernelBoot | None:
    if os_el is None:
        return None
    kernel = _text(os_el.find("kernel"))
    if not kernel:
        return None
    return KernelBoot(
        kernel=kernel,
        initrd=_text(os_el.find("initrd")) or None,
        cmdline=_text(os_el.find("cmdline")) or "",
    )


def _parse_console_log(devices: ET.Element | None) -> str | None:
    if devices is None:
        return None
    for el in [*devices.findall("serial"), *devices.findall("console")]:
        path = _attr(el.find("log"), "file")
        if path is None and el.get("type") == "file":
            path = _attr(el.find("source"), "path")  # a serial port written to a file
        if path:
            return path
    return None


def parse_domain_xml(xml: str) -> ParsedDomain:
    """What a domain's XML says, for any domain, Corral's or not.

    Raises InvalidInput for text that is not well-formed, has a DOCTYPE, or is not a
    ``<domain>``.
    """
    root = safe_fromstring(xml)
    if root.tag != "domain":
        raise InvalidInput(f"Expected a <domain> document, not <{root.tag}>.")
    devices = root.find("devices")
    disks = devices.findall("disk") if devices is not None else []
    nics = devices.findall("interface") if devices is not None else []
    machine = root.find(f"metadata/{_MACHINE}")
    return ParsedDomain(
        name=_text(root.find("name")) or "",
        uuid=(_text(root.find("uuid")) or "").lower(),
        domain_type=root.get("type", ""),
        memory_bytes=_parse_memory(root.find("memory")),
        cpus=_int(_text(root.find("vcpu")), 1),  # libvirt's default is one vCPU
        disks=tuple(_parse_disk(d) for d in disks),
        interfaces=tuple(_parse_interface(n) for n in nics),
        kernel_boot=_parse_kernel_boot(root.find("os")),
        console_log=_parse_console_log(devices),
        corral_managed=_attr(machine, "managed") == "yes",
        hostname=_text(machine.find(_HOSTNAME)) if machine is not None else None,
        instance_id=_text(machine.find(_INSTANCE_ID)) if machine is not None else None,
    )


# -- moving a domain to another host -------------------------------------------------------


def relocate_domain_xml(xml: str, paths: Mapping[str, str], network: str | None) -> str:
    """``xml`` (a live domain's definition) as it must read on another host.

    Every file the domain names — disk sources and their backing stores, the kernel and
    initrd, the serial log — is renamed through ``paths`` (names not in it stay), and
    interfaces on a libvirt network join ``network``. Nothing else changes: libvirt
    refuses a destination definition whose guest-visible hardware differs.
    """
    root = safe_fromstring(xml)
    if root.tag != "domain":
        raise InvalidInput(f"Expected a <domain> document, not <{root.tag}>.")
    for source in root.iter("source"):
        old = source.get("file")
        if old is not None and old in paths:
            source.set("file", paths[old])
    for tag in ("kernel", "initrd"):
        for el in root.iterfind(f"os/{tag}"):
            if el.text is not None and el.text.strip() in paths:
                el.text = paths[el.text.strip()]
    for log_el in root.iterfind("devices/*/log"):
        old = log_el.get("file")
        if old is not None and old in paths:
            log_el.set("file", paths[old])
    if network is not None:
        for nic in root.iterfind("devices/interface[@type='network']/source"):
            nic.set("network", network)
    return ET.tostring(root, encoding="unicode") + "\n"
