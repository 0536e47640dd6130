"""The built-in appliance: a Debian cloud kernel, a busybox userland, a NoCloud init.

Everything comes from Debian's packages, downloaded once with apt into a cache
directory: ``linux-image-<ver>-cloud-amd64`` (what the ``linux-image-cloud-amd64``
metapackage points at) and ``busybox-static``. The build needs no root tricks and no
mounts: the initramfs is a cpio archive written here, the root filesystem an ext4
image made by ``mkfs.ext4 -d`` from a directory tree, then converted to qcow2.

Boot path (direct kernel boot, ``console=ttyS0``):

1. the initramfs's ``/init`` (``appliance_files/initramfs-init``) loads the virtio
   drivers for the root disk, mounts ``/dev/vda`` and ``switch_root``\\ s to it; with
   ``corral.probe`` on the command line it prints ``CORRAL-PROBE-OK`` and powers off;
2. the disk's ``/sbin/init`` (``appliance_files/init``) applies the NoCloud seed
   (``/dev/vdb``, label ``cidata``), prints ``CORRAL-READY hostname=... instance-id=...
   mac=...`` and becomes busybox init with a root shell on ttyS0.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from corral.errors import CorralError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

CMDLINE = " ".join(
    (
        "console=ttyS0",
        "root=/dev/vda",
        "rw",
        "quiet",
        "loglevel=3",
        "printk.time=0",  # console lines start with our markers, not a timestamp
        "panic=-1",
    )
)

# Loaded by the initramfs (the root disk) and by the disk's init (the rest); each list
# is expanded with its dependencies, in load order, at build time.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk")
DISK_MODULES = ("virtio_net", "isofs", "button", "evdev")

DISK_SIZE = 64 << 20
"""Virtual size of the root disk; the files take about 3 MiB of it."""

# Bump when the layout of the artifacts changes, so that cached builds are redone.
_FORMAT = 1
_MANIFEST = "appliance.json"
_APT_TIMEOUT = 600.0
_TOOL_TIMEOUT = 120.0


class ApplianceBuildError(CorralError):
    """The appliance could not be built (apt, a missing tool, a broken package)."""


@dataclass(frozen=True, slots=True)
class ApplianceArtifacts:
    disk: Path
    """qcow2, the root filesystem (ext4, no partition table): clone it per machine."""
    kernel: Path
    initrd: Path
    cmdline: str
    kernel_version: str
    """``uname -r`` of the kernel, e.g. ``6.1.0-56-cloud-amd64``."""


@dataclass(frozen=True, slots=True)
class _Package:
    name: str
    version: str
    architecture: str
    size: int | None
    """From apt's metadata; None when only the cache is known."""

    @property
    def deb_name(self) -> str:
        # The name `apt-get download` gives the file (an epoch's colon is %3a).
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


def build_appliance(
    out_dir: Path,
    cache_dir: Path,
    *,
    log: Callable[[str], None] = lambda s: None,
) -> ApplianceArtifacts:
    """Build the appliance into ``out_dir`` (created or replaced) and return its files.

    Idempotent: when ``out_dir`` already holds a build of the same packages and
    init scripts, it is returned untouched. The ``.deb`` files are downloaded into
    ``cache_dir`` once (with apt) and reused; with a warm cache a build takes a few
    seconds. The build happens in a temporary directory next to ``out_dir`` that is
    renamed into place at the end, so an interrupted build leaves either the old
    appliance or none, never half of one. A rebuild deletes the previous files:
    callers that clone machines from the disk should copy it somewhere of their own.

    Raises ApplianceBuildError (a CorralError) when apt cannot provide the packages
    or a build tool is missing or fails.
    """
    out_dir = out_dir.absolute()
    cache_dir = cache_dir.absolute()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ApplianceBuildError(f"Cannot create the appliance directories: {exc}.") from exc
    with _locked(cache_dir / ".lock"):
        kernel_deb, busybox_deb = _fetch_packages(cache_dir, log)
    key = _build_key(kernel_deb, busybox_deb)
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        existing = _read_manifest(out_dir, key)
        if existing is not None:
            log(f"The appliance in {out_dir} is up to date.")
            return existing
        _remove_leftovers(out_dir)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            artifacts = _build(tmp, cache_dir, kernel_deb, busybox_deb, key, log)
            _replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"Built the appliance in {out_dir} (kernel {artifacts.kernel_version}).")
    return _relocate(artifacts, tmp, out_dir)


