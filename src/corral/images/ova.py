"""OVA packages (a tar of an OVF descriptor, its disks and a manifest): read safely, write.

Reading treats the archive as hostile. Members are streamed (``tarfile`` mode ``r|``),
never extracted: each accepted member is written under a name Corral chooses, inside a
staging folder Corral created, while it is hashed. Refused outright: absolute names,
``..``, names in folders, links (symbolic or hard), devices and FIFOs, a name seen
twice, members neither the descriptor nor the manifest lists, files over the size
cap, a descriptor that is not first, and, when a manifest exists, a file it does not
list or whose digest differs. A refusal removes the staging folder.

Writing follows DSP0243: a USTAR archive with the descriptor first, then the files in
the order its References list them, then the manifest (SHA-256 of each), whose digests
are computed while the files are being written.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO

from corral.errors import CorruptImage, InvalidInput, NoSpace, StorageError, UnsafeImage
from corral.formats.foreign import ForeignMachine
from corral.formats.manifest import ALGORITHMS, ManifestEntry, parse_manifest, write_manifest
from corral.formats.ovf import OvfFile, OvfPackage, parse_ovf
from corral.model.units import format_size

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 30
"""Default cap on the bytes an OVA may unpack to (its files, decompressed)."""
MAX_DESCRIPTOR_BYTES = 16 << 20
"""An OVF descriptor larger than this is not a machine description."""
_CHUNK = 1 << 20
_STAGED_SUFFIXES = frozenset({".vmdk", ".vdi", ".qcow2", ".img", ".raw", ".iso", ".vhd", ".nvram"})
_HINT = "Ask for the package again from its source; Corral will not open it as it is."


@dataclass(frozen=True, slots=True)
class UnpackedOva:
    """An OVA's files, staged and checked. ``folder`` belongs to the caller."""

    folder: Path
    package: OvfPackage
    staged: dict[str, Path]
    """Each file the descriptor references, by its name in the package, to where it lies."""
    manifest_checked: bool
    notes: tuple[str, ...]
    """What a person should know: no manifest, an unchecked signature, skipped files."""

    def machine(self) -> ForeignMachine:
        """The descriptor's machine, its disk paths naming the staged files (relative
        to ``folder``)."""
        machine = self.package.machine
        disks = tuple(
            replace(d, path=self.staged[d.path].name)
            for d in machine.disks
            if d.path in self.staged
        )
        return replace(machine, disks=disks)


class _Digests:
    """The digests of one member, for the algorithms that may be asked of it."""

    def __init__(self, algorithms: Sequence[str]) -> None:
        self.hashes = {alg: hashlib.new(ALGORITHMS[alg]) for alg in algorithms}

    def update(self, data: bytes) -> None:
        for h in self.hashes.values():
            h.update(data)

    def hexdigest(self, algorithm: str) -> str | None:
        h = self.hashes.get(algorithm)
        return None if h is None else h.hexdigest()


def _refuse(message: str) -> UnsafeImage:
    return UnsafeImage(message, hint=_HINT)


def _member_name(member: tarfile.TarInfo, ova: str) -> str:
    """The member's plain name, or UnsafeImage for any name or type Corral refuses."""
    raw = member.name
    path = PurePosixPath(raw)
    if raw.startswith("/") or path.is_absolute():
        raise _refuse(f"The OVA '{ova}' holds a member with an absolute path, '{raw}'.")
    if ".." in path.parts:
        raise _refuse(f"The OVA '{ova}' holds a member whose path climbs out with '..': '{raw}'.")
    if member.issym():
        raise _refuse(f"The OVA '{ova}' holds '{raw}', a symbolic link to '{member.linkname}'.")
    if member.islnk():
        raise _refuse(f"The OVA '{ova}' holds '{raw}', a hard link to '{member.linkname}'.")
    if member.ischr() or member.isblk() or member.isfifo():
        raise _refuse(f"The OVA '{ova}' holds '{raw}', a device or FIFO, not a file.")
    parts = [p for p in path.parts if p != "."]
    if member.isdir():
        if parts:
            raise _refuse(f"The OVA '{ova}' holds a folder, '{raw}'; OVA files sit at its top.")
        return ""  # "./": some tar writers record the archive's own root
    if not member.isfile():
        raise _refuse(f"The OVA '{ova}' holds '{raw}', which is not a regular file.")
    if len(parts) != 1 or any(ord(c) < 32 for c in parts[0]) or "\\" in parts[0]:
        raise _refuse(f"The OVA '{ova}' holds '{raw}' in a folder; OVA files sit at its top.")
    return parts[0]


