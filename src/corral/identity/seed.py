"""The cloud-init NoCloud seed: an ISO 9660 volume labelled ``cidata``.

Built in Python with pycdlib (no genisoimage), with Joliet and Rock Ridge names so
that both cloud-init and the appliance's busybox see ``meta-data`` and ``user-data``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pycdlib

from corral.model import Identity


@dataclass(frozen=True, slots=True)
class SeedContent:
    meta_data: str
    user_data: str


def seed_content(identity: Identity, ssh_keys: tuple[str, ...]) -> SeedContent:
    # JSON is valid YAML: quoting every value keeps keys and hostnames from being
    # misread (a hostname like "no" or "123" is a string, not a bool or an int).
    meta = (
        f"instance-id: {json.dumps(identity.instance_id)}\n"
        f"local-hostname: {json.dumps(identity.hostname)}\n"
    )
    lines = ["#cloud-config", f"hostname: {json.dumps(identity.hostname)}"]
    if ssh_keys:
        lines.append("ssh_authorized_keys:")
        lines += [f"  - {json.dumps(key.strip())}" for key in ssh_keys]
    return SeedContent(meta_data=meta, user_data="\n".join(lines) + "\n")


def write_seed(path: Path, content: SeedContent) -> None:
    """Write the seed ISO to ``path`` atomically (a crash leaves no half-written seed)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in (("meta-data", content.meta_data), ("user-data", content.user_data)):
        data = text.encode()
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            f"/{name.replace('-', '_').upper()}.;1",
            rr_name=name,
            joliet_path=f"/{name}",
        )
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as out:
        iso.write_fp(out)
        out.flush()
        os.fsync(out.fileno())
    iso.close()
    tmp.replace(path)