# --- packages -------------------------------------------------------------------


def _fetch_packages(cache_dir: Path, log: Callable[[str], None]) -> tuple[Path, Path]:
    """The kernel's and busybox's .deb files in the cache, downloaded if missing."""
    try:
        kernel_pkg = _resolve_kernel_package()
        busybox_pkg = _apt_show(BUSYBOX_PACKAGE)
    except ApplianceBuildError as exc:
        # No apt metadata (or no apt): a warm cache still builds, offline.
        kernel = _newest_cached(cache_dir, "linux-image-*-cloud-amd64_*.deb")
        busybox = _newest_cached(cache_dir, f"{BUSYBOX_PACKAGE}_*.deb")
        if kernel is None or busybox is None:
            raise
        log(f"{exc} Using the packages cached in {cache_dir}.")
        return kernel, busybox
    return _download(cache_dir, kernel_pkg, log), _download(cache_dir, busybox_pkg, log)


def _resolve_kernel_package() -> _Package:
    meta = _apt_fields(KERNEL_METAPACKAGE)
    match = re.search(r"\b(linux-image-[0-9][^\s,()]*-cloud-amd64)\b", meta.get("Depends", ""))
    if match is None:
        raise ApplianceBuildError(
            f"apt's {KERNEL_METAPACKAGE} does not name a versioned kernel package."
        )
    return _apt_show(match.group(1))


def _apt_show(name: str) -> _Package:
    fields = _apt_fields(name)
    try:
        return _Package(
            name=fields["Package"],
            version=fields["Version"],
            architecture=fields["Architecture"],
            size=int(fields["Size"]) if "Size" in fields else None,
        )
    except KeyError as exc:
        raise ApplianceBuildError(f"apt's record of {name} lacks its {exc.args[0]}.") from exc


def _apt_fields(name: str) -> dict[str, str]:
    """The candidate version's control fields, from apt's local metadata (no network)."""
    out = _run(
        ["apt-cache", "show", "--no-all-versions", name],
        what=f"look up {name} with apt-cache",
        hint="Run 'apt-get update' (as root) so that apt knows Debian's packages.",
    )
    fields: dict[str, str] = {}
    for line in out.splitlines():
        if not line.strip():
            break  # only the first record
        if line[0].isspace() or ":" not in line:
            continue
        field, _, value = line.partition(":")
        fields[field] = value.strip()
    if "Package" not in fields:
        raise ApplianceBuildError(
            f"apt knows no package {name}.",
            hint="Run 'apt-get update' (as root) so that apt knows Debian's packages.",
        )
    return fields


