"""The one place Corral runs ``qemu-img``.

Every call names the format with ``-f`` (qemu never guesses a format from the bytes of a
possibly hostile file), passes absolute paths (so no name is read as a protocol such as
``json:`` or an option), runs without a shell, and runs under CPU-time and address-space
limits so a crafted image cannot make qemu-img spin or swallow memory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import Conflict, CorruptImage, InvalidInput, NoSpace, NotFound, StorageError
from corral.model.states import ImageFormat

_QEMU_IMG = "qemu-img"
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_ENOSPC = "No space left on device"
_CHECK_UNSUPPORTED = 63  # qemu-img check's exit status for formats without checks


@dataclass(frozen=True)
class QemuImgLimits:
    """Resource limits for each qemu-img process (from Settings.qemu_img_*)."""

    cpu_seconds: int
    address_space: int
    """Bytes of virtual memory."""

    def prefix(self) -> list[str]:
        """util-linux's prlimit, which sets the limits and then execs the command.

        Not a ``preexec_fn``: Corral starts qemu-img from worker threads, where running
        Python between fork and exec can deadlock.

        The stack limit is also glibc's default thread stack size. At the usual 8 MiB,
        the up to 64 I/O threads of a ``convert`` reserve 512 MiB of address space
        between them and can trip the address-space limit (seen as SIGABRT).
        """
        return [
            "prlimit",
            f"--cpu={self.cpu_seconds}:{self.cpu_seconds}",
            f"--as={self.address_space}:{self.address_space}",
            f"--stack={_THREAD_STACK}:{_THREAD_STACK}",
            "--",
        ]


_THREAD_STACK = 1 << 20


@dataclass(frozen=True)
class QemuImgInfo:
    """The parts of ``qemu-img info --output=json`` Corral uses."""

    virtual_size: int
    actual_size: int | None
    format: str
    backing_filename: str | None
    format_specific: Mapping[str, Any]
    """qemu's "format-specific" object: {"type": ..., "data": {...}}; empty if absent."""
    snapshots: tuple[InternalSnapshot, ...] = ()
    """A qcow2's internal snapshots, in the order of its snapshot table."""


@dataclass(frozen=True)
class InternalSnapshot:
    """One entry of a qcow2's snapshot table, as ``qemu-img info`` lists it.

    ``id`` and the date together tell a snapshot from a later one of the same name: qemu
    may hand a deleted snapshot's id to the next, but not its creation time.
    """

    id: str
    name: str
    date_sec: int
    date_nsec: int


def info(path: Path, fmt: ImageFormat | str, limits: QemuImgLimits) -> QemuImgInfo:
    """Describe the image at ``path`` read as ``fmt``, without opening its backing chain.

    Raises NotFound if it does not exist and CorruptImage if qemu-img cannot read it.
    """
    fmt = _format(fmt)
    proc = _run(["info", "-f", fmt, "--output=json", "-U", _arg(path)], limits)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            raise NotFound("image file", str(path))
        raise CorruptImage(_failure(proc, f"read the {fmt} image '{path}'", limits))
    try:
        data = json.loads(proc.stdout)
        return QemuImgInfo(
            virtual_size=int(data["virtual-size"]),
            actual_size=int(data["actual-size"]) if "actual-size" in data else None,
            format=str(data["format"]),
            backing_filename=data.get("backing-filename"),
            format_specific=data.get("format-specific", {}),
            snapshots=tuple(
                InternalSnapshot(str(x["id"]), str(x["name"]), int(x["date-sec"]),
                                 int(x["date-nsec"]))
                for x in data.get("snapshots", [])
            ),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"qemu-img info printed unexpected output for '{path}'.") from exc


