"""Capture a stopped machine as a library image: a template, sealed first.

``corral image capture MACHINE --name IMG`` turns a prepared machine into an image that
new machines clone. One job (kind ``capture``, rolled back on failure or after a kill):

1. ``capture.flatten``: the machine's disk chain becomes one raw file, a hidden staging
   file in the image library (on another host, the host first copies the chain into one
   volume, which is fetched and removed). The machine is not changed.
2. ``capture.seal``: the staging file loses what makes the machine itself
   (``corral.images.seal``: machine-id, SSH host keys, cloud-init state, leases ...),
   so that clones do not share an identity; skipped with ``seal=False``. What was
   removed is recorded as an ``image.sealed`` event on the new image.
3. ``capture.vet``: the library's checks for any imported file (``vet_image``): the
   staging file came from a guest.
4. ``image.convert`` and ``image.record``: the import path of ``ops.images`` (read-only
   qcow2 base, checksum), with the kernel, initrd and command line of the image the
   machine boots from when it boots a kernel directly, so clones boot like the source.
5. ``capture.discard``: the staging file is removed.

A failure, or a kill followed by the next command's recovery, leaves no image record,
no library file and no staging file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import Conflict, CorruptImage, NotFound
from corral.identity.names import check_name
from corral.images.safety import vet_image
from corral.images.seal import SealReport, seal_disk
from corral.model import Image, ImageFormat, Job, KernelBoot, Machine, PowerState
from corral.ops import images as _images  # noqa: F401  (registers image.convert, image.record)
from corral.ops.context import Context
from corral.ops.jobs import PlannedStep, Recovery, execute_job, job_kind, nothing, prepare_job, step
from corral.storage import qemu_img

CAPTURE = job_kind("capture", Recovery.ROLL_BACK)
SEALED_EVENT = "image.sealed"

_OFF = frozenset({PowerState.SHUT_OFF, PowerState.CRASHED})
_report: ContextVar[list[SealReport] | None] = ContextVar("capture_seal_report", default=None)


@dataclass(frozen=True, slots=True)
class Capture:
    image: Image
    sealed: bool
    report: SealReport | None
    """What sealing removed (None when not sealed)."""


def _discard(ctx: Context, a: dict[str, Any]) -> None:
    Path(a["staging"]).unlink(missing_ok=True)
    Path(a["fetched"]).unlink(missing_ok=True)
    if a["remote_flat"] is not None:
        ctx.on(a["host"]).storage.delete(Path(a["remote_flat"]))


@step("capture.flatten", undo=_discard)
def _flatten(ctx: Context, a: dict[str, Any]) -> None:
    staging = Path(a["staging"])
    _discard(ctx, a)  # idempotent: a retried run starts from nothing
    source, fmt = Path(a["disk"]), a["disk_format"]
    if a["remote_flat"] is not None:
        storage = ctx.on(a["host"]).storage
        flat = Path(a["remote_flat"])
        storage.full_clone(source, flat, a["virtual_size"])
        storage.fetch(flat, Path(a["fetched"]))
        storage.delete(flat)
        source, fmt = Path(a["fetched"]), "qcow2"
    qemu_img.convert(source, fmt, staging, "raw", ctx.limits, ctx.on_progress)
    Path(a["fetched"]).unlink(missing_ok=True)


@step("capture.seal", undo=nothing)
def _seal(ctx: Context, a: dict[str, Any]) -> None:
    if not a["seal"]:
        return
    report = seal_disk(Path(a["staging"]))
    lines = report.lines()
    what = "; ".join(lines) if lines else "nothing to remove"
    ctx.store.add_event(SEALED_EVENT, a["name"],
                        f"Sealed image {a['name']} from machine {a['machine']}: {what}.",
                        a["project"])
    collected = _report.get()
    if collected is not None:
        collected.append(report)


@step("capture.vet", undo=nothing)
def _vet(ctx: Context, a: dict[str, Any]) -> None:
    vetted = vet_image(Path(a["staging"]), ImageFormat.RAW, ctx.limits)
    if vetted.virtual_size != a["virtual_size"]:
        raise CorruptImage(
            f"The flattened disk of {a['machine']} is {vetted.virtual_size} bytes, not "
            f"{a['virtual_size']}."
        )


@step("capture.discard", undo=nothing)
def _discard_staging(ctx: Context, a: dict[str, Any]) -> None:
    Path(a["staging"]).unlink(missing_ok=True)


def capture_image(
    ctx: Context,
    machine: str,
    name: str,
    *,
    seal: bool = True,
    project: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> Capture:
    """Capture the stopped ``machine`` as the image ``name`` (see the module docstring).

    Pre: the machine is stopped (else Conflict) and no image is named ``name`` (else
    Conflict). Post: the image is in the library. On failure there is no image, no
    library file and no staging file; the machine is never changed.
    """
    job = prepare_capture(ctx, machine, name, seal=seal, project=project)
    reports: list[SealReport] = []
    token = _report.set(reports)
    ctx.on_progress = progress
    try:
        execute_job(ctx, job)
    finally:
        ctx.on_progress = None
        _report.reset(token)
    return Capture(ctx.store.get_image(job.target), seal, reports[0] if reports else None)


def prepare_capture(
    ctx: Context,
    machine_name: str,
    name: str,
    *,
    seal: bool = True,
    project: str | None = None,
) -> Job:
    """Check the request and write the capture job down (not run yet)."""
    name = check_name(name, what="image name")
    machine = ctx.store.get_machine(machine_name)
    if ctx.store.find_image(name) is not None:
        raise Conflict(
            f"An image named '{name}' already exists.",
            hint="Choose another name with --name, or delete the old image first.",
        )
    handle = ctx.on(machine.host)
    state = handle.driver.state(machine.name)
    if state not in _OFF:
        raise Conflict(
            f"Machine '{machine.name}' is {state.value}; Corral captures only stopped "
            "machines, whose disks are consistent.",
            hint=f"Stop it with 'corral vm stop {machine.name}', then capture it.",
        )
    disk = Path(machine.disk_path)
    domain = handle.driver.domain_xml(machine.name)
    parsed = next((d for d in domain.disks if d.source == str(disk)), None)
    disk_format = parsed.format if parsed is not None and parsed.format else "qcow2"
    virtual_size = handle.storage.usage(disk).virtual_size
    token = os.urandom(4).hex()
    staging = ctx.settings.image_dir / f".capture-{name}-{token}.raw"
    stem = ctx.settings.image_dir / f"{name}-{token}"
    paths = [f"{stem}.qcow2"]
    extra: list[str] = []
    kernel_boot = None
    boot = _kernel_boot(ctx, machine)
    if boot is not None:
        paths.append(f"{stem}.vmlinuz")
        extra.append(boot.kernel)
        initrd = None
        if boot.initrd is not None:
            paths.append(f"{stem}.initrd")
            extra.append(boot.initrd)
            initrd = paths[-1]
        kernel_boot = {"kernel": paths[1], "initrd": initrd, "cmdline": boot.cmdline}
    args = {
        "name": name,
        "machine": machine.name,
        "host": machine.host,
        "disk": str(disk),
        "disk_format": disk_format,
        "remote_flat": None if handle.local else str(
            disk.with_name(f"capture-{token}-{disk.name}")),
        "fetched": str(ctx.settings.image_dir / f".capture-{name}-{token}.fetched.qcow2"),
        "staging": str(staging),
        "seal": seal,
        "project": project,
        # What image.convert and image.record (ops.images) read:
        "source": str(staging),
        "format": ImageFormat.RAW.value,
        "virtual_size": virtual_size,
        "paths": paths,
        "extra_sources": extra,
        "kernel_boot": kernel_boot,
    }
    steps = ["capture.flatten", "capture.seal", "capture.vet", "image.convert", "image.record",
             "capture.discard"]
    return prepare_job(ctx, CAPTURE, name, [PlannedStep(s, args) for s in steps],
                       project=project, exclusive=True)


def _kernel_boot(ctx: Context, machine: Machine) -> KernelBoot | None:
    """The library's kernel boot of the image the machine boots from, if it boots a kernel:
    its own image's, else its ``kernel_image``'s."""
    for image_name in (machine.image, machine.kernel_image):
        if image_name is None:
            continue
        image = ctx.store.find_image(image_name)
        if image is None:
            raise NotFound(
                "image", image_name,
                hint=f"Machine '{machine.name}' boots the kernel of that image, which is gone.",
            )
        if image.kernel_boot is not None:
            return image.kernel_boot
    return None
