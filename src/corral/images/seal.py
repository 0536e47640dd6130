"""Seal a disk image the way virt-sysprep does: remove what makes a machine itself.

A template captured from a machine must not hand its identity to every clone. Sealing
empties ``/etc/machine-id`` (systemd's "uninitialized" convention: the next boot makes
a new one) and removes, where they exist: ``/var/lib/dbus/machine-id``, the SSH host
keys (OpenSSH's and dropbear's), cloud-init's per-instance state, DHCP leases, the
persistent-net udev rules and Corral's appliance instance-id. See ``RULES``.

How, without root-only kernel features (no mount, no loop, no nbd) and without booting
anything: the disk must be a **raw file**, a private copy. Its filesystem is found on
the whole disk or inside an MBR (primary or logical) or GPT partition (tables parsed
here), then edited with e2fsprogs' ``debugfs -w`` at that offset (``FILE?offset=N``,
e2fsprogs' io option). Only ext2/3/4 can be edited so; any other filesystem raises
``CannotSeal``.

The disk came from a guest: it is hostile. Nothing here mounts it or follows a path out
of it (debugfs works inside the filesystem image only). Every path is resolved one
component at a time, refusing symbolic links on the way, so a link planted in the guest
cannot redirect a removal elsewhere within it either. Names read from the guest reach a
debugfs command only when they match ``_SAFE_NAME``; others are left alone. The
filesystem's journal is replayed first (``e2fsck -p``), so that a replay at the clone's
first boot cannot bring back what was removed; it is checked again afterwards.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from corral.errors import CorralError

_TIMEOUT = 600.0
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.@+:-]{1,255}")
_MAX_ENTRIES = 10_000
"""At most this many files removed under one tree: a guest cannot make sealing endless."""
_MAX_DEPTH = 32


class CannotSeal(CorralError):
    """The disk cannot be sealed here (no ext2/3/4 root filesystem, or a damaged one)."""

    http_status = 422


class Action(StrEnum):
    EMPTY = "empty"
    """Truncate a regular file to zero bytes, keeping it (and its owner, mode and
    labels); anything else by that name is removed."""
    REMOVE = "remove"
    """Remove a file, a link or a whole directory tree."""


@dataclass(frozen=True, slots=True)
class Rule:
    directory: str
    """Absolute, without a trailing slash."""
    pattern: str
    """A regex matched against whole entry names in ``directory``."""
    action: Action = Action.REMOVE


RULES: tuple[Rule, ...] = (
    Rule("/etc", r"machine-id", Action.EMPTY),
    Rule("/var/lib/dbus", r"machine-id"),
    Rule("/etc/ssh", r"ssh_host_.*"),
    Rule("/etc/dropbear", r"dropbear_.*_host_key"),
    Rule("/var/lib/cloud", r"instance|instances|data|sem"),
    Rule("/var/lib/dhcp", r".*"),
    Rule("/var/lib/dhclient", r".*"),
    Rule("/var/lib/NetworkManager", r".*\.lease"),
    Rule("/etc/udev/rules.d", r"70-persistent-net\.rules"),
    Rule("/var/lib/corral", r"instance-id"),
)
"""What sealing removes. Each directory is looked at in every ext filesystem found."""


@dataclass(frozen=True, slots=True)
class Filesystem:
    offset: int
    """Byte offset of the filesystem in the disk."""
    where: str
    """``the whole disk`` or ``partition N``."""


@dataclass(frozen=True, slots=True)
class SealReport:
    removed: tuple[str, ...]
    emptied: tuple[str, ...]
    filesystems: tuple[Filesystem, ...] = field(default=())

    def lines(self) -> list[str]:
        return [f"emptied {p}" for p in self.emptied] + [f"removed {p}" for p in self.removed]


# --- where the filesystems are ------------------------------------------------------

_EXT_MAGIC_AT = 1024 + 56
_SECTOR = 512
_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_MAX_PARTITIONS = 128


def find_filesystems(disk: Path) -> list[Filesystem]:
    """The ext2/3/4 filesystems of a raw disk: the whole disk's, or its partitions'.

    Raises CannotSeal, naming what was found instead, when there is none.
    """
    size = disk.stat().st_size
    with disk.open("rb") as f:
        if _is_ext(f, 0):
            return [Filesystem(0, "the whole disk")]
        partitions = list(_partitions(f, size))
        found = [Filesystem(start, f"partition {n}") for n, start in partitions
                 if _is_ext(f, start)]
        if found:
            return found
        starts = [start for _, start in partitions] or [0]
        others = sorted({kind for start in starts if (kind := _other_fs(f, start))})
    what = (f"this disk holds {', '.join(others)}" if others
            else "this disk holds no filesystem Corral recognizes")
    raise CannotSeal(
        f"Corral seals only ext2, ext3 and ext4 filesystems, and {what}.",
        hint="Capture with --no-seal and remove the machine's identity yourself.",
    )


def _read(f: BinaryIO, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``offset``; nothing past the end (a guest's table may
    point anywhere)."""
    f.seek(0, os.SEEK_END)
    if offset >= f.tell():
        return b""
    f.seek(offset)
    return f.read(length)


