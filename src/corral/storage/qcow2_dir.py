"""qcow2 volumes in a directory: a linked clone is an overlay naming its base explicitly."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import ClassVar

from corral.errors import NoSpace, StorageError
from corral.formats.qcow2 import Qcow2Header, read_qcow2_header, write_overlay
from corral.model import DiskUsage
from corral.storage import qemu_img
from corral.storage.base import FULL_CLONE, LINKED_CLONE, Progress, StorageBackend

_HEADER_BYTES = 64 << 10


class Qcow2DirBackend(StorageBackend):
    capabilities: ClassVar[frozenset[str]] = frozenset({LINKED_CLONE, FULL_CLONE})

    def __init__(self, directory: Path, limits: qemu_img.QemuImgLimits) -> None:
        self.directory = directory
        self.limits = limits

    def volume_path(self, name: str) -> Path:
        return self.directory / f"{name}.qcow2"

    def linked_clone(self, base: Path, dest: Path, virtual_size: int) -> None:
        # Written in-process rather than by `qemu-img create`: an empty overlay is three
        # small tables, and skipping a process start makes the clone ~0.1 ms, not ~7 ms.
        try:
            write_overlay(
                dest, backing_file=str(base), backing_format="qcow2", virtual_size=virtual_size
            )
        except OSError as exc:
            dest.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise NoSpace(
                    f"The pool at {self.directory} is full; free space and retry."
                ) from exc
            raise StorageError(
                f"Could not create the linked clone {dest}: {exc.strerror}."
            ) from exc

    def full_clone(
        self, base: Path, dest: Path, virtual_size: int, progress: Progress | None = None
    ) -> None:
        qemu_img.convert(base, "qcow2", dest, "qcow2", self.limits, progress)
        try:
            if virtual_size > qemu_img.info(dest, "qcow2", self.limits).virtual_size:
                qemu_img.resize(dest, "qcow2", virtual_size, self.limits)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def copy(self, source: Path, dest: Path) -> None:
        # reflink where the filesystem can (constant time), else a sparse copy.
        result = subprocess.run(
            ["cp", "--sparse=always", "--reflink=auto", "--", str(source), str(dest)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            dest.unlink(missing_ok=True)
            if "No space left" in result.stderr:
                raise NoSpace(f"The pool at {self.directory} is full; free space and retry.")
            raise StorageError(f"Could not copy {source.name}: {result.stderr.strip()}.")

    def delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def usage(self, path: Path) -> DiskUsage:
        try:
            header = _header(path)
            owned = _allocated(path)
            shared = 0
            backing = header.backing_file
            seen = {path.resolve()}
            while backing is not None:
                base = path.parent / backing  # an absolute backing path replaces the parent
                if base.resolve() in seen:  # a loop in a chain is corruption, not a base
                    raise StorageError(f"The backing chain of {path} loops at {base}.")
                seen.add(base.resolve())
                shared += _allocated(base)
                backing = _header(base).backing_file
        except FileNotFoundError as exc:
            raise StorageError(f"Volume {exc.filename} is missing.") from exc
        return DiskUsage(virtual_size=header.size, owned_bytes=owned, shared_bytes=shared)


def _header(path: Path) -> Qcow2Header:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return read_qcow2_header(os.pread(fd, _HEADER_BYTES, 0))
    finally:
        os.close(fd)


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512