def _staged_name(number: int, href: str) -> str:
    suffix = PurePosixPath(href.removesuffix(".gz")).suffix.lower()
    return f"file-{number}{suffix if suffix in _STAGED_SUFFIXES else '.bin'}"


def _create_exclusive(path: Path) -> IO[bytes]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def _os_failure(exc: OSError, what: str) -> Exception:
    if exc.errno == errno.ENOSPC:
        return NoSpace(f"The filesystem holding {what} is full; free space and retry.")
    return StorageError(f"Could not write {what}: {exc.strerror}.")


def _copy_member(
    source: IO[bytes],
    size: int,
    digests: _Digests,
    sink: IO[bytes] | None,
    gunzip: bool,
    budget: int,
    what: str,
) -> int:
    """Stream ``size`` bytes from ``source``, hashing them, into ``sink`` (decompressed
    when ``gunzip``); the bytes written, at most ``budget``."""
    inflater = zlib.decompressobj(wbits=31) if gunzip else None
    written = 0

    def emit(data: bytes) -> None:
        nonlocal written
        written += len(data)
        if written > budget:
            raise InvalidInput(
                f"{what} unpacks to more than the {format_size(budget)} Corral allows.",
                hint="Raise the limit if the package is expected to be this large.",
            )
        if sink is not None:
            sink.write(data)

    remaining = size
    try:
        while remaining:
            data = source.read(min(_CHUNK, remaining))
            if not data:
                raise CorruptImage(f"{what} is truncated: the archive ends inside it.")
            remaining -= len(data)
            digests.update(data)
            if inflater is None:
                emit(data)
                continue
            # Bounded: never inflate more than the budget allows in one step.
            emit(inflater.decompress(data, budget - written + 1))
            while inflater.unconsumed_tail:
                emit(inflater.decompress(inflater.unconsumed_tail, budget - written + 1))
        if inflater is not None:
            emit(inflater.flush())
            if not inflater.eof:
                raise CorruptImage(f"{what} is a truncated gzip stream.")
    except zlib.error as exc:
        raise CorruptImage(f"{what} is not a valid gzip stream ({exc}).") from exc
    return written