def check(path: Path, fmt: ImageFormat | str, limits: QemuImgLimits) -> None:
    """Check the image's metadata; return if it is consistent or ``fmt`` has no checks.

    Raises CorruptImage for corruption or leaked clusters (both mean the image was not
    closed cleanly or was tampered with) and when the check itself cannot complete.
    """
    fmt = _format(fmt)
    proc = _run(["check", "-f", fmt, "--output=json", "-U", _arg(path)], limits)
    if proc.returncode in (0, _CHECK_UNSUPPORTED):
        return
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    problems = [
        f"{report[key]} {label}"
        for key, label in (
            ("corruptions", "corruptions"),
            ("leaks", "leaked clusters"),
            ("check-errors", "check errors"),
        )
        if isinstance(report, dict) and report.get(key)
    ]
    if proc.returncode > 0 and problems:
        raise CorruptImage(
            f"The {fmt} image '{path.name}' is damaged: qemu-img check found "
            f"{' and '.join(problems)}.",
            hint="Repair or re-export it, then import it again.",
        )
    raise CorruptImage(_failure(proc, f"check the {fmt} image '{path}'", limits))


def convert(
    src: Path,
    src_fmt: ImageFormat | str,
    dst: Path,
    dst_fmt: ImageFormat | str,
    limits: QemuImgLimits,
    progress: Callable[[float], None] | None = None,
    *,
    options: Mapping[str, str] | None = None,
) -> None:
    """Copy ``src`` into a new image ``dst``; ``progress`` gets the percentage done (0-100).

    ``options`` are the output format's creation options (``-o``), e.g. a VMDK's
    ``subformat``. Pre: ``dst`` does not exist (else Conflict). On any failure ``dst``
    does not exist; a full filesystem raises NoSpace, other failures StorageError.
    """
    src_fmt, dst_fmt = _format(src_fmt), _format(dst_fmt)
    args = ["convert", "-p", "-f", src_fmt, "-O", dst_fmt, *_creation_options(options),
            _arg(src), _arg(dst)]
    _convert(args, f"convert '{src}' to {dst_fmt}", dst, limits, progress)


def convert_snapshot(
    src: Path,
    snapshot: str,
    dst: Path,
    limits: QemuImgLimits,
    progress: Callable[[float], None] | None = None,
    *,
    backing: Path | None = None,
    options: Mapping[str, str] | None = None,
) -> None:
    """Write the disk of the qcow2 ``src`` as it was at its internal ``snapshot`` into a
    new qcow2 ``dst``, without touching ``src`` or its current data.

    With ``backing``, ``dst`` is an overlay of that qcow2 (``-B``), and only the clusters
    the snapshot holds itself are copied: ``backing`` must be ``src``'s own base, else
    ``dst`` would read other bytes where it does not hold them. Without it, ``dst``
    stands alone (the whole chain flattened). ``src`` is opened with force-share
    (``-U``), so it may be in use by a running guest: see ``ops.snapshot_clone`` for why
    that read is sound. ``options`` as for :func:`convert`. Pre: ``dst`` does not exist
    (else Conflict). On any failure ``dst`` does not exist; an unknown snapshot raises
    NotFound, a full filesystem NoSpace, other failures StorageError.
    """
    fmt = ImageFormat.QCOW2
    # The snapshot is named, never an id: "-l 1" would pick snapshot id 1, not "1".
    args = ["convert", "-p", "-U", "-f", fmt, "-l",
            f"snapshot.name={snapshot.replace(',', ',,')}", "-O", fmt]
    if backing is not None:
        args += ["-B", _arg(backing), "-F", fmt]
    args += [*_creation_options(options), _arg(src), _arg(dst)]
    try:
        _convert(args, f"copy snapshot '{snapshot}' of '{src}'", dst, limits, progress)
    except StorageError as exc:
        if "Failed to load snapshot" in str(exc) or "Can't find snapshot" in str(exc):
            raise NotFound("snapshot", snapshot, called="named",
                           hint=f"'qemu-img snapshot -l {src}' lists the disk's own.") from exc
        raise