def _download(cache_dir: Path, pkg: _Package, log: Callable[[str], None]) -> Path:
    target = cache_dir / pkg.deb_name
    if target.is_file() and (pkg.size is None or target.stat().st_size == pkg.size):
        return target
    log(f"Downloading {pkg.name} {pkg.version} from Debian's archive ...")
    # apt-get download writes into its working directory: a private one, so that an
    # interrupted download never leaves a partial .deb under the final name.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        _run(
            [
                "apt-get",
                "download",
                "-q",
                "-o",
                "APT::Sandbox::User=root",  # the cache dir need not be readable by _apt
                f"{pkg.name}={pkg.version}",
            ],
            what=f"download {pkg.name} {pkg.version} with apt-get",
            cwd=Path(tmp),
            timeout=_APT_TIMEOUT,
            hint="Check that this machine reaches Debian's package archive.",
        )
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise ApplianceBuildError(f"apt-get download of {pkg.name} produced no .deb file.")
        debs[0].replace(target)
    for stale in cache_dir.glob(f"{pkg.name}_*.deb"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def _newest_cached(cache_dir: Path, pattern: str) -> Path | None:
    found = sorted(cache_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# --- the build ------------------------------------------------------------------


def _build_key(kernel_deb: Path, busybox_deb: Path) -> str:
    """Changes whenever anything the artifacts are made from changes."""
    digest = hashlib.sha256()
    for part in (str(_FORMAT), CMDLINE, kernel_deb.name, busybox_deb.name):
        digest.update(part.encode() + b"\0")
    for module in (*INITRAMFS_MODULES, "|", *DISK_MODULES):
        digest.update(module.encode() + b"\0")
    for name, data in sorted(_appliance_files().items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def _appliance_files() -> dict[str, bytes]:
    root = resources.files("corral.images").joinpath("appliance_files")
    return {entry.name: entry.read_bytes() for entry in root.iterdir() if entry.is_file()}


def _build(
    tmp: Path,
    cache_dir: Path,
    kernel_deb: Path,
    busybox_deb: Path,
    key: str,
    log: Callable[[str], None],
) -> ApplianceArtifacts:
    files = _appliance_files()
    kernel_tree = _extracted_kernel(cache_dir, kernel_deb, log)
    release = _kernel_release(kernel_tree)
    modules = _ModuleIndex(kernel_tree / "lib/modules" / release)
    initramfs_modules = modules.closure(INITRAMFS_MODULES)
    disk_modules = modules.closure(DISK_MODULES)
    busybox = _extract_busybox(busybox_deb, tmp / "busybox")

    kernel = tmp / "vmlinuz"
    shutil.copyfile(kernel_tree / "boot" / f"vmlinuz-{release}", kernel)

    log("Writing the initramfs ...")
    initrd = tmp / "initrd.img"
    _write_initramfs(initrd, busybox, files["initramfs-init"], release, initramfs_modules)

    log("Making the root filesystem ...")
    disk = tmp / "disk.qcow2"
    _make_disk(disk, tmp / "root", busybox, files, release, disk_modules, key)
    shutil.rmtree(tmp / "root")
    (tmp / "busybox").unlink()

    artifacts = ApplianceArtifacts(
        disk=disk, kernel=kernel, initrd=initrd, cmdline=CMDLINE, kernel_version=release
    )
    manifest = {
        "key": key,
        "kernel_version": release,
        "cmdline": CMDLINE,
        "kernel_package": kernel_deb.name,
        "busybox_package": busybox_deb.name,
        "files": {"disk": disk.name, "kernel": kernel.name, "initrd": initrd.name},
    }
    # Written last: a directory with a manifest is a complete build.
    (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return artifacts


def _extracted_kernel(cache_dir: Path, deb: Path, log: Callable[[str], None]) -> Path:
    """The kernel package unpacked once into the cache (unpacking xz takes seconds)."""
    tree = cache_dir / deb.name.removesuffix(".deb")
    if (tree / ".complete").exists():
        return tree
    log(f"Unpacking {deb.name} ...")
    shutil.rmtree(tree, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".unpack-"))
    try:
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], what=f"unpack {deb.name}")
        (tmp / ".complete").touch()
        tmp.rename(tree)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in cache_dir.glob("linux-image-*"):
        if stale.is_dir() and stale != tree:
            shutil.rmtree(stale, ignore_errors=True)
    return tree


def _kernel_release(tree: Path) -> str:
    releases = [p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*")]
    if len(releases) != 1 or not (tree / "lib/modules" / releases[0]).is_dir():
        raise ApplianceBuildError(f"The kernel package in {tree} holds no single kernel.")
    return releases[0]


def _extract_busybox(deb: Path, target: Path) -> Path:
    # One member out of the package: no need to unpack the rest (docs, udhcpc scripts).
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".busybox-") as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], what=f"unpack {deb.name}")
        source = Path(tmp) / "bin/busybox"
        if not source.is_file():
            raise ApplianceBuildError(f"{deb.name} holds no /bin/busybox.")
        source.replace(target)
    target.chmod(0o755)
    return target


