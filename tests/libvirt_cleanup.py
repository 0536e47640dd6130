"""Removing what a test or benchmark made on a libvirt daemon, by name prefix."""

from __future__ import annotations

import contextlib

import libvirt


def remove_prefixed(uri: str, prefix: str) -> None:
    """Destroy and undefine every domain, network and pool named ``prefix…``.

    Keeps going past failures, so one stuck object does not strand the others.
    """
    conn = libvirt.open(uri)
    try:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(prefix):
                for action in (dom.destroy, dom.undefine):
                    with contextlib.suppress(libvirt.libvirtError):
                        action()
        for obj in [*conn.listAllNetworks(0), *conn.listAllStoragePools(0)]:
            if obj.name().startswith(prefix):
                for action in (obj.destroy, obj.undefine):
                    with contextlib.suppress(libvirt.libvirtError):
                        action()
    finally:
        conn.close()
