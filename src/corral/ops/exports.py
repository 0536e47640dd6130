"""Export a stopped machine in an open format: OVA, libvirt, qcow2 or VMDK.

Nobody is locked in, Corral included: every export stands alone, without Corral and
without the image library. A machine's disk is usually a linked clone (a qcow2 overlay
on a library base); ``qemu-img convert`` reads through the chain and writes one
self-contained image, so no export names a backing file.

- ``qcow2``: ``NAME.qcow2``.
- ``vmdk``: ``NAME.vmdk`` (monolithicSparse: the one-file growable disk VMware
  Workstation, Player and Fusion run as it is; streamOptimized is a transport format
  they must import first) and a minimal ``NAME.vmx`` that opens it.
- ``ova``: ``NAME.ova``, a tar of an OVF 1.0 descriptor, the disk as a streamOptimized
  VMDK (the format OVF packages carry, compressed) and a SHA-256 manifest.
- ``libvirt``: ``NAME.xml`` and ``NAME.qcow2`` (plus ``NAME.kernel`` and
  ``NAME.initrd`` when the machine boots a kernel directly); the XML names them by
  absolute path and holds nothing a bare libvirt lacks, so ``virsh define NAME.xml``
  takes it as it is.

A machine on another host is read through that host's storage backend only (libvirt):
the host flattens the chain into a temporary volume, which is fetched and removed.

Everything is written in a hidden staging folder inside ``dest_dir`` (same filesystem)
and moved into place only when complete; a failed export removes what it wrote.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from corral.errors import Conflict, CorralError, InvalidInput, NoSpace, StorageError
from corral.formats.domain_export import ExportedDomain, build_exported_domain_xml
from corral.formats.domain_xml import ParsedDomain
from corral.formats.ovf import OvfDiskSpec, OvfSpec, build_ovf
from corral.images.ova import write_ova
from corral.model import KernelBoot, Machine, PowerState
from corral.ops.context import Context, HostHandle
from corral.storage import qemu_img

log = logging.getLogger(__name__)

_OFF = frozenset({PowerState.SHUT_OFF, PowerState.CRASHED})
_LSI_LOGIC = "lsilogic"
"""The disk controller both the VMX and the OVF describe, and the VMDK's adapter type."""


class ExportFormat(StrEnum):
    OVA = "ova"
    LIBVIRT = "libvirt"
    QCOW2 = "qcow2"
    VMDK = "vmdk"


@dataclass(frozen=True, slots=True)
class ExportedFile:
    path: Path
    size: int
    """Bytes on disk (allocated), which for sparse files is less than their length."""
    role: str
    """What the file is: ``disk``, ``descriptor``, ``package``, ``kernel``…"""


@dataclass(frozen=True, slots=True)
class ExportResult:
    machine: str
    format: ExportFormat
    files: tuple[ExportedFile, ...]


def _file_names(name: str, fmt: ExportFormat, kernel_boot: KernelBoot | None) -> dict[str, str]:
    """Role -> file name in ``dest_dir``, decided before anything is written."""
    if fmt is ExportFormat.QCOW2:
        return {"disk": f"{name}.qcow2"}
    if fmt is ExportFormat.VMDK:
        return {"disk": f"{name}.vmdk", "vmx": f"{name}.vmx"}
    if fmt is ExportFormat.OVA:
        return {"package": f"{name}.ova"}
    names = {"domain": f"{name}.xml", "disk": f"{name}.qcow2"}
    if kernel_boot is not None:
        names["kernel"] = f"{name}.kernel"
        if kernel_boot.initrd is not None:
            names["initrd"] = f"{name}.initrd"
    return names


