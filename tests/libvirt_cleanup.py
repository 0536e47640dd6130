"""Removing what a test or benchmark made on a libvirt daemon, by name prefix."""

from __future__ import annotations

import contextlib
from functools import partial

import libvirt


def remove_prefixed(uri: str, prefix: str) -> None:
    """Destroy and undefine every domain, network and pool named ``prefix…``.

    Keeps going past failures, so one stuck object does not strand the others.
    """
    conn = libvirt.open(uri)
    try:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(prefix):
                for action in (dom.destroy, partial(_undefine, dom)):
                    with contextlib.suppress(libvirt.libvirtError):
                        action()
        for obj in [*conn.listAllNetworks(0), *conn.listAllStoragePools(0)]:
            if obj.name().startswith(prefix):
                for action in (obj.destroy, obj.undefine):
                    with contextlib.suppress(libvirt.libvirtError):
                        action()
    finally:
        conn.close()


def remove_with_disks_under(uri: str, root: str) -> None:
    """Destroy and undefine every domain with a disk below ``root``, whatever its name.

    A server under test names machines as its clients ask (fuzzers ask for "0" or
    "3j6"); what they all share is the state directory their disks live in.
    """
    names = domains_with_disks_under(uri, root.rstrip("/") + "/")
    conn = libvirt.open(uri)
    try:
        for name in names:
            with contextlib.suppress(libvirt.libvirtError):
                dom = conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                _undefine(dom)
    finally:
        conn.close()


def domains_with_disks_under(uri: str, root: str) -> list[str]:
    """Names of the domains with a disk whose path starts with ``root``."""
    import xml.etree.ElementTree as ET

    conn = libvirt.open(uri)
    try:
        found = []
        for dom in conn.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):
                tree = ET.fromstring(dom.XMLDesc(0))
                if any((s.get("file") or "").startswith(root)
                       for s in tree.iterfind("devices/disk/source")):
                    found.append(dom.name())
        return found
    finally:
        conn.close()


def _undefine(dom: libvirt.virDomain) -> None:
    """Undefine, snapshots and all: a plain undefine refuses a domain with snapshots."""
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                      | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                      | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