class _ModuleIndex:
    """Kernel modules by name, and their dependencies read from each .ko's .modinfo."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, str] = {}
        order = root / "modules.order"
        listed = order.read_text().split() if order.is_file() else []
        if not listed:
            listed = [str(p.relative_to(root)) for p in root.rglob("*.ko")]
        for rel in listed:
            self.paths[_module_name(rel)] = rel

    def closure(self, wanted: Sequence[str]) -> list[tuple[str, Path]]:
        """(name, file) of ``wanted`` and their dependencies, each after its dependencies."""
        done: dict[str, Path] = {}

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in done:
                return
            if name in chain:
                raise ApplianceBuildError(f"Kernel modules depend on each other in a loop: {name}.")
            rel = self.paths.get(name)
            if rel is None:
                raise ApplianceBuildError(f"The kernel package has no module {name}.")
            for dep in _modinfo(self.root / rel).get("depends", []):
                for dep_name in filter(None, dep.split(",")):
                    visit(_module_name(dep_name), (*chain, name))
            done[name] = self.root / rel

        for name in wanted:
            visit(name, ())
        return list(done.items())


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def _modinfo(ko: Path) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ApplianceBuildError(f"{ko.name} is not a 64-bit little-endian ELF module.")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name = struct.unpack_from("<I", data, base)[0]
        offset, size = struct.unpack_from("<QQ", data, base + 24)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name : end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in data[offset : offset + size].split(b"\0"):
                field, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(field, []).append(value)
            return info
    return {}


# --- initramfs ------------------------------------------------------------------


def _write_initramfs(
    path: Path,
    busybox: Path,
    init: bytes,
    release: str,
    modules: Sequence[tuple[str, Path]],
) -> None:
    """A cpio (newc) archive; device nodes need no root since we write the headers."""
    moddir = f"lib/modules/{release}"
    load = "".join(f"{ko.name}\n" for _, ko in modules)
    cpio = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules", moddir):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1, 0o600)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init, 0o755)
    cpio.file(f"{moddir}/initramfs.load", load.encode(), 0o644)
    for _, ko in modules:
        cpio.file(f"{moddir}/{ko.name}", ko.read_bytes(), 0o644)
    data = cpio.finish()
    path.write_bytes(gzip.compress(data, 6, mtime=0) if _GZIP_INITRAMFS else data)


_GZIP_INITRAMFS = False


class _Cpio:
    """A writer for the kernel's initramfs format: cpio "newc" (SVR4, no CRC)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int) -> None:
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", nlink=1, ino=0)
        return b"".join(self._parts)

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        if ino is None:
            ino, self._ino = self._ino, self._ino + 1
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._parts += [header, encoded, _pad(len(header) + len(encoded)), data, _pad(len(data))]


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


# --- root disk ------------------------------------------------------------------


def _make_disk(
    disk: Path,
    root: Path,
    busybox: Path,
    files: dict[str, bytes],
    release: str,
    modules: Sequence[tuple[str, Path]],
    key: str,
) -> None:
    _make_root_tree(root, busybox, files, release, modules)
    raw = disk.with_suffix(".raw")
    with raw.open("wb") as out:
        out.truncate(DISK_SIZE)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "corral-root",
            "-U",
            _uuid_from(key),
            "-d",
            str(root),
            # Zero the inode tables and journal now, so the guest's kernel does not
            # spend its (emulated) CPU doing it in the background after boot.
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            str(raw),
        ],
        what="make the appliance's ext4 filesystem",
        hint="Install e2fsprogs (1.43 or newer).",
    )
    _run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
        what="convert the appliance's disk to qcow2",
        hint="Install qemu-utils.",
    )
    raw.unlink()