def _creation_options(options: Mapping[str, str] | None) -> list[str]:
    if not options:
        return []
    # qemu's option syntax doubles a comma to escape it: no value can add an option.
    return ["-o", ",".join(f"{k}={v.replace(',', ',,')}" for k, v in options.items())]


def _convert(
    args: list[str],
    action: str,
    dst: Path,
    limits: QemuImgLimits,
    progress: Callable[[float], None] | None,
) -> None:
    """Run a ``qemu-img convert`` writing the new file ``dst``; ``dst`` is gone on failure."""
    try:
        # Claim the name first, so cleaning up after a failure never removes another's file.
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    except FileExistsError:
        raise Conflict(f"Cannot convert into '{dst}': the file already exists.") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NoSpace(f"The filesystem holding '{dst}' is full; free space and retry.") from exc
        raise StorageError(f"Cannot create '{dst}': {exc.strerror}.") from exc
    try:
        _run_converting(args, action, f"The filesystem holding '{dst}'", limits, progress)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def _run_converting(
    args: list[str],
    action: str,
    holder: str,
    limits: QemuImgLimits,
    progress: Callable[[float], None] | None,
) -> None:
    """Run a ``qemu-img convert -p``, following its progress; a full target raises
    NoSpace naming ``holder`` (what holds the target), any other failure StorageError."""
    with tempfile.TemporaryFile() as stderr:
        proc = _popen(args, limits, stderr)
        assert proc.stdout is not None
        with proc:
            try:
                _follow_progress(proc.stdout.fileno(), progress)
            finally:
                if proc.poll() is None:  # the callback raised: do not leave qemu-img behind
                    proc.kill()
                proc.wait()
        stderr.seek(0)
        message = stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        if _ENOSPC in message:
            raise NoSpace(f"{holder} is full; free space and retry.")
        failed = subprocess.CompletedProcess(args, proc.returncode, "", message)
        raise StorageError(_failure(failed, action, limits))