def _is_ext(f: BinaryIO, offset: int) -> bool:
    return _read(f, offset + _EXT_MAGIC_AT, 2) == b"\x53\xef"


_OTHER_MAGICS = (
    (0, b"XFSB", "xfs"),
    (0x10040, b"_BHRfS_M", "btrfs"),
    (0, b"LUKS\xba\xbe", "LUKS (encrypted)"),
    (0x218, b"LVM2 001", "LVM"),
    (4086, b"SWAPSPACE2", "swap"),
    (0x52, b"FAT32   ", "vfat"),
    (0x36, b"FAT16   ", "vfat"),
    (0x36, b"FAT12   ", "vfat"),
    (3, b"NTFS    ", "ntfs"),
    (0x8001, b"CD001", "iso9660"),
)


def _other_fs(f: BinaryIO, offset: int) -> str | None:
    for at, magic, name in _OTHER_MAGICS:
        if _read(f, offset + at, len(magic)) == magic:
            return name
    return None


def _partitions(f: BinaryIO, size: int) -> Iterator[tuple[int, int]]:
    """(number, byte offset) of each partition of a GPT or MBR table, in table order."""
    mbr = _read(f, 0, _SECTOR)
    if len(mbr) < _SECTOR or mbr[510:512] != b"\x55\xaa":
        return
    entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i) for i in range(4)]
    if any(kind == 0xEE for _, kind, _, _ in entries):
        for sector in (512, 4096):
            gpt = list(_gpt(f, size, sector))
            if gpt:
                yield from gpt
                return
        return
    for index, (_, kind, start, count) in enumerate(entries, start=1):
        if kind == 0 or count == 0:
            continue
        if kind in _EXTENDED:
            # Logical partitions are numbered from 5, as Linux does.
            yield from enumerate(_logical(f, size, start), start=5)
        elif start * _SECTOR < size:
            yield index, start * _SECTOR


def _logical(f: BinaryIO, size: int, extended: int) -> Iterator[int]:
    """Offsets of the logical partitions: a chain of EBRs, each link relative to the
    extended partition, each partition relative to its EBR."""
    ebr = extended
    seen: set[int] = set()
    while ebr not in seen and len(seen) < _MAX_PARTITIONS and ebr * _SECTOR < size:
        seen.add(ebr)
        sector = _read(f, ebr * _SECTOR, _SECTOR)
        if len(sector) < _SECTOR or sector[510:512] != b"\x55\xaa":
            return
        _, kind, start, count = struct.unpack_from("<B3xB3xII", sector, 446)
        if kind != 0 and count != 0 and (ebr + start) * _SECTOR < size:
            yield (ebr + start) * _SECTOR
        _, next_kind, next_start, _ = struct.unpack_from("<B3xB3xII", sector, 462)
        if next_kind not in _EXTENDED or next_start == 0:
            return
        ebr = extended + next_start


