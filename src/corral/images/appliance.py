"""The built-in appliance: a Debian cloud kernel, a busybox userland, a NoCloud init.

Everything comes from Debian's packages, downloaded once with apt into a cache
directory: ``linux-image-<ver>-cloud-amd64`` (what the ``linux-image-cloud-amd64``
metapackage points at), ``busybox-static``, and ``dropbear-bin`` for its
``dropbearkey`` with the packages of the libraries it loads (KEYGEN_PACKAGES; the
build copies the program, its ELF interpreter and its DT_NEEDED libraries, read from
the ELF headers, nothing else). The build needs no root and no mounts:
the initramfs is a cpio archive written here, the root filesystem an ext4 image made
by ``mkfs.ext4 -d`` from a directory tree, then converted to qcow2.

Boot (direct kernel boot, ``console=ttyS0``; the scripts are ``appliance_files/``):

1. The initramfs's ``/init`` loads the drivers (virtio disk and NIC, the seed ISO's
   filesystem, the power button), mounts ``/dev/vda`` and switches root to it.
   With ``corral.probe`` on the command line it prints ``CORRAL-PROBE-OK`` and powers
   off instead, before touching any disk.
2. The disk's ``/sbin/init`` applies the NoCloud seed (the ISO labelled ``cidata``,
   else ``/dev/vdb``): hostname, ``/root/.ssh/authorized_keys``,
   ``/var/lib/corral/instance-id``; makes the machine's identity when it has none, as a
   distribution does at first boot (``/etc/machine-id`` when missing or empty, from
   the kernel's random UUID); brings up ``lo`` and the NIC; prints
   ``CORRAL-READY hostname=... instance-id=... mac=...``; then, when
   ``/etc/dropbear/dropbear_ed25519_host_key`` is missing, generates it in the
   background with ``dropbearkey``, and becomes busybox init with a root shell on
   ttyS0. The ACPI power button powers it off at once. A sealed template
   (``corral image capture``) lacks both, so each clone makes its own.

Under TCG on a 2-core host a boot reaches the readiness line in about 1.3 s (1.3 s of
QEMU CPU), against 2.9 s for the same kernel booted plainly. What buys it, each
measured: the kernel flags in CMDLINE, the kernel shipped uncompressed (PVH entry),
modules stripped of signatures and BTF and loaded from the initramfs, few processes in
the init scripts, and one busybox shared by both stages. (Measured from QEMU's start,
readiness takes about 2.5 s on a quiet host.) The first-boot identity, measured as 7
boots of each build interleaved, on a host loaded by other guests (medians from QEMU's
start): without it 3.18 s, with it 2.86 s (the machine-id forks nothing; within the
noise); generating the host key before the readiness line instead: 4.49 s against
3.33 s, so it runs after the line, and the key exists about 1.3 s later.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from corral.errors import CorralError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
KEYGEN_PACKAGES = ("dropbear-bin", "libtomcrypt1", "libtommath1", "libgmp10", "libc6")
"""``dropbearkey`` (the guest's SSH host key at first boot) and the packages holding the
shared libraries it loads; only those files are copied (see ``KEYGEN_PROGRAM``)."""
KEYGEN_PROGRAM = "usr/bin/dropbearkey"

# The kernel command line. Every flag past "panic" skips work that this tiny guest does
# not need; each was measured under TCG on a 2-core host (times are per boot).
_INITCALL_BLACKLIST = (
    "init_kprobe_trace",  # 130 ms: kprobe event self-tests
    "crypto_kdf108_init",  # 50 ms: KDF self-test
    # The first of these makes the kernel parse its whole BTF (35 ms); all of them only
    # serve BPF programs, which the appliance never loads. TCP falls back to reno.
    "cubictcp_register",
    "bpf_rstat_kfunc_init",
    "bpf_key_sig_kfuncs_init",
    "bpf_tcp_ca_kfunc_init",
    "kfunc_init",
    "bpf_prog_test_run_init",
    "load_system_certificate_list",  # X.509 parsing: modules load unverified (taint)
    "init_acpi_pm_clocksource",  # the TSC is the clocksource (tsc=reliable)
    "proc_kcore_init",
    "snapshot_device_init",  # hibernation
    "slab_sysfs_init",
    "init_trace_printk_function_export",
    "acpi_processor_driver_init",  # C-states and throttling of emulated CPUs
    "kcompactd_init",
)
CMDLINE = " ".join(
    (
        "console=ttyS0",
        "root=/dev/vda",
        "rw",
        "quiet",
        "loglevel=3",
        "printk.time=0",  # console lines start with our markers, not a timestamp
        "panic=-1",
        # One user (root) and no secrets inside the guest: nothing for speculation
        # barriers to protect, and indirect calls without retpolines are cheaper.
        "mitigations=off",
        "cryptomgr.notests",  # 240 ms of crypto self-tests
        "init_on_alloc=0",  # Debian zeroes every page it allocates; TCG pays dearly
        "tsc=reliable",  # no clocksource watchdog
        "no_timer_check",
        "nolapic_timer",  # 110 ms of local APIC timer calibration
        "8250.nr_uarts=1",
        "ipv6.disable=1",  # the appliance has no addresses; no DAD, no router solicits
        "initcall_blacklist=" + ",".join(_INITCALL_BLACKLIST),
    )
)

MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "isofs", "button", "evdev")
"""Loaded by the initramfs, with their dependencies: the disk, the NIC, the seed ISO and
the power button. The disk has them too, for its init to load whatever is missing."""

DISK_SIZE = 64 << 20
"""Virtual size of the root disk; the files take about 3 MiB of it."""

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
    with _locked(cache_dir / ".lock"):  # builds sharing a cache take turns with it
        kernel_deb, busybox_deb, keygen_debs = _fetch_packages(cache_dir, log)
        kernel_tree = _extracted_kernel(cache_dir, kernel_deb, log)
    key = _build_key(kernel_deb, busybox_deb, keygen_debs)
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        existing = _read_manifest(out_dir, key)
        if existing is not None:
            log(f"The appliance in {out_dir} is up to date.")
            return existing
        _remove_leftovers(out_dir)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            artifacts = _build(tmp, kernel_tree, kernel_deb, busybox_deb, keygen_debs, key, log)
            _replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"Built the appliance in {out_dir} (kernel {artifacts.kernel_version}).")
    return _relocate(artifacts, tmp, out_dir)


# --- packages -------------------------------------------------------------------


_KERNEL_DEBS = "linux-image-*-cloud-amd64_*.deb"
_BUSYBOX_DEBS = f"{BUSYBOX_PACKAGE}_*.deb"


def _fetch_packages(
    cache_dir: Path, log: Callable[[str], None]
) -> tuple[Path, Path, list[Path]]:
    """The .deb files of the kernel, busybox and KEYGEN_PACKAGES in the cache, downloaded
    if missing."""
    try:
        kernel_pkg, busybox_pkg, keygen_pkgs = _resolve_packages()
        kernel = _download(cache_dir, kernel_pkg, _KERNEL_DEBS, log)
        busybox = _download(cache_dir, busybox_pkg, _BUSYBOX_DEBS, log)
        keygen = [_download(cache_dir, pkg, f"{pkg.name}_*.deb", log) for pkg in keygen_pkgs]
    except ApplianceBuildError as exc:
        # No apt metadata, or no way to the archive: a warm cache still builds, offline.
        cached_kernel = _newest_cached(cache_dir, _KERNEL_DEBS)
        cached_busybox = _newest_cached(cache_dir, _BUSYBOX_DEBS)
        cached_keygen = [_newest_cached(cache_dir, f"{name}_*.deb") for name in KEYGEN_PACKAGES]
        if cached_kernel is None or cached_busybox is None or None in cached_keygen:
            raise
        log(f"{exc} Using the packages cached in {cache_dir}.")
        return cached_kernel, cached_busybox, [p for p in cached_keygen if p is not None]
    return kernel, busybox, keygen


def _resolve_packages() -> tuple[_Package, _Package, list[_Package]]:
    """The versioned kernel package the metapackage depends on, busybox-static and
    KEYGEN_PACKAGES."""
    # One apt-cache call (each reads apt's whole package list: half a second).
    names = [KERNEL_METAPACKAGE, BUSYBOX_PACKAGE, *KEYGEN_PACKAGES]
    records = _apt_records(names)
    missing = [name for name in names if name not in records]
    if missing:
        raise ApplianceBuildError(f"apt knows no package {missing[0]}.", hint=_APT_HINT)
    meta, busybox = records[KERNEL_METAPACKAGE], records[BUSYBOX_PACKAGE]
    # "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)": the exact version is right there.
    match = re.search(
        r"\b(linux-image-[0-9][^\s,()]*-cloud-amd64)\s*\(=\s*([^)\s]+)\)",
        meta.get("Depends", ""),
    )
    if match is None:
        raise ApplianceBuildError(
            f"apt's {KERNEL_METAPACKAGE} does not name a versioned kernel package."
        )
    kernel = _Package(match.group(1), match.group(2), meta.get("Architecture", "amd64"), None)
    return kernel, _package(busybox), [_package(records[name]) for name in KEYGEN_PACKAGES]


def _package(fields: dict[str, str]) -> _Package:
    try:
        return _Package(
            name=fields["Package"],
            version=fields["Version"],
            architecture=fields["Architecture"],
            size=int(fields["Size"]) if "Size" in fields else None,
        )
    except (KeyError, ValueError) as exc:
        raise ApplianceBuildError(f"apt's record of a package is incomplete: {exc}.") from exc


_APT_HINT = "Run 'apt-get update' (as root) so that apt knows Debian's packages."


def _apt_records(names: list[str]) -> dict[str, dict[str, str]]:
    """The candidate versions' control fields by package, from apt's local metadata."""
    out = _run(
        ["apt-cache", "show", "--no-all-versions", *names],
        what=f"look up {', '.join(names)} with apt-cache",
        hint=_APT_HINT,
    )
    records: dict[str, dict[str, str]] = {}
    for paragraph in out.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line and not line[0].isspace() and ":" in line:
                field, _, value = line.partition(":")
                fields[field] = value.strip()
        if "Package" in fields:
            records.setdefault(fields["Package"], fields)
    return records


def _download(cache_dir: Path, pkg: _Package, family: str, log: Callable[[str], None]) -> Path:
    """``pkg``'s .deb in the cache; other versions (``family``, a glob) are removed."""
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
    for stale in cache_dir.glob(family):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def _newest_cached(cache_dir: Path, pattern: str) -> Path | None:
    found = sorted(cache_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# --- the build ------------------------------------------------------------------


def _build_key(kernel_deb: Path, busybox_deb: Path, keygen_debs: Sequence[Path]) -> str:
    """Changes whenever anything the artifacts are made from changes."""
    digest = hashlib.sha256()
    for part in (CMDLINE, kernel_deb.name, busybox_deb.name, *(d.name for d in keygen_debs)):
        digest.update(part.encode() + b"\0")
    for module in MODULES:
        digest.update(module.encode() + b"\0")
    for name, data in sorted(_appliance_files().items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    # This builder's own code too: a change in how the files are made is a new build.
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def _appliance_files() -> dict[str, bytes]:
    root = resources.files("corral.images").joinpath("appliance_files")
    return {entry.name: entry.read_bytes() for entry in root.iterdir() if entry.is_file()}


def _build(
    tmp: Path,
    kernel_tree: Path,
    kernel_deb: Path,
    busybox_deb: Path,
    keygen_debs: Sequence[Path],
    key: str,
    log: Callable[[str], None],
) -> ApplianceArtifacts:
    files = _appliance_files()
    release = _kernel_release(kernel_tree)
    index = _ModuleIndex(kernel_tree / "lib/modules" / release)
    busybox = _extract_busybox(busybox_deb, tmp / "busybox")

    kernel = _copy_kernel(kernel_tree, release, tmp)

    log("Writing the initramfs ...")
    initrd = tmp / "initrd.img"
    _write_initramfs(initrd, busybox, files["initramfs-init"], release, index, MODULES)

    log("Making the root filesystem ...")
    disk = tmp / "disk.qcow2"
    root = tmp / "root"
    _make_root_tree(root, busybox, files, release, index, MODULES)
    _install_program(root, keygen_debs, KEYGEN_PROGRAM, tmp)
    _make_disk(disk, root, key)
    shutil.rmtree(root)
    busybox.unlink()

    artifacts = ApplianceArtifacts(
        disk=disk, kernel=kernel, initrd=initrd, cmdline=CMDLINE, kernel_version=release
    )
    manifest = {
        "key": key,
        "kernel_version": release,
        "cmdline": CMDLINE,
        "kernel_package": kernel_deb.name,
        "busybox_package": busybox_deb.name,
        "keygen_packages": [d.name for d in keygen_debs],
        "files": {"disk": disk.name, "kernel": kernel.name, "initrd": initrd.name},
    }
    # Written last: a directory with a manifest is a complete build.
    (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return artifacts


def _extracted_kernel(cache_dir: Path, deb: Path, log: Callable[[str], None]) -> Path:
    """What a build reads of the kernel package, unpacked once into the cache.

    Unpacking it (xz, 90 MB of modules) takes seconds; the cache keeps the kernel image
    and the modules that MODULES need (15 MB), and is redone when MODULES changes.
    """
    tree = cache_dir / deb.name.removesuffix(".deb")
    marker = tree / ".complete"
    wanted = " ".join(MODULES)
    if marker.is_file() and marker.read_text() == wanted:
        return tree
    log(f"Unpacking {deb.name} ...")
    unpacked = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".unpack-"))
    staged = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".kernel-"))
    try:
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], what=f"unpack {deb.name}")
        release = _kernel_release(unpacked)
        moddir = Path("lib/modules") / release
        bzimage = Path("boot") / f"vmlinuz-{release}"
        keep = [bzimage, moddir / "modules.order"]
        keep += [
            ko.relative_to(unpacked) for _, ko in _ModuleIndex(unpacked / moddir).closure(MODULES)
        ]
        for rel in keep:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (unpacked / rel).replace(staged / rel)
        vmlinux = _bzimage_payload((staged / bzimage).read_bytes())
        if vmlinux is not None and _has_pvh_entry(vmlinux):
            (staged / "boot/vmlinux").write_bytes(vmlinux)
        (staged / ".complete").write_text(wanted)
        shutil.rmtree(tree, ignore_errors=True)
        staged.rename(tree)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
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
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".busybox-") as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], what=f"unpack {deb.name}")
        source = Path(tmp) / "bin/busybox"
        if not source.is_file():
            raise ApplianceBuildError(f"{deb.name} holds no /bin/busybox.")
        source.replace(target)
    target.chmod(0o755)
    return target


