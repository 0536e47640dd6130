"""libvirt domain XML for a machine exported out of Corral: what a bare libvirt accepts.

Pure, and built from the same element functions as ``domain_xml.build_domain_xml``, so an
exported machine has the hardware Corral gave it. What only exists under Corral is
left out: the NoCloud seed disk, Corral's metadata, its libvirt network (the NIC is a
plain user-mode one, which needs no network defined, and keeps its MAC) and its console
log file (the serial console is a pty: ``virsh console`` reaches it). The UUID stays, so
the guest sees the same machine.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from corral.errors import InvalidInput

# The element builders are shared on purpose: the exported machine must not drift from
# the one Corral defines.
from corral.formats.domain_xml import (
    DISK_TARGET,
    _console,
    _disk,
    _features,
    _leaf,
    _memory,
    _os,
    _with,
)
from corral.model import KernelBoot


@dataclass(frozen=True, slots=True)
class ExportedDomain:
    name: str
    uuid: str
    domain_type: str
    """``qemu`` (TCG) or ``kvm``, as the machine ran."""
    cpus: int
    memory_bytes: int
    disk_path: str
    """A standalone qcow2 (no backing file), by absolute path."""
    mac: str | None
    kernel_boot: KernelBoot | None
    """Absolute paths to the exported kernel and initrd, for direct kernel boot."""


def _user_interface(mac: str) -> ET.Element:
    return _with(
        ET.Element("interface", type="user"),
        [_leaf("mac", address=mac), _leaf("model", type="virtio"), _leaf("rom", enabled="no")],
    )


def build_exported_domain_xml(domain: ExportedDomain) -> str:
    """The domain as a standalone definition that ``virsh define`` takes as it is."""
    if domain.domain_type not in ("qemu", "kvm"):
        raise InvalidInput(f"Cannot export a domain of type '{domain.domain_type}'.")
    paths = [domain.disk_path]
    if domain.kernel_boot is not None:
        paths += [domain.kernel_boot.kernel, *filter(None, [domain.kernel_boot.initrd])]
    if any(not p.startswith("/") for p in paths):
        raise InvalidInput("An exported domain names its files by absolute path.")
    devices = [_disk(DISK_TARGET, domain.disk_path, "qcow2")]
    if domain.mac is not None:
        devices.append(_user_interface(domain.mac))
    devices += [
        _with(ET.Element("serial", type="pty"), [_leaf("target", port="0")]),
        _console(),
        _leaf("memballoon", model="none"),
    ]
    root = _with(
        ET.Element("domain", type=domain.domain_type),
        [
            _leaf("name", domain.name),
            _leaf("uuid", domain.uuid),
            _memory(domain.memory_bytes),
            _leaf("vcpu", str(domain.cpus)),
            _os(domain.kernel_boot),
            _features(),
            _leaf("on_poweroff", "destroy"),
            _leaf("on_reboot", "restart"),
            _leaf("on_crash", "destroy"),
            _with(ET.Element("devices"), devices),
        ],
    )
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"