def export_machine(
    ctx: Context,
    name: str,
    fmt: ExportFormat | str,
    dest_dir: Path,
    progress: Callable[[str, float], None] | None = None,
) -> ExportResult:
    """Write machine ``name`` to ``dest_dir`` in format ``fmt``.

    Pre: the machine is stopped (else Conflict) and none of the files the export would
    write exists in ``dest_dir`` (else Conflict). Post: the files exist, complete.
    On failure none of them exists, nor any staging file. The machine is not changed.
    ``progress`` gets (what is happening, percent done).
    """
    try:
        fmt = ExportFormat(fmt)
    except ValueError:
        known = ", ".join(f.value for f in ExportFormat)
        raise InvalidInput(f"'{fmt}' is not an export format (choose {known}).") from None
    machine = ctx.store.get_machine(name)
    handle = ctx.on(machine.host)
    state = handle.driver.state(name)
    if state not in _OFF:
        raise Conflict(
            f"Machine '{name}' is {state.value}; Corral exports only stopped machines, whose "
            "disks are consistent.",
            hint=f"Stop it with 'corral vm stop {name}', then export it.",
        )
    domain = handle.driver.domain_xml(name)
    dest_dir = dest_dir.absolute()
    names = _file_names(name, fmt, domain.kernel_boot)
    _check_free(dest_dir, names.values())
    report = progress or (lambda _what, _pct: None)
    staging = _staging_dir(dest_dir)
    try:
        exporter = _Export(ctx, handle, machine, domain, staging, dest_dir, names, report)
        exporter.run(fmt)
        placed = _place(staging, dest_dir, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = tuple(ExportedFile(path, _allocated(path), role) for role, path in placed.items())
    return ExportResult(machine=name, format=fmt, files=files)


def _check_free(dest_dir: Path, names: Iterable[str]) -> None:
    if not dest_dir.is_dir():
        raise InvalidInput(
            f"'{dest_dir}' is not a folder.", hint="Create it, or name another with --output."
        )
    for file_name in names:
        path = dest_dir / file_name
        if path.exists() or path.is_symlink():
            raise Conflict(
                f"'{path}' already exists; Corral does not overwrite files.",
                hint="Move it away, or export to another folder with --output.",
            )


def _staging_dir(dest_dir: Path) -> Path:
    try:
        staging = Path(tempfile.mkdtemp(prefix=".corral-export-", dir=dest_dir))
    except OSError as exc:
        raise StorageError(f"Cannot write in '{dest_dir}': {exc.strerror}.") from exc
    staging.chmod(0o755)  # QEMU (libvirt-qemu) may have to read the files from here
    return staging


def _place(staging: Path, dest_dir: Path, names: dict[str, str]) -> dict[str, Path]:
    """Move every staged file to its final name; all or none."""
    placed: dict[str, Path] = {}
    try:
        for role, file_name in names.items():
            final = dest_dir / file_name
            _move_unless_taken(staging / file_name, final)
            placed[role] = final
    except BaseException as exc:
        for path in placed.values():
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(exc, FileExistsError):
            raise Conflict(
                f"'{exc.filename}' appeared while exporting; Corral does not overwrite files."
            ) from exc
        if isinstance(exc, OSError):
            message = f"Could not place the export in '{dest_dir}': {exc.strerror}."
            raise StorageError(message) from exc
        raise
    return placed


def _move_unless_taken(source: Path, dest: Path) -> None:
    """Rename ``source`` to ``dest``, refusing (FileExistsError) if ``dest`` exists."""
    try:
        os.link(source, dest)  # link() refuses an existing name, where rename() replaces it
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise
        # A filesystem without hard links: check, then rename (a race is merely unlikely).
        if dest.exists() or dest.is_symlink():
            raise FileExistsError(errno.EEXIST, "File exists", str(dest)) from exc
        source.rename(dest)


def _allocated(path: Path) -> int:
    st = path.stat()
    return min(st.st_size, st.st_blocks * 512)


class _Export:
    """One export in progress: its staging folder and what it has learnt."""

    def __init__(
        self,
        ctx: Context,
        handle: HostHandle,
        machine: Machine,
        domain: ParsedDomain,
        staging: Path,
        dest_dir: Path,
        names: dict[str, str],
        report: Callable[[str, float], None],
    ) -> None:
        self.ctx = ctx
        self.handle = handle
        self.machine = machine
        self.domain = domain
        self.staging = staging
        self.dest_dir = dest_dir
        self.names = names
        self.report = report
        self.cleanups: list[Callable[[], None]] = []

    def run(self, fmt: ExportFormat) -> None:
        try:
            if fmt is ExportFormat.QCOW2:
                self.disk(self.names["disk"], "qcow2", {})
            elif fmt is ExportFormat.VMDK:
                options = {"subformat": "monolithicSparse", "adapter_type": _LSI_LOGIC}
                self.disk(self.names["disk"], "vmdk", options)
                self.write_text("vmx", _vmx(self.machine, self.names["disk"], self.mac))
            elif fmt is ExportFormat.OVA:
                self.ova()
            else:
                self.libvirt()
        finally:
            for cleanup in reversed(self.cleanups):
                _cleanup(cleanup)

    @property
    def mac(self) -> str | None:
        return self.machine.identity.mac or next(iter(self.domain.macs), None)

    # -- the disk ---------------------------------------------------------------------

    def source_disk(self) -> tuple[Path, str]:
        """A local file holding the machine's disk chain, and its format.

        On the local host that is the disk itself (qemu-img reads its chain); on another
        host, the host first copies the chain into one volume (qemu-img on the host),
        which is fetched here and removed there.
        """
        disk_path = Path(self.machine.disk_path)
        parsed = next((d for d in self.domain.disks if d.source == str(disk_path)), None)
        fmt = parsed.format if parsed is not None and parsed.format else "qcow2"
        if self.handle.local:
            return disk_path, fmt
        host, storage = self.handle.host.name, self.handle.storage
        flat = disk_path.with_name(f"export-{self.staging.name.lstrip('.')}-{disk_path.name}")
        self.report(f"flattening {disk_path.name} on {host}", 0.0)
        storage.full_clone(disk_path, flat, storage.usage(disk_path).virtual_size)
        self.cleanups.append(lambda: storage.delete(flat))
        local = self.staging / "fetched.qcow2"
        self.report(f"fetching {disk_path.name} from {host}", 0.0)
        storage.fetch(flat, local)
        self.cleanups.append(lambda: local.unlink(missing_ok=True))
        return local, "qcow2"

    def disk(self, file_name: str, fmt: str, options: dict[str, str]) -> Path:
        """The machine's disk chain as one self-contained image in the staging folder."""
        source, source_fmt = self.source_disk()
        dest = self.staging / file_name
        self.report(f"writing {dest.name}", 0.0)
        qemu_img.convert(
            source, source_fmt, dest, fmt, self.ctx.limits,
            lambda pct: self.report(f"writing {dest.name}", pct), options=options,
        )
        dest.chmod(0o644)
        return dest

    # -- formats ----------------------------------------------------------------------

    def ova(self) -> None:
        vmdk_name = f"{self.machine.name}-disk1.vmdk"  # inside the package only
        options = {"subformat": "streamOptimized", "adapter_type": _LSI_LOGIC}
        vmdk = self.disk(vmdk_name, "vmdk", options)
        info = qemu_img.info(vmdk, "vmdk", self.ctx.limits)
        spec = OvfSpec(
            name=self.machine.name,
            cpus=self.machine.cpus,
            memory_bytes=self.machine.memory_bytes,
            disks=(OvfDiskSpec(vmdk_name, vmdk.stat().st_size, info.virtual_size),),
            macs=(self.mac,) if self.mac else (),
            uuid=self.machine.identity.uuid,
        )
        total = max(1, vmdk.stat().st_size)
        done = 0

        def written(n: int) -> None:
            nonlocal done
            done += n
            self.report(f"packing {self.names['package']}", 100.0 * done / total)

        package = self.staging / self.names["package"]
        write_ova(package, f"{self.machine.name}.ovf", build_ovf(spec), [(vmdk_name, vmdk)],
                  written)
        vmdk.unlink()
        package.chmod(0o644)

    def libvirt(self) -> None:
        self.disk(self.names["disk"], "qcow2", {})
        boot = self.domain.kernel_boot
        exported_boot = None
        if boot is not None:
            kernel = self.copy_boot_file(boot.kernel, "kernel")
            initrd = self.copy_boot_file(boot.initrd, "initrd") if boot.initrd else None
            exported_boot = KernelBoot(kernel=kernel, initrd=initrd, cmdline=boot.cmdline)
        xml = build_exported_domain_xml(
            ExportedDomain(
                name=self.machine.name,
                uuid=self.machine.identity.uuid,
                domain_type=self.domain.domain_type or "qemu",
                cpus=self.machine.cpus,
                memory_bytes=self.machine.memory_bytes,
                disk_path=str(self.dest_dir / self.names["disk"]),
                mac=self.mac,
                kernel_boot=exported_boot,
            )
        )
        self.write_text("domain", xml)

    def copy_boot_file(self, path: str, role: str) -> str:
        """Copy a kernel or initrd into the export; its final absolute path."""
        dest = self.staging / self.names[role]
        self.report(f"copying {dest.name}", 0.0)
        try:
            if self.handle.local:
                shutil.copyfile(path, dest)
            else:
                self.handle.storage.fetch(Path(path), dest)
            dest.chmod(0o644)
        except OSError as exc:
            raise _os_error(exc, f"copy the {role} '{path}'") from exc
        return str(self.dest_dir / self.names[role])

    def write_text(self, role: str, text: str) -> None:
        try:
            (self.staging / self.names[role]).write_text(text)
        except OSError as exc:
            raise _os_error(exc, f"write {self.names[role]}") from exc


def _os_error(exc: OSError, action: str) -> CorralError:
    if exc.errno == errno.ENOSPC:
        return NoSpace(f"Could not {action}: the filesystem is full; free space and retry.")
    return StorageError(f"Could not {action}: {exc.strerror}.")


def _cleanup(action: Callable[[], None]) -> None:
    """Undo a temporary step; a failure is logged and never hides the original error."""
    try:
        action()
    except Exception:
        log.warning("export cleanup failed", exc_info=True)


def _vmx_value(value: str) -> str:
    # VMX escapes with '|' and two hex digits; a quote or '|' must not end the value.
    return "".join(f"|{ord(c):02X}" if c in '"|' or ord(c) < 32 else c for c in value)


def _vmx(machine: Machine, disk_name: str, mac: str | None) -> str:
    """A minimal VMX that VMware Workstation, Player and Fusion open as it is."""
    mib = -(-machine.memory_bytes // (1 << 20))
    mib += -mib % 4  # VMware wants memory in multiples of 4 MiB
    settings = [
        (".encoding", "UTF-8"),
        ("config.version", "8"),
        ("virtualHW.version", "10"),
        ("displayName", machine.name),
        ("guestOS", "otherlinux-64"),
        ("numvcpus", str(machine.cpus)),
        ("memsize", str(mib)),
        ("scsi0.present", "TRUE"),
        ("scsi0.virtualDev", _LSI_LOGIC),
        ("scsi0:0.present", "TRUE"),
        ("scsi0:0.deviceType", "scsi-hardDisk"),
        ("scsi0:0.fileName", disk_name),
        ("uuid.bios", _vmx_uuid(machine.identity.uuid)),
        ("uuid.action", "keep"),
    ]
    if mac is not None:
        settings += [
            ("ethernet0.present", "TRUE"),
            ("ethernet0.virtualDev", "e1000"),
            ("ethernet0.connectionType", "nat"),
            ("ethernet0.addressType", "static"),
            ("ethernet0.address", mac),
            # A static MAC outside VMware's own range is refused unless this is off.
            ("ethernet0.checkMACAddress", "FALSE"),
        ]
    return "".join(f'{key} = "{_vmx_value(value)}"\n' for key, value in settings)


def _vmx_uuid(uuid: str) -> str:
    """VMware's spelling: 16 hex pairs, a dash after the eighth."""
    digits = uuid.replace("-", "").lower()
    pairs = [digits[i : i + 2] for i in range(0, 32, 2)]
    return " ".join(pairs[:8]) + "-" + " ".join(pairs[8:])
