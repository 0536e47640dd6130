"""OVF manifests (``.mf``): one digest per file of a package.

Pure: text in, typed values out, and back. A line reads ``SHA256(disk1.vmdk)= 3f2a…``,
the way VMware's ovftool writes it; VirtualBox puts spaces around the parentheses and the
equals sign (``SHA1 (disk1.vmdk) = 3f2a…``), so both spacings are read. SHA-1, SHA-256
and SHA-512 are the algorithms OVF producers use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from corral.errors import InvalidInput

ALGORITHMS: Mapping[str, str] = MappingProxyType(
    {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
)
"""Manifest names of the digests Corral checks, and their names in ``hashlib``."""

_DIGEST_HEX = {"SHA1": 40, "SHA256": 64, "SHA512": 128}
_LINE = re.compile(r"^(?P<alg>[A-Za-z0-9-]+)\s*\((?P<name>[^()]+)\)\s*=\s*(?P<hex>[0-9A-Fa-f]+)$")


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    name: str
    """The file's name inside the package: a plain name, no folder."""
    algorithm: str
    """``SHA1``, ``SHA256`` or ``SHA512``."""
    digest: str
    """Lower-case hex."""


def parse_manifest(text: str) -> dict[str, ManifestEntry]:
    """The entries of a manifest, by file name.

    Raises InvalidInput for a line that is not a digest, an algorithm Corral cannot
    check, a digest of the wrong length, a name with a folder in it, or a file listed
    twice.
    """
    entries: dict[str, ManifestEntry] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise InvalidInput(
                f"Line {number} of the manifest is not a digest line: '{line[:80]}'."
            )
        algorithm, name, digest = match["alg"].upper(), match["name"].strip(), match["hex"]
        if algorithm not in ALGORITHMS:
            raise InvalidInput(
                f"The manifest uses {algorithm}, which Corral cannot check "
                f"(it checks {', '.join(ALGORITHMS)})."
            )
        if len(digest) != _DIGEST_HEX[algorithm]:
            raise InvalidInput(
                f"The manifest's {algorithm} digest of '{name}' has the wrong length."
            )
        check_plain_name(name, "The manifest")
        if name in entries:
            raise InvalidInput(f"The manifest lists '{name}' twice.")
        entries[name] = ManifestEntry(name, algorithm, digest.lower())
    return entries


def write_manifest(entries: Iterable[ManifestEntry]) -> str:
    """A manifest in ovftool's spelling, one line per entry, in the order given."""
    lines = []
    for entry in entries:
        if entry.algorithm not in ALGORITHMS:
            raise InvalidInput(f"'{entry.algorithm}' is not a manifest digest algorithm.")
        check_plain_name(entry.name, "A manifest entry")
        lines.append(f"{entry.algorithm}({entry.name})= {entry.digest.lower()}\n")
    return "".join(lines)


def check_plain_name(name: str, where: str) -> None:
    """Refuse a file name that is not a plain name inside the package's own folder."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or any(ord(c) < 32 for c in name)
    ):
        raise InvalidInput(
            f"{where} names the file '{name}', which is not a plain file name in the package.",
            hint="Corral reads only files beside the descriptor, never paths it chooses.",
        )