def _copy_kernel(tree: Path, release: str, out_dir: Path) -> Path:
    """The kernel to boot: the bare ELF (``vmlinux``) when it could be had, else the bzImage.

    QEMU starts an ELF kernel at its PVH entry point (libvirt's ``<kernel>`` works the
    same): no real-mode setup, no decompressor. Under TCG that saves about 0.3 s of CPU
    per boot, for a 53 MB file instead of 14 MB. It is decompressed once, into the cache.
    """
    vmlinux = tree / "boot/vmlinux"
    if vmlinux.is_file():
        return Path(shutil.copyfile(vmlinux, out_dir / "vmlinux"))
    return Path(shutil.copyfile(tree / "boot" / f"vmlinuz-{release}", out_dir / "vmlinuz"))


def _bzimage_payload(data: bytes) -> bytes | None:
    """The decompressed kernel inside a bzImage; None if its compression is not known."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    if struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        return None  # boot protocol too old to say where the payload is
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start : start + length]
    try:
        if payload.startswith(_LZ4_LEGACY_MAGIC):
            kernel = _lz4_decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            kernel = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        elif payload.startswith(b"\xfd7zXZ\x00"):
            kernel = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
        else:
            return None  # zstd and others: boot the bzImage
    except (lzma.LZMAError, zlib.error, IndexError, ValueError):
        return None
    except (OSError, subprocess.SubprocessError):  # no lz4 tool: boot the bzImage
        return None
    # The build appends the decompressed size to the payload: all of it, or nothing.
    if len(payload) < 4 or len(kernel) != struct.unpack_from("<I", payload, len(payload) - 4)[0]:
        return None
    return kernel


_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def _lz4_decompress(data: bytes) -> bytes:
    """Debian's ``lz4`` tool, as the kernel's own extract-vmlinux uses it.

    It reports an error at the size the kernel build appends after the frames; the
    length check in the caller, not the exit code, decides whether the output is whole.
    """
    result = subprocess.run(
        ["lz4", "-dc"], input=data, capture_output=True, check=False, timeout=_TOOL_TIMEOUT
    )
    return result.stdout


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether an ELF kernel has the Xen PVH entry note QEMU needs to boot it."""
    if elf[:4] != b"\x7fELF" or elf[4:6] != b"\x02\x01":
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        base = phoff + index * phentsize
        if struct.unpack_from("<I", elf, base)[0] != 4:  # PT_NOTE
            continue
        offset, _, _, size = struct.unpack_from("<QQQQ", elf, base + 8)
        pos, end = offset, offset + size
        while pos + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


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
            for dep in _elf_modinfo(self.root / rel).get("depends", []):
                for dep_name in filter(None, dep.split(",")):
                    visit(_module_name(dep_name), (*chain, name))
            done[name] = self.root / rel

        for name in wanted:
            visit(name, ())
        return list(done.items())


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


