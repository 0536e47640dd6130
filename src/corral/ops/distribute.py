"""Image distribution: a library image is copied once to each host that needs it.

The local host clones straight from the library. A remote host gets a verified copy of
the base (and of its kernel and initrd) in its own pool, through libvirt only; after
that, clones there are linked as on one host. The store records each copy: who is
making it, how far it got (an interrupted copy resumes there) and whether it is
present. Requests for the same image on the same host wait for the one transfer.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorralError, StorageError
from corral.images.transfer import send_file
from corral.model import Image, KernelBoot
from corral.ops.context import Context, HostHandle
from corral.ops.jobs import owner_alive

POLL = 0.2
"""Seconds between looks at a copy another process is making."""

_copying: dict[tuple[str, str], threading.Lock] = {}
_copying_guard = threading.Lock()


@dataclass(frozen=True, slots=True)
class ImageOnHost:
    """Where a host reads an image: its base, and its kernel files for direct boot."""

    base: str
    kernel_boot: KernelBoot | None


def remote_paths(handle: HostHandle, image: Image) -> ImageOnHost:
    """Names in the host's pool. The checksum is in them: a replaced image is a new copy."""
    stem = Path(handle.host.pool_path) / f"base-{image.name}-{image.sha256[:12]}"
    boot = image.kernel_boot
    if boot is not None:
        boot = KernelBoot(
            kernel=f"{stem}.kernel",
            initrd=f"{stem}.initrd" if boot.initrd else None,
            cmdline=boot.cmdline,
        )
    return ImageOnHost(base=f"{stem}.qcow2", kernel_boot=boot)


def image_on(handle: HostHandle, image: Image) -> ImageOnHost:
    """Where ``handle``'s host reads ``image``; does not copy (see ``ensure_image``)."""
    if handle.local:
        return ImageOnHost(base=image.path, kernel_boot=image.kernel_boot)
    return remote_paths(handle, image)


def ensure_image(ctx: Context, handle: HostHandle, image: Image) -> ImageOnHost:
    """Make ``image`` present and verified on the host, copying it if needed."""
    where = image_on(handle, image)
    if handle.local:
        return where
    key = (handle.host.name, image.name)
    with _copying_guard:
        lock = _copying.setdefault(key, threading.Lock())
    with lock:  # threads of this process: one copies, the others wait here
        while True:
            row = ctx.store.host_image(*key)
            if row is not None and row.state == "present":
                # "present" is recorded only after the copy verified (its marker gone), so
                # the base merely has to be there still; a cheap lookup, no pool refresh.
                if handle.storage.exists(Path(where.base)):
                    return where
                ctx.store.drop_host_image(*key)  # someone removed it on the host
                continue
            row = ctx.store.take_host_image(
                *key, where.base, ctx.owner, unless_owner=lambda o: owner_alive(ctx, o)
            )
            if row.state == "present":
                continue
            if row.owner != ctx.owner:
                time.sleep(POLL)  # another process is copying it: wait for that copy
                continue
            _copy(ctx, handle, image, where, row.bytes_done)
            ctx.store.host_image_present(*key)
            return where


def _copy(ctx: Context, handle: HostHandle, image: Image, where: ImageOnHost,
          resume_at: int) -> None:
    boot, remote_boot = image.kernel_boot, where.kernel_boot
    if boot is not None and remote_boot is not None:
        # Small files: sent whole each time, verified like the base.
        _send_whole(handle, Path(boot.kernel), Path(remote_boot.kernel))
        if boot.initrd and remote_boot.initrd:
            _send_whole(handle, Path(boot.initrd), Path(remote_boot.initrd))

    def progress(done: int) -> None:
        ctx.store.host_image_progress(handle.host.name, image.name, done)

    try:
        try:
            send_file(Path(image.path), image.sha256, handle.storage, Path(where.base),
                      offset=resume_at, on_progress=progress)
        except StorageError:
            if resume_at == 0:
                raise
            # Nothing to resume on the host (someone cleaned its pool): start afresh.
            send_file(Path(image.path), image.sha256, handle.storage, Path(where.base),
                      on_progress=progress)
    except CorralError:
        # Verification failed or the host refused: the next try starts from scratch.
        ctx.store.host_image_progress(handle.host.name, image.name, 0)
        raise


def _send_whole(handle: HostHandle, source: Path, dest: Path) -> None:
    digest = hashlib.sha256()
    with source.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    send_file(source, digest.hexdigest(), handle.storage, dest)
