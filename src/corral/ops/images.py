"""The image library: safe import, delete, and the built-in appliance."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.errors import Conflict, InvalidInput, NotFound
from corral.identity.names import check_name
from corral.images.safety import vet_image
from corral.images.transfer import file_sha256
from corral.model import Image, ImageFormat, Job, KernelBoot
from corral.ops.context import Context
from corral.ops.hosts import APPLIANCE
from corral.ops.jobs import PlannedStep, Recovery, execute_job, job_kind, prepare_job, step
from corral.storage import qemu_img
from corral.store.repository import utcnow

IMPORT = job_kind("import", Recovery.ROLL_BACK)
Progress = Callable[[float], None]


def _delete_files(_ctx: Context, a: dict[str, Any]) -> None:
    for path in a["paths"]:
        Path(path).unlink(missing_ok=True)


@step("image.convert", undo=_delete_files)
def _convert(ctx: Context, a: dict[str, Any]) -> None:
    dest = Path(a["paths"][0])
    dest.unlink(missing_ok=True)
    qemu_img.convert(Path(a["source"]), a["format"], dest, "qcow2", ctx.limits, ctx.on_progress)
    qemu_img.check(dest, "qcow2", ctx.limits)
    # Bases are read-only: a machine writing through to its base would corrupt siblings.
    dest.chmod(0o444)
    for extra, target in zip(a["extra_sources"], a["paths"][1:], strict=True):
        shutil.copyfile(extra, target)
        Path(target).chmod(0o444)


@step("image.record", undo=lambda ctx, a: ctx.store.delete_image(a["name"]))
def _record(ctx: Context, a: dict[str, Any]) -> None:
    path = Path(a["paths"][0])
    boot = KernelBoot(**a["kernel_boot"]) if a["kernel_boot"] else None
    if ctx.store.find_image(a["name"]) is None:
        ctx.store.add_image(
            Image(
                name=a["name"],
                path=str(path),
                source_format=ImageFormat(a["format"]),
                sha256=file_sha256(path),
                virtual_size=a["virtual_size"],
                kernel_boot=boot,
                created_at=utcnow(),
                project=a.get("project"),
            )
        )


def import_image(
    ctx: Context,
    source: Path,
    *,
    name: str | None = None,
    declared: ImageFormat | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    cmdline: str = "",
    progress: Progress | None = None,
    project: str | None = None,
) -> Image:
    """Inspect ``source`` (hostile until proven otherwise), convert it to a read-only
    qcow2 base in the library and record it. A failure leaves no file and no record."""
    job = prepare_import(
        ctx, source, name=name, declared=declared, kernel=kernel, initrd=initrd,
        cmdline=cmdline, project=project,
    )
    ctx.on_progress = progress
    try:
        execute_job(ctx, job)
    finally:
        ctx.on_progress = None
    return ctx.store.get_image(job.target)


def prepare_import(
    ctx: Context,
    source: Path,
    *,
    name: str | None = None,
    declared: ImageFormat | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    cmdline: str = "",
    project: str | None = None,
) -> Job:
    """Vet ``source`` and write its import job down (not run yet)."""
    name = check_name(name or _default_name(source), what="image name")
    if not source.is_file():
        raise NotFound("file", str(source))
    if ctx.store.find_image(name) is not None:
        raise Conflict(
            f"An image named '{name}' already exists.",
            hint="Choose another name with --name, or delete the old image first.",
        )
    if cmdline and kernel is None:
        raise InvalidInput("A kernel command line needs a kernel.")
    vetted = vet_image(source, declared, ctx.limits)
    stem = ctx.settings.image_dir / f"{name}-{os.urandom(4).hex()}"
    paths = [f"{stem}.qcow2"]
    extra: list[str] = []
    kernel_boot = None
    if kernel is not None:
        paths.append(f"{stem}.vmlinuz")
        extra.append(str(kernel))
        boot_initrd = None
        if initrd is not None:
            paths.append(f"{stem}.initrd")
            extra.append(str(initrd))
            boot_initrd = paths[-1]
        kernel_boot = {"kernel": paths[1], "initrd": boot_initrd, "cmdline": cmdline}
    args = {
        "name": name,
        "source": str(source),
        "format": vetted.format.value,
        "virtual_size": vetted.virtual_size,
        "paths": paths,
        "extra_sources": extra,
        "kernel_boot": kernel_boot,
        "project": project,
    }
    return prepare_job(
        ctx,
        IMPORT,
        name,
        [PlannedStep("image.convert", args), PlannedStep("image.record", args)],
        project=project,
    )


def delete_image(ctx: Context, name: str) -> None:
    image = ctx.store.get_image(name)
    users = ctx.store.machines_using_image(name)
    if users:
        raise Conflict(
            f"Image '{name}' is still used by {len(users)} machine(s): {', '.join(users)}.",
            hint="Delete those machines first.",
        )
    ctx.store.delete_image(name)
    for path in (image.path, *_boot_files(image)):
        Path(path).unlink(missing_ok=True)


def build_appliance(ctx: Context, *, log: Callable[[str], None], force: bool = False) -> Image:
    """Build the built-in appliance and import it into the library as ``appliance``."""
    from corral.images.appliance import build_appliance as build

    existing = ctx.store.find_image(APPLIANCE)
    if existing is not None:
        if not force:
            return existing
        delete_image(ctx, APPLIANCE)
    work = ctx.settings.state_dir / "build"
    shutil.rmtree(work, ignore_errors=True)
    try:
        artifacts = build(work / "appliance", ctx.settings.cache_dir, log=log)
        return import_image(
            ctx,
            artifacts.disk,
            name=APPLIANCE,
            declared=ImageFormat.QCOW2,
            kernel=artifacts.kernel,
            initrd=artifacts.initrd,
            cmdline=artifacts.cmdline,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _boot_files(image: Image) -> list[str]:
    if image.kernel_boot is None:
        return []
    return [p for p in (image.kernel_boot.kernel, image.kernel_boot.initrd) if p]


def _default_name(source: Path) -> str:
    stem = source.name.split(".")[0].lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in stem).strip("-") or "image"