def _make_root_tree(
    root: Path,
    busybox: Path,
    files: dict[str, bytes],
    release: str,
    modules: Sequence[tuple[str, Path]],
) -> None:
    for directory in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc/corral",
        "var/lib/corral",
        f"lib/modules/{release}",
        "mnt",
    ):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "root").mkdir(mode=0o700)
    (root / "tmp").chmod(0o1777)
    shutil.copyfile(busybox, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    for applet in _busybox_applets(busybox):
        link = root / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "bin/busybox", link.parent))
    (root / "sbin/init").unlink(missing_ok=True)  # busybox's applet: ours runs first

    def put(rel: str, data: bytes, mode: int) -> None:
        target = root / rel
        target.write_bytes(data)
        target.chmod(mode)

    put("sbin/init", files["init"], 0o755)
    put("etc/corral/seed.awk", files["seed.awk"], 0o644)
    put("etc/corral/power-button", files["power-button"], 0o755)
    put("etc/inittab", files["inittab"], 0o644)
    put("etc/profile", files["profile"], 0o644)
    put("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    put("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o600)
    put("etc/group", b"root:x:0:\ntty:x:5:\n", 0o644)
    put("etc/hostname", b"appliance\n", 0o644)
    put("etc/fstab", b"/dev/vda / ext4 rw,noatime 0 1\n", 0o644)

    moddir = root / "lib/modules" / release
    for _, ko in modules:
        shutil.copyfile(ko, moddir / ko.name)
    load = "".join(f"{name} {ko.name}\n" for name, ko in modules)
    put(f"lib/modules/{release}/corral.load", load.encode(), 0o644)


def _busybox_applets(busybox: Path) -> list[str]:
    """Where each applet lives (``bin/sh``, ``sbin/ip`` ...), as busybox itself says."""
    # Debian's busybox-static is a static x86_64 binary: it runs on this (build) host.
    out = _run([str(busybox), "--list-full"], what="list busybox's applets")
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


def _uuid_from(key: str) -> str:
    # Same inputs, same filesystem UUID: builds are reproducible where mke2fs allows.
    h = key[:32]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"


# --- manifest, swap, helpers ------------------------------------------------------


def _read_manifest(out_dir: Path, key: str) -> ApplianceArtifacts | None:
    try:
        manifest = json.loads((out_dir / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None
    try:
        names = manifest["files"]
        artifacts = ApplianceArtifacts(
            disk=out_dir / names["disk"],
            kernel=out_dir / names["kernel"],
            initrd=out_dir / names["initrd"],
            cmdline=str(manifest["cmdline"]),
            kernel_version=str(manifest["kernel_version"]),
        )
    except (KeyError, TypeError):
        return None
    if not all(p.is_file() for p in (artifacts.disk, artifacts.kernel, artifacts.initrd)):
        return None
    return artifacts


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary directories of builds that were killed."""
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for leftover in out_dir.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        new.rename(target)
        return
    old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _relocate(artifacts: ApplianceArtifacts, tmp: Path, out_dir: Path) -> ApplianceArtifacts:
    def moved(path: Path) -> Path:
        return out_dir / path.relative_to(tmp)

    return ApplianceArtifacts(
        disk=moved(artifacts.disk),
        kernel=moved(artifacts.kernel),
        initrd=moved(artifacts.initrd),
        cmdline=artifacts.cmdline,
        kernel_version=artifacts.kernel_version,
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize builds (and downloads) sharing a directory, across processes."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(
    args: list[str],
    *,
    what: str,
    cwd: Path | None = None,
    timeout: float = _TOOL_TIMEOUT,
    hint: str | None = None,
) -> str:
    try:
        done = subprocess.run(
            args,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise ApplianceBuildError(
            f"Cannot {what}: {args[0]} is not installed.", hint=hint
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ApplianceBuildError(f"Cannot {what}: no answer within {timeout:.0f} s.") from exc
    if done.returncode != 0:
        detail = _last_line(done.stderr) or f"exit status {done.returncode}"
        raise ApplianceBuildError(f"Cannot {what}: {detail}.", hint=hint)
    return done.stdout


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else ""