def convert_onto(
    src: Path,
    src_fmt: ImageFormat | str,
    device: Path,
    limits: QemuImgLimits,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Write ``src`` as a raw disk onto the existing, zero-reading ``device`` (a new thin
    volume), leaving its zeros unwritten (``-n --target-is-zero``).

    The device must be at least ``src``'s virtual size. Failures raise NoSpace (the thin
    pool is full) or StorageError; the caller removes the device.
    """
    src_fmt = _format(src_fmt)
    args = ["convert", "-p", "-n", "--target-is-zero", "-f", src_fmt, "-O", "raw",
            _arg(src), _arg(device)]
    _run_converting(args, f"write '{src}' onto '{device}'", f"The pool holding '{device}'",
                    limits, progress)


def resize(path: Path, fmt: ImageFormat | str, size: int, limits: QemuImgLimits) -> None:
    """Grow the image at ``path`` to ``size`` bytes; a full filesystem raises NoSpace."""
    fmt = _format(fmt)
    proc = _run(["resize", "-f", fmt, _arg(path), str(size)], limits)
    if proc.returncode != 0:
        if _ENOSPC in proc.stderr:
            raise NoSpace(f"The filesystem holding '{path}' is full; free space and retry.")
        raise StorageError(_failure(proc, f"resize '{path}' to {size} bytes", limits))


def set_backing(path: Path, backing: Path, limits: QemuImgLimits) -> None:
    """Point the qcow2 overlay at ``path`` to ``backing`` by rewriting its header only.

    For a base that moved (same bytes, another name): no data is read or compared.
    """
    proc = _run(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", _arg(backing), _arg(path)],
                limits)
    if proc.returncode != 0:
        raise StorageError(_failure(proc, f"point '{path}' at base '{backing}'", limits))


def snapshot_names(path: Path, limits: QemuImgLimits) -> list[str]:
    """The names of the qcow2 image's internal snapshots, oldest first: the order of its
    snapshot table, which qemu appends to (ids are no order: a deleted one's is reused).

    Raises NotFound if it does not exist and CorruptImage if qemu-img cannot read it.
    """
    return [snap.name for snap in info(path, "qcow2", limits).snapshots]


def snapshot(verb: str, path: Path, name: str, limits: QemuImgLimits) -> None:
    """``qemu-img snapshot`` with ``verb`` one of ``create``, ``apply``, ``delete``, on the
    qcow2 image at ``path``. The caller checks ``name`` (qemu-img takes it as it is).

    An image another process holds (a running machine) raises Conflict; a full
    filesystem NoSpace; anything else StorageError.
    """
    flag = {"create": "-c", "apply": "-a", "delete": "-d"}[verb]
    # `qemu-img snapshot` has no -f: the format is named in image options instead, where
    # a doubled comma escapes one, so no path can add an option.
    image = f"driver=qcow2,file.driver=file,file.filename={_arg(path).replace(',', ',,')}"
    proc = _run(["snapshot", "--image-opts", flag, name, image], limits)
    if proc.returncode == 0:
        return
    if "lock" in proc.stderr:
        raise Conflict(f"Cannot {verb} snapshot '{name}' of '{path.name}': another process "
                       "is using the volume.")
    if _ENOSPC in proc.stderr:
        raise NoSpace(f"The filesystem holding '{path}' is full; free space and retry.")
    raise StorageError(_failure(proc, f"{verb} snapshot '{name}' of '{path}'", limits))


def _format(fmt: ImageFormat | str) -> ImageFormat:
    try:
        return ImageFormat(fmt)
    except ValueError:
        raise InvalidInput(f"'{fmt}' is not a disk image format Corral knows.") from None


def _arg(path: Path) -> str:
    # Absolute: "json:{...}" or "nbd:..." would otherwise be a protocol, "-x" an option.
    return str(Path(path).absolute())


def _popen(args: list[str], limits: QemuImgLimits, stderr: Any) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            [*limits.prefix(), _QEMU_IMG, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            # English messages: ENOSPC is found by its text. Two malloc arenas: glibc
            # reserves 64 MiB of address space per arena, up to 8 per core, and a
            # convert's I/O threads made 16 of them, aborting 5 of 12 conversions of a
            # 2 GiB VMDK under the address-space limit (none with two).
            env={**os.environ, "LC_ALL": "C", "MALLOC_ARENA_MAX": "2"},
        )
    except FileNotFoundError as exc:
        raise StorageError(
            "prlimit or qemu-img is missing; install the util-linux and qemu-utils packages."
        ) from exc
    except OSError as exc:
        raise StorageError(f"Could not start qemu-img: {exc.strerror}.") from exc


def _run(args: list[str], limits: QemuImgLimits) -> subprocess.CompletedProcess[str]:
    with _popen(args, limits, subprocess.PIPE) as proc:
        out, err = proc.communicate()
    return subprocess.CompletedProcess(
        args, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


def _follow_progress(fd: int, progress: Callable[[float], None] | None) -> None:
    """Read qemu-img's "    (NN.NN/100%)\\r" updates as they come, until it closes stdout."""
    pending = b""
    while chunk := os.read(fd, 4096):
        pending += chunk
        *done, pending = re.split(rb"[\r\n]", pending)
        for line in done:
            match = _PROGRESS.search(line)
            if match and progress is not None:
                progress(float(match.group(1)))


def _failure(proc: subprocess.CompletedProcess[str], action: str, limits: QemuImgLimits) -> str:
    """One sentence: what qemu-img could not do and why (its last stderr line)."""
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return (
            f"qemu-img could not {action}: it was killed by {name}, likely for exceeding its "
            f"limits of {limits.cpu_seconds} s CPU time and {limits.address_space >> 20} MiB "
            "of memory."
        )
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    reason = (
        lines[-1].removeprefix("qemu-img: ").rstrip(".")
        if lines
        else (f"exit status {proc.returncode}")
    )
    return f"qemu-img could not {action}: {reason}."
