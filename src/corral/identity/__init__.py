"""What makes a clone a new machine: UUID, MAC, hostname and its NoCloud seed."""

from __future__ import annotations

import uuid

from corral.identity.mac import allocate_macs
from corral.identity.names import batch_names, check_name
from corral.model import Identity


def new_identity(name: str, mac: str) -> Identity:
    machine_uuid = str(uuid.uuid4())
    # instance-id changes with every new machine: cloud-init re-runs its
    # once-per-instance modules exactly when this changes.
    return Identity(uuid=machine_uuid, mac=mac, hostname=name, instance_id=f"i-{machine_uuid}")


__all__ = ["allocate_macs", "batch_names", "check_name", "new_identity"]
