"""Decide whether an uploaded disk image is safe to import.

Three layers, cheapest and safest first: Corral's own header inspection (before any qemu
process opens the file, so nothing the image names is ever opened), then qemu-img's view
of the same file, which must agree, then qemu-img's consistency check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import UnsafeImage
from corral.formats.image_inspect import inspect_image
from corral.model.states import ImageFormat
from corral.storage import qemu_img
from corral.storage.qemu_img import QemuImgLimits

_HINT = "Convert it to a single self-contained file with 'qemu-img convert' first."


@dataclass(frozen=True)
class VettedImage:
    format: ImageFormat
    virtual_size: int


def vet_image(path: Path, declared: ImageFormat | None, limits: QemuImgLimits) -> VettedImage:
    """Accept ``path`` only if it is a self-contained, consistent image of its declared format.

    Raises UnsafeImage if it refers to other files or is not what ``declared`` says,
    CorruptImage if it is truncated or damaged, NotFound if it does not exist.
    """
    inspection = inspect_image(path, declared)
    fmt = inspection.format
    info = qemu_img.info(path, fmt, limits)
    if info.format != fmt:
        raise UnsafeImage(
            f"qemu-img reads the image '{path.name}' as {info.format}, not {fmt}; "
            "Corral refuses images whose format is ambiguous.",
            hint=_HINT,
        )
    outside = _named_files(info.backing_filename, info.format_specific, path)
    if outside:
        raise UnsafeImage(
            f"qemu-img reports that the image '{path.name}' refers to '{outside[0]}'; "
            "Corral accepts only self-contained images.",
            hint=_HINT,
        )
    if fmt is not ImageFormat.RAW:
        qemu_img.check(path, fmt, limits)
    return VettedImage(format=fmt, virtual_size=info.virtual_size)


def _named_files(backing: str | None, specific: Mapping[str, Any], path: Path) -> list[str]:
    """Files other than ``path`` that qemu-img says the image uses."""
    data = specific.get("data")
    data = data if isinstance(data, dict) else {}
    named = [backing, data.get("data-file")]
    extents = data.get("extents")
    if isinstance(extents, list):  # VMDK: every extent must be the file itself
        named += [e.get("filename") for e in extents if isinstance(e, dict)]
    own = str(path.absolute())
    return [str(name) for name in named if name and name != own]