@dataclass(frozen=True, slots=True)
class _Section:
    name: bytes
    header: int
    """Offset of the section header in the file."""
    offset: int
    size: int


def _elf_sections(data: bytes, what: str) -> list[_Section]:
    """The sections of a 64-bit little-endian ELF file (a kernel module)."""
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise ApplianceBuildError(f"{what} is not a 64-bit little-endian ELF file.")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [shoff + index * shentsize for index in range(shnum)]
    names = struct.unpack_from("<Q", data, headers[shstrndx] + 24)[0]
    sections = []
    for header in headers:
        name = names + struct.unpack_from("<I", data, header)[0]
        offset, size = struct.unpack_from("<QQ", data, header + 24)
        sections.append(_Section(data[name : data.index(b"\0", name)], header, offset, size))
    return sections


def _elf_modinfo(ko: Path) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's ``.modinfo`` section."""
    data = ko.read_bytes()
    info: dict[str, list[str]] = {}
    for section in _elf_sections(data, ko.name):
        if section.name == b".modinfo":
            for item in data[section.offset : section.offset + section.size].split(b"\0"):
                field, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(field, []).append(value)
    return info


_SIGNATURE_MARKER = b"~Module signature appended~\n"


def _trimmed_module(ko: Path) -> bytes:
    """A module as the appliance loads it: without its signature and its BTF.

    Each costs emulated CPU at every load for nothing here: the kernel could not check
    the signature (its certificates are not loaded, see CMDLINE), and the first module
    with BTF makes the kernel parse the whole kernel's BTF (about 0.15 s under TCG).
    The BTF section is hidden by giving it an empty name, which changes no offsets.
    """
    data = bytearray(ko.read_bytes())
    if data.endswith(_SIGNATURE_MARKER):
        end = len(data) - len(_SIGNATURE_MARKER)
        # struct module_signature (12 bytes) ends with the signature's length, big-endian.
        sig_len = struct.unpack_from(">I", data, end - 4)[0]
        del data[end - 12 - sig_len :]
    for section in _elf_sections(bytes(data), ko.name):
        if section.name == b".BTF":
            struct.pack_into("<I", data, section.header, 0)  # sh_name 0: ""
    return bytes(data)


