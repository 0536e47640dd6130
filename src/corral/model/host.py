"""Hosts: libvirt connections that run machines."""

from __future__ import annotations

from dataclasses import dataclass

from corral.model.states import Accelerator


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What a host says about itself when probed."""

    hostname: str
    arch: str
    cpu_model: str
    cpus: int
    memory_bytes: int
    hypervisor: str
    hypervisor_version: str


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    uri: str
    facts: HostFacts
    accelerator: Accelerator
    accelerator_note: str
    """Why this accelerator: what the boot probe saw."""
    pool_name: str
    pool_path: str