def read_ova(
    ova: Path,
    parent: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> UnpackedOva:
    """Check and stage the OVA at ``ova`` in a new folder under ``parent``.

    Post: the returned ``folder`` holds only files Corral named, each verified against
    the manifest when there is one; the caller removes the folder when done. On any
    failure nothing is left under ``parent``. Raises UnsafeImage for a refused member
    or digest, InvalidInput for a malformed descriptor or manifest or one over the
    cap, CorruptImage for a truncated archive, NotFound for a missing file.
    """
    try:
        folder = Path(tempfile.mkdtemp(prefix="ova-", dir=parent))
    except FileNotFoundError:
        raise InvalidInput(f"The staging folder '{parent}' does not exist.") from None
    try:
        return _read(ova, folder, max_bytes)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@contextmanager
def unpacked_ova(
    ova: Path, parent: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[UnpackedOva]:
    """``read_ova`` whose staging folder is removed when the block ends."""
    unpacked = read_ova(ova, parent, max_bytes=max_bytes)
    try:
        yield unpacked
    finally:
        shutil.rmtree(unpacked.folder, ignore_errors=True)


def _read(ova: Path, folder: Path, max_bytes: int) -> UnpackedOva:
    label = ova.name
    try:
        # A stream: read once, front to back; no member index is trusted. Closed below.
        tar = tarfile.open(ova, mode="r|")  # noqa: SIM115
    except FileNotFoundError:
        raise InvalidInput(f"No OVA file at '{ova}'.") from None
    except (tarfile.TarError, OSError) as exc:
        raise CorruptImage(f"'{label}' is not a tar archive, so not an OVA ({exc}).") from exc
    package: OvfPackage | None = None
    stem = ""
    manifest: dict[str, ManifestEntry] | None = None
    seen: set[str] = set()
    digests: dict[str, _Digests] = {}
    staged: dict[str, Path] = {}
    notes: list[str] = []
    budget = max_bytes
    with tar:
        try:
            for member in tar:
                name = _member_name(member, label)
                if not name:
                    continue
                if name in seen:
                    raise _refuse(f"The OVA '{label}' holds '{name}' twice.")
                seen.add(name)
                what = f"'{name}' in '{label}'"
                if member.size > budget:
                    raise InvalidInput(
                        f"{what} is {format_size(member.size)}, more than the "
                        f"{format_size(budget)} Corral still allows for this package.",
                        hint="Raise the limit if the package is expected to be this large.",
                    )
                source = tar.extractfile(member)
                assert source is not None  # a regular file, checked above
                if package is None:
                    if not name.lower().endswith(".ovf"):
                        raise _refuse(
                            f"The OVA '{label}' begins with '{name}', not with its OVF "
                            "descriptor as OVF requires."
                        )
                    if member.size > MAX_DESCRIPTOR_BYTES:
                        raise InvalidInput(f"The descriptor {what} is implausibly large.")
                    text = source.read(member.size)
                    d = _Digests(list(ALGORITHMS))
                    d.update(text)
                    digests[name] = d
                    package = parse_ovf(text.decode("utf-8", errors="replace"))
                    stem = name[: -len(".ovf")]
                    continue
                if name == f"{stem}.mf":
                    if member.size > MAX_DESCRIPTOR_BYTES:
                        raise InvalidInput(f"The manifest {what} is implausibly large.")
                    raw = source.read(member.size)
                    manifest = parse_manifest(raw.decode("utf-8", errors="replace"))
                    _check_so_far(manifest, digests, label)
                    continue
                if name == f"{stem}.cert":
                    notes.append(f"The package is signed ({name}); Corral did not check the "
                                 "signature, only the manifest's digests.")
                    _copy_member(source, member.size, _Digests(()), None, False, budget, what)
                    continue
                listed = package.file(name)
                if manifest is not None and name not in manifest:
                    raise _refuse(
                        f"The OVA '{label}' holds '{name}', which its manifest does not list."
                    )
                if listed is None and manifest is None:
                    raise _refuse(
                        f"The OVA '{label}' holds '{name}', which its descriptor does not list."
                    )
                # Before the manifest arrives (it may come last), hash for every algorithm.
                d = _Digests([manifest[name].algorithm] if manifest else list(ALGORITHMS))
                if listed is None:
                    # Listed by the manifest alone: checked, but not needed, so not written.
                    _copy_member(source, member.size, d, None, False, budget, what)
                    notes.append(f"'{name}' is in the manifest but not the descriptor; skipped.")
                else:
                    _check_size(listed, member.size, what)
                    target = folder / _staged_name(len(staged) + 1, name)
                    try:
                        with _create_exclusive(target) as sink:
                            written = _copy_member(
                                source, member.size, d, sink, listed.compression == "gzip",
                                budget, what,
                            )
                    except OSError as exc:
                        raise _os_failure(exc, f"the staging folder {folder}") from exc
                    budget -= written
                    staged[name] = target
                digests[name] = d
                if manifest is not None:
                    _check_so_far(manifest, {name: d}, label)
        except tarfile.TarError as exc:
            raise CorruptImage(f"The OVA '{label}' is a damaged tar archive ({exc}).") from exc
    if package is None:
        raise InvalidInput(f"The OVA '{label}' is empty: it holds no OVF descriptor.")
    if manifest is None:
        notes.append("The package has no manifest: nothing vouches for its files' integrity.")
    else:
        missing = sorted(set(manifest) - set(digests))
        if missing:
            raise _refuse(f"The manifest of '{label}' lists '{missing[0]}', which the OVA lacks.")
        _check_so_far(manifest, digests, label)
    needed = {d.path for d in package.machine.disks}
    absent = sorted(needed - set(staged))
    if absent:
        raise InvalidInput(
            f"The OVA '{label}' lacks '{absent[0]}', a disk its descriptor names.",
            hint="The package is incomplete; ask for it again.",
        )
    return UnpackedOva(folder, package, staged, manifest is not None, tuple(notes))


def _check_size(listed: OvfFile, size: int, what: str) -> None:
    if listed.size is not None and listed.size != size:
        raise _refuse(f"{what} is {size} bytes, but the descriptor says {listed.size}.")


def _check_so_far(
    manifest: dict[str, ManifestEntry], digests: dict[str, _Digests], label: str
) -> None:
    """Every member hashed so far is in the manifest with the digest it has."""
    for name, d in digests.items():
        entry = manifest.get(name)
        if entry is None:
            raise _refuse(f"The OVA '{label}' holds '{name}', which its manifest does not list.")
        actual = d.hexdigest(entry.algorithm)
        if actual is None:
            continue  # hashed for other algorithms before the manifest came; cannot happen
        if actual != entry.digest:
            raise _refuse(
                f"The {entry.algorithm} digest of '{name}' in '{label}' does not match its "
                "manifest: the file was altered or damaged."
            )


# -- writing ------------------------------------------------------------------------------


class _HashingReader:
    """A file read by ``tarfile.addfile``, hashed on the way."""

    def __init__(self, raw: IO[bytes], progress: Callable[[int], None] | None) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        if self.progress is not None:
            self.progress(len(data))
        return data


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    info.type = tarfile.REGTYPE
    return info


def write_ova(
    dest: Path,
    descriptor_name: str,
    descriptor: bytes,
    files: Sequence[tuple[str, Path]],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the OVA ``dest``: the descriptor, ``files`` (package name, local path) in
    the order given, then a SHA-256 manifest of all of them.

    ``progress`` gets the number of file bytes written since its last call.
    Pre: ``dest`` does not exist (else the call fails). On failure ``dest`` does not exist.
    """
    if not descriptor_name.endswith(".ovf"):
        raise InvalidInput(f"An OVF descriptor's name ends in .ovf, not '{descriptor_name}'.")
    entries = [ManifestEntry(descriptor_name, "SHA256", hashlib.sha256(descriptor).hexdigest())]
    try:
        with _create_exclusive(dest) as raw, tarfile.open(
            fileobj=raw, mode="w|", format=tarfile.USTAR_FORMAT
        ) as tar:
            tar.addfile(_tarinfo(descriptor_name, len(descriptor)), _BytesReader(descriptor))
            for name, path in files:
                try:
                    f = path.open("rb")
                except OSError as exc:
                    raise StorageError(f"Could not read '{path}': {exc.strerror}.") from exc
                with f:
                    size = os.fstat(f.fileno()).st_size
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        raise InvalidInput(f"'{path}' is not a regular file.")
                    reader = _HashingReader(f, progress)
                    tar.addfile(_tarinfo(name, size), reader)
                entries.append(ManifestEntry(name, "SHA256", reader.sha256.hexdigest()))
            manifest = write_manifest(entries).encode()
            stem = descriptor_name[: -len(".ovf")]
            tar.addfile(_tarinfo(f"{stem}.mf", len(manifest)), _BytesReader(manifest))
    except FileExistsError:
        raise InvalidInput(f"'{dest}' already exists; Corral does not overwrite it.") from None
    except BaseException as exc:
        dest.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _os_failure(exc, str(dest)) from exc
        raise


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.offset + size
        chunk = bytes(self.data[self.offset : end])
        self.offset += len(chunk)
        return chunk


def members(ova: Path) -> list[tuple[str, int]]:
    """The names and sizes of an OVA's members, in order (for reports and tests)."""
    with tarfile.open(ova, mode="r|") as tar:
        return [(m.name, m.size) for m in tar]