def _modules_dep(modules: Sequence[tuple[str, Path]], closure: _ModuleIndex) -> str:
    """modules.dep for busybox modprobe, in kmod's order (a module's deps, last first)."""
    lines = []
    for name, ko in modules:
        deps = [dep.name for dep_name, dep in closure.closure([name]) if dep_name != name]
        lines.append(f"{ko.name}: {' '.join(reversed(deps))}".rstrip() + "\n")
    return "".join(lines)


# --- initramfs ------------------------------------------------------------------


def _write_initramfs(
    path: Path,
    busybox: Path,
    init: bytes,
    release: str,
    index: _ModuleIndex,
    wanted: Sequence[str],
) -> None:
    """A cpio (newc) archive; device nodes need no root since we write the headers.

    Uncompressed: the kernel copies 2.3 MB faster than TCG decompresses it.
    """
    moddir = f"lib/modules/{release}"
    cpio = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules", moddir):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1, 0o600)
    cpio.char_device("dev/kmsg", 1, 11, 0o644)  # the probe writes here before devtmpfs
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init, 0o755)
    for rel, data in _module_files(index, wanted).items():
        cpio.file(f"{moddir}/{rel}", data, 0o644)
    path.write_bytes(cpio.finish())


def _module_files(index: _ModuleIndex, wanted: Sequence[str]) -> dict[str, bytes]:
    """The modules ``wanted`` need (flat), their modules.dep, and corral.modules."""
    modules = index.closure(wanted)
    files = {ko.name: _trimmed_module(ko) for _, ko in modules}
    files["modules.dep"] = _modules_dep(modules, index).encode()
    # What the init scripts pass to `modprobe -a`, one line.
    files["corral.modules"] = (" ".join(wanted) + "\n").encode()
    return files


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