def _gpt(f: BinaryIO, size: int, sector: int) -> Iterator[tuple[int, int]]:
    header = _read(f, sector, 92)
    if len(header) < 92 or header[:8] != b"EFI PART":
        return
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if not 128 <= entry_size <= 4096 or count > 1024:
        return
    table = _read(f, entries_lba * sector, count * entry_size)
    for index in range(min(count, len(table) // entry_size)):
        entry = table[index * entry_size : (index + 1) * entry_size]
        first, last = struct.unpack_from("<QQ", entry, 32)
        if entry[:16] == bytes(16) or last < first or first * sector >= size:
            continue
        yield index + 1, first * sector


# --- sealing ---------------------------------------------------------------------------


def seal_disk(disk: Path, rules: tuple[Rule, ...] = RULES) -> SealReport:
    """Seal the raw disk image ``disk`` in place and say what was removed.

    Pre: ``disk`` is a raw image nobody else uses (a private copy). Post: no path that
    ``rules`` match is left in any ext filesystem of the disk, and each filesystem is
    consistent (e2fsck). Raises CannotSeal when the disk holds no ext2/3/4 filesystem
    with an ``/etc``, or e2fsck finds damage it cannot repair; the disk may then be
    partly sealed, and should be thrown away. Idempotent.
    """
    if "?" in str(disk):
        raise ValueError(f"debugfs cannot open a path with '?': {disk}")
    filesystems = find_filesystems(disk)
    removed: list[str] = []
    emptied: list[str] = []
    rooted = False
    for fs in filesystems:
        image = _Image(disk, fs)
        image.fsck(["-p"])  # replay the journal before editing under it
        rooted = rooted or image.is_dir("/etc")
        plan = _plan(image, rules)
        image.apply(plan)
        left = _plan(_Image(disk, fs), rules)  # fresh listings: what is really there now
        if left.removals or left.empties:
            raise CannotSeal(
                f"Sealing left {(left.removals + left.empties)[0]} in {fs.where} of the disk."
            )
        image.fsck(["-f", "-p"])
        prefix = "" if len(filesystems) == 1 else f"{fs.where}: "
        removed += [prefix + p for p in plan.removals]
        emptied += [prefix + p for p in plan.empties]
    if not rooted:
        raise CannotSeal(
            "No ext2, ext3 or ext4 filesystem on the disk has an /etc: its root filesystem "
            "is of another kind, which Corral cannot seal.",
            hint="Capture with --no-seal and remove the machine's identity yourself.",
        )
    return SealReport(tuple(removed), tuple(emptied), tuple(filesystems))


@dataclass
class _Plan:
    removals: list[str] = field(default_factory=list)
    """Top-level matches, in the order their removal is reported."""
    commands: list[str] = field(default_factory=list)
    empties: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    mode: int
    size: int

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == 0o040000

    @property
    def is_regular(self) -> bool:
        return self.mode & 0o170000 == 0o100000


def _plan(image: _Image, rules: tuple[Rule, ...]) -> _Plan:
    plan = _Plan()
    for rule in rules:
        entries = image.listing(rule.directory)
        if entries is None:
            continue
        pattern = re.compile(rule.pattern)
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            path = f"{rule.directory}/{entry.name}"
            if rule.action is Action.EMPTY and entry.is_regular:
                if entry.size > 0:
                    plan.empties.append(path)
                    plan.commands += [f'punch "{path}" 0', f'sif "{path}" size 0']
                continue
            # A link or a directory where a file belongs is removed (for machine-id, a
            # missing file means "uninitialized" too).
            plan.removals.append(path)
            _remove_tree(image, path, entry, plan, depth=0)
    return plan


def _remove_tree(image: _Image, path: str, entry: _Entry, plan: _Plan, depth: int) -> None:
    if not entry.is_dir:
        plan.commands.append(f'rm "{path}"')
        return
    if depth > _MAX_DEPTH or len(plan.commands) > _MAX_ENTRIES:
        raise CannotSeal(f"{path} in the machine's disk is too deep or too large to remove.")
    for child in image.listing(path) or []:
        _remove_tree(image, f"{path}/{child.name}", child, plan, depth + 1)
    plan.commands.append(f'rmdir "{path}"')


_LS_LINE = re.compile(r"^/(\d+)/([0-7]+)/\d+/\d+/(.*)/(\d*)/$")


class _Image:
    """One ext filesystem of the disk, through debugfs."""

    def __init__(self, disk: Path, fs: Filesystem) -> None:
        self.disk = disk
        self.fs = fs
        self.spec = f"{disk}?offset={fs.offset}" if fs.offset else str(disk)
        self._listings: dict[str, list[_Entry] | None] = {}

    def listing(self, directory: str) -> list[_Entry] | None:
        """The entries of ``directory``, or None unless every component of it is a real
        directory (no symbolic link is followed)."""
        if directory in self._listings:
            return self._listings[directory]
        result: list[_Entry] | None = None
        if directory == "/":
            result = self._ls("/")
        else:
            parent, _, name = directory.rpartition("/")
            above = self.listing(parent or "/")
            entry = next((e for e in above or [] if e.name == name), None)
            if entry is not None and entry.is_dir:
                result = self._ls(directory)
        self._listings[directory] = result
        return result

    def is_dir(self, directory: str) -> bool:
        return self.listing(directory) is not None

    def _ls(self, directory: str) -> list[_Entry]:
        out = self._debugfs(["-R", f'ls -p "{directory}"'])
        entries = []
        for line in out.splitlines():
            match = _LS_LINE.match(line)
            if match is None:
                continue
            name = match.group(3)
            # ".", "..", and names that could not be spelled safely in a command.
            if name in (".", "..") or not _SAFE_NAME.fullmatch(name):
                continue
            entries.append(_Entry(name, int(match.group(2), 8), int(match.group(4) or 0)))
        return entries

    def apply(self, plan: _Plan) -> None:
        if plan.commands:  # on stdin: no file to leave behind if this process is killed
            script = "".join(f"{command}\n" for command in plan.commands)
            self._debugfs(["-w", "-f", "-"], script)

    def fsck(self, flags: list[str]) -> None:
        # e2fsck: 0 clean, 1 and 2 repaired, 4 damage left, 8 and up could not run.
        done = _run(["e2fsck", *flags, self.spec], what="check the filesystem", ok=range(8))
        if done.returncode >= 4:
            raise CannotSeal(
                f"The ext filesystem in {self.fs.where} of the machine's disk is damaged "
                "beyond what e2fsck repairs unattended.",
                hint="Repair it inside the machine (fsck), or capture with --no-seal.",
            )

    def _debugfs(self, args: list[str], script: str = "") -> str:
        return _run(["debugfs", *args, self.spec], what="edit the filesystem",
                    script=script).stdout


def _run(
    args: list[str], *, what: str, ok: range = range(1), script: str = ""
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            args, input=script, capture_output=True, text=True, errors="replace",
            timeout=_TIMEOUT, check=False, env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise CannotSeal(f"Cannot {what}: {args[0]} is not installed.",
                         hint="Install e2fsprogs.") from exc
    except subprocess.TimeoutExpired as exc:
        raise CannotSeal(f"Cannot {what}: {args[0]} did not finish in {_TIMEOUT:.0f} s.") from exc
    if done.returncode not in ok:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        detail = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise CannotSeal(f"Cannot {what}: {detail}.")
    return done
