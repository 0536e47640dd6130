"""Machine names become libvirt names, file names and hostnames: each must be a DNS label."""

from __future__ import annotations

import re

from corral.errors import InvalidInput

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(name: str, *, what: str = "machine name") -> str:
    if not _LABEL.match(name):
        raise InvalidInput(
            f"'{name}' is not a valid {what}.",
            hint="Use 1 to 63 lowercase letters, digits and hyphens, "
            "starting and ending with a letter or digit.",
        )
    return name


def batch_names(name: str, count: int) -> list[str]:
    """NAME for one machine; NAME-1 … NAME-N for a batch. Every name is checked."""
    if count < 1:
        raise InvalidInput("--count must be at least 1.")
    if count == 1:
        return [check_name(name)]
    return [check_name(f"{name}-{i}") for i in range(1, count + 1)]