def _make_disk(disk: Path, root: Path, key: str) -> None:
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
    index: _ModuleIndex,
    wanted: Sequence[str],
) -> None:
    """The disk's files. Directories the init writes into exist already: no mkdir forks."""
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
        "etc/dropbear",
        "var/lib/corral",
        f"lib/modules/{release}",
        "mnt/seed",
    ):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "root").mkdir(mode=0o700)
    (root / "root/.ssh").mkdir(mode=0o700)
    (root / "tmp").chmod(0o1777)
    shutil.copyfile(busybox, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    for applet in _busybox_applets(busybox):
        link = root / applet
        if applet == "sbin/init" or link.exists() or link.is_symlink():
            continue  # /sbin/init is ours; it becomes busybox init at the end
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "bin/busybox", link.parent))

    def put(rel: str, data: bytes, mode: int = 0o644) -> None:
        target = root / rel
        target.write_bytes(data)
        target.chmod(mode)

    put("sbin/init", files["init"], 0o755)
    put("etc/corral/seed.awk", files["seed.awk"])
    put("etc/inittab", files["inittab"])
    put("etc/fstab", files["fstab"])
    put("etc/profile", files["profile"])
    put("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    put("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o600)
    put("etc/group", b"root:x:0:\ntty:x:5:\n")
    put("etc/hostname", b"appliance\n")
    for rel, data in _module_files(index, wanted).items():
        put(f"lib/modules/{release}/{rel}", data)


_LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
_GUEST_LIBRARY_DIR = "lib/x86_64-linux-gnu"
"""Where the disk gets the libraries: a directory glibc's loader searches by default."""


def _install_program(root: Path, debs: Sequence[Path], program: str, work: Path) -> None:
    """Copy ``program`` from ``debs`` into ``root`` with its ELF interpreter and the shared
    libraries it needs (DT_NEEDED, transitively), each read from the same packages.

    No tool runs the binaries: ``ldd`` would execute the loader on them; the ELF headers
    say the same.
    """
    tree = Path(tempfile.mkdtemp(dir=work, prefix=".debs-"))
    try:
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(tree)], what=f"unpack {deb.name}")
        binary = _in_tree(tree, program)
        if binary is None:
            names = ", ".join(d.name for d in debs)
            raise ApplianceBuildError(f"None of {names} holds /{program}.")
        interpreter, _ = _elf_dynamic(binary)
        if interpreter is None:
            raise ApplianceBuildError(f"/{program} names no ELF interpreter.")
        copies = {program: binary}
        interp = _in_tree(tree, interpreter.lstrip("/"))
        if interp is None:
            raise ApplianceBuildError(f"The packages hold no {interpreter} for /{program}.")
        copies[interpreter.lstrip("/")] = interp
        pending, seen = [binary], set()
        while pending:
            for soname in _elf_dynamic(pending.pop())[1]:
                if soname in seen:
                    continue
                seen.add(soname)
                found = next((f for d in _LIBRARY_DIRS if (f := _in_tree(tree, f"{d}/{soname}"))),
                             None)
                if found is None:
                    raise ApplianceBuildError(
                        f"/{program} needs {soname}, which none of the packages holds."
                    )
                copies[f"{_GUEST_LIBRARY_DIR}/{soname}"] = found
                pending.append(found)
        for rel, source in copies.items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            target.chmod(0o755)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _in_tree(tree: Path, rel: str) -> Path | None:
    """The regular file at ``rel`` in an unpacked package tree, following its symbolic
    links inside the tree (an absolute target means the tree's root, not this host's)."""
    path = rel
    for _ in range(16):
        candidate = tree / path
        if candidate.is_symlink():
            target = str(candidate.readlink())
            path = os.path.normpath(
                target.lstrip("/") if target.startswith("/")
                else str(PurePosixPath(path).parent / target)
            )
            if path.startswith(".."):
                return None
            continue
        return candidate if candidate.is_file() else None
    return None


def _elf_dynamic(path: Path) -> tuple[str | None, list[str]]:
    """An ELF file's interpreter (``.interp``) and the sonames it needs (DT_NEEDED)."""
    data = path.read_bytes()
    sections = {section.name: section for section in _elf_sections(data, path.name)}
    interp = sections.get(b".interp")
    interpreter = (data[interp.offset : interp.offset + interp.size].rstrip(b"\0").decode()
                   if interp is not None else None)
    dynamic, dynstr = sections.get(b".dynamic"), sections.get(b".dynstr")
    if dynamic is None or dynstr is None:
        return interpreter, []
    needed = []
    for pos in range(dynamic.offset, dynamic.offset + dynamic.size, 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED: an offset into .dynstr
            start = dynstr.offset + value
            needed.append(data[start : data.index(b"\0", start)].decode())
    return interpreter, needed


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
        raise ApplianceBuildError(f"Cannot {what}: {args[0]} is not installed.", hint=hint) from exc
    except subprocess.TimeoutExpired as exc:
        raise ApplianceBuildError(f"Cannot {what}: no answer within {timeout:.0f} s.") from exc
    if done.returncode != 0:
        detail = _last_line(done.stderr) or f"exit status {done.returncode}"
        raise ApplianceBuildError(f"Cannot {what}: {detail}.", hint=hint)
    return done.stdout


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else ""
