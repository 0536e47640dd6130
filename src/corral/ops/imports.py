"""Importing machines from other products (VMware, VirtualBox, OVF) and physical disks.

A foreign machine (``formats.foreign.ForeignMachine``, read by ``formats.vmx``,
``formats.vbox`` or the OVF reader) becomes a Corral machine in one job:

1. its first disk is located and vetted *before* anything else happens: every file it
   needs must lie in the machine's folder (or be named by the user), symbolic links
   included, and must pass the core's image inspection (``images.safety``); a VMDK
   split into extents is vetted extent by extent and handed to qemu as a descriptor
   Corral wrote itself, naming only those files;
2. a host is chosen (the one named, else the scheduler's choice) and the machine's
   record, its claim on that host, is written with the job;
3. the disk is converted by ``qemu-img convert`` into a standalone qcow2 in that host's
   pool (on a remote host: converted here, then sent and verified), the kernel image's
   files are made present there if the machine boots one, and the domain is defined;
4. the machine is started, if asked; one that will not start is deleted.

A failure at any step rolls the job back: no disk, no domain, no record is left.

Identity is explicit. An import is a move: the machine keeps the source's UUID and the
MAC of its first NIC, unless ``new_identity`` asks for new ones. The result says what
was kept, what changed and every setting that was not carried over.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tempfile
import uuid as uuids
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from corral.errors import (
    Conflict,
    CorralError,
    InsufficientResources,
    InvalidInput,
    NotFound,
    StorageError,
    UnsafeImage,
)
from corral.formats import vmdk
from corral.formats.foreign import ForeignDisk, ForeignMachine
from corral.formats.image_inspect import detect_format, inspect_image
from corral.identity import allocate_macs, check_name
from corral.images.safety import vet_image
from corral.images.transfer import file_sha256, partial_marker, send_file
from corral.model import (
    DEFAULT_PROJECT,
    Identity,
    Image,
    ImageFormat,
    Job,
    Machine,
    PlacementHints,
    RecordState,
    Step,
    StepState,
    Usage,
)
from corral.model.units import format_size
from corral.ops import lifecycle
from corral.ops import steps as _steps  # noqa: F401  (registers the step kinds)
from corral.ops.context import Context, HostHandle
from corral.ops.hosts import local_host
from corral.ops.images import import_image
from corral.ops.jobs import (
    PlannedStep,
    Recovery,
    check_steps,
    execute_job,
    job_kind,
    prepare_job,
)
from corral.ops.machines import machine_args
from corral.ops.usage import require_quota
from corral.storage import qemu_img
from corral.storage.qemu_img import QemuImgLimits
from corral.store.repository import ClaimedJob, ClaimRefused, utcnow

log = logging.getLogger(__name__)

MACHINE_IMPORT = job_kind("machine-import", Recovery.ROLL_BACK)
CLAIM_ATTEMPTS = 5
_HEAD_BYTES = 64 << 10
_DISK_FORMATS = {f.value: f for f in ImageFormat}
_CORRAL_BUS = "virtio"
_CORRAL_NIC = "virtio"


# -- the disk: located, vetted, converted ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskSource:
    """A foreign disk that passed every check, as the conversion reads it."""

    path: str
    """The disk file as found (a VMDK descriptor, or the single image file)."""
    format: ImageFormat
    virtual_size: int
    files: tuple[str, ...]
    """Every file qemu reads to convert it, by absolute path."""
    descriptor: str | None = None
    """For a VMDK split into extents: the descriptor Corral wrote, which qemu reads
    instead of the original."""

    def to_args(self) -> dict[str, Any]:
        return {"source": self.path, "format": self.format.value, "files": list(self.files),
                "descriptor": self.descriptor, "virtual_size": self.virtual_size}


def locate_disk(
    limits: QemuImgLimits,
    folder: Path,
    disk: ForeignDisk,
    allowed_paths: Iterable[Path] = (),
) -> DiskSource:
    """Find the disk ``disk`` names (relative to ``folder``) and vet every file it needs.

    Raises UnsafeImage when a file lies outside ``folder`` and ``allowed_paths`` (symbolic
    links followed), is a link itself, or is not what it claims to be; CorruptImage for
    a damaged image; NotFound for a missing file; InvalidInput for what Corral cannot
    import (snapshot deltas, VHD, exotic extents).
    """
    places = _Places.of(folder, allowed_paths)
    (path,) = places.check([disk.path], relative_to=places.folder)
    with _open_regular(path) as fd:
        head = os.pread(fd, _HEAD_BYTES, 0)
    found = detect_format(head)
    declared = _declared(disk, path)
    if found is ImageFormat.VMDK and vmdk.is_text_descriptor(head):
        return _split_vmdk(limits, path, places)
    if declared is not None and declared is not found:
        raise UnsafeImage(
            f"The disk '{path.name}' is named as {declared} but its contents are {found}; "
            "Corral refuses disks that are not what they claim to be.",
            hint="Convert it to the format its machine file names, or fix the machine file.",
        )
    vetted = vet_image(path, found, limits)
    return DiskSource(path=str(path), format=vetted.format,
                      virtual_size=vetted.virtual_size, files=(str(path),))


def _declared(disk: ForeignDisk, path: Path) -> ImageFormat | None:
    if disk.format is None:
        return None
    fmt = _DISK_FORMATS.get(disk.format.lower())
    if fmt is None:
        raise InvalidInput(
            f"The disk '{path.name}' is a {disk.format.upper()} image, which Corral cannot "
            "import yet.",
            hint="Convert it to VMDK, VDI or raw first (e.g. 'VBoxManage clonemedium').",
        )
    return fmt


def _split_vmdk(limits: QemuImgLimits, path: Path, places: _Places) -> DiskSource:
    with _open_regular(path) as fd:
        size = os.fstat(fd).st_size
        if size > vmdk.MAX_DESCRIPTOR_BYTES:
            raise InvalidInput(f"The VMDK descriptor '{path.name}' is {size} bytes long; "
                               "descriptors are small.")
        text = os.pread(fd, size, 0)
    desc = vmdk.parse_descriptor(text)
    vmdk.check_importable(desc, path.name)
    if desc.create_type not in vmdk.SPLIT_CREATE_TYPES:
        raise UnsafeImage(
            f"The VMDK descriptor '{path.name}' has createType '{desc.create_type}', which "
            "a descriptor file never has.",
            hint="Re-export the disk from VMware.",
        )
    extents = places.check(desc.files, relative_to=path.parent)
    if len(set(extents)) != len(extents):
        raise UnsafeImage(f"The VMDK descriptor '{path.name}' names one extent file twice.")
    for extent, file in zip(desc.extents, extents, strict=True):
        # The core's inspection: no link, a regular file, no references of its own, and
        # sparse extents really sparse VMDK, flat ones really raw.
        inspect_image(file, ImageFormat.VMDK if extent.kind == "SPARSE" else ImageFormat.RAW)
    files = tuple(str(f) for f in extents)
    rendered = vmdk.render_descriptor(desc, files)
    source = DiskSource(path=str(path), format=ImageFormat.VMDK, virtual_size=desc.capacity,
                        files=files, descriptor=rendered)
    with tempfile.TemporaryDirectory(prefix="corral-vmdk-") as tmp:
        written = _write_descriptor(Path(tmp), rendered)
        info = qemu_img.info(written, ImageFormat.VMDK, limits)
        data = info.format_specific.get("data")
        read = {e.get("filename") for e in (data or {}).get("extents", []) if isinstance(e, dict)}
        if info.virtual_size != desc.capacity or not read <= set(files):
            raise UnsafeImage(
                f"qemu reads the VMDK '{path.name}' differently from Corral "
                f"({info.virtual_size} bytes from {sorted(map(str, read))}).",
                hint="Convert it to a single self-contained file with 'qemu-img convert' first.",
            )
        qemu_img.check(written, ImageFormat.VMDK, limits)
    return source


def _write_descriptor(folder: Path, text: str) -> Path:
    path = folder / "disk.vmdk"
    path.write_text(text)
    return path


@dataclass(frozen=True, slots=True)
class _Places:
    """Where an import may read: the machine's folder and what the user named."""

    folder: Path
    allowed: tuple[Path, ...]

    @classmethod
    def of(cls, folder: Path, allowed: Iterable[Path]) -> _Places:
        return cls(Path(folder).absolute(),
                   tuple(Path(a).absolute() for a in allowed))

    def check(self, references: Sequence[str], relative_to: Path) -> list[Path]:
        """The referenced files, refused if they, or where their links lead, lie outside."""
        located = vmdk.check_references(
            references, PurePosixPath(relative_to), PurePosixPath(self.folder),
            [PurePosixPath(a) for a in self.allowed],
        )
        roots = [os.path.realpath(self.folder), *(os.path.realpath(a) for a in self.allowed)]
        found = []
        for reference, path in zip(references, located, strict=True):
            real = os.path.realpath(path)
            if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
                raise UnsafeImage(
                    f"'{reference}' leads through a symbolic link to {real}, outside the "
                    f"machine's folder {self.folder}.",
                    hint=f"If that file is meant, name it with --allow-path {real}.",
                )
            found.append(Path(path))
        return found


@contextmanager
def _open_regular(path: Path) -> Iterator[int]:
    """A file opened read-only, refusing symbolic links and anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("disk file", str(path)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeImage(f"The disk '{path}' is a symbolic link; Corral opens only "
                              "regular files.", hint="Name the file it points to.") from None
        raise StorageError(f"Could not open '{path}': {exc.strerror}.") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeImage(f"The disk '{path}' is not a regular file.")
        yield fd
    finally:
        os.close(fd)


def convert_disk(source: dict[str, Any], dest: Path, limits: QemuImgLimits,
                 progress: Callable[[float], None] | None = None) -> None:
    """Convert a vetted disk (``DiskSource.to_args()``) into the new qcow2 ``dest``.

    Pre: ``dest`` does not exist. On failure it does not exist either. The output is
    qemu-img's own, so it is not checked again: the input was.
    """
    fmt = source["format"]
    if source["descriptor"] is None:
        qemu_img.convert(Path(source["source"]), fmt, dest, "qcow2", limits, progress)
        return
    with tempfile.TemporaryDirectory(prefix="corral-vmdk-") as tmp:
        written = _write_descriptor(Path(tmp), source["descriptor"])
        qemu_img.convert(written, fmt, dest, "qcow2", limits, progress)


def convert_into_pool(ctx: Context, handle: HostHandle, disk: dict[str, Any], dest: Path) -> None:
    """The ``disk.import`` step (registered in ``ops.steps``, which every process that
    recovers jobs loads): the vetted disk converted to a standalone qcow2 at ``dest``."""
    handle.storage.delete(dest)  # a crash may have left a partial one
    if handle.local:
        convert_disk(disk, dest, ctx.limits, ctx.on_progress)
        return
    # A remote host's pool is reached through libvirt only: convert here, then send the
    # qcow2 (sparse, verified by its checksum).
    with tempfile.TemporaryDirectory(dir=ctx.settings.state_dir, prefix="import-") as tmp:
        local = Path(tmp) / dest.name
        convert_disk(disk, local, ctx.limits, ctx.on_progress)
        try:
            send_file(local, file_sha256(local), handle.storage, dest)
        except BaseException:
            # Nothing resumes this copy (the conversion is redone): leave no marker behind.
            for leftover in (dest, partial_marker(dest)):
                try:
                    handle.storage.delete(leftover)
                except CorralError:
                    log.exception("could not remove %s from host %s", leftover,
                                  handle.host.name)
            raise



# -- the machine -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdentityChange:
    """One part of the machine's identity: the source's value and the machine's."""

    what: str
    """``uuid`` or ``mac``."""
    source: str | None
    """``None``: the source had none."""
    value: str

    @property
    def kept(self) -> bool:
        return self.source == self.value


@dataclass(frozen=True, slots=True)
class ImportResult:
    machine: Machine
    source: str
    """The file imported, as the user named it."""
    identity: tuple[IdentityChange, ...]
    changed: tuple[str, ...]
    """Settings carried over in another form, one sentence each."""
    dropped: tuple[str, ...]
    """Settings not carried over, one sentence each."""
    started: bool


@dataclass(frozen=True, slots=True)
class _Plan:
    machine: Machine
    disk: DiskSource
    kernel: Image | None
    identity: tuple[IdentityChange, ...]
    changed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def import_machine(
    ctx: Context,
    foreign: ForeignMachine,
    folder: Path,
    *,
    name: str | None = None,
    host: str | None = None,
    kernel_image: str | None = None,
    allowed_paths: Iterable[Path] = (),
    new_identity: bool = False,
    start: bool = True,
    project: str = DEFAULT_PROJECT,
    source: str | None = None,
) -> ImportResult:
    """Make ``foreign`` (read from a file in ``folder``) a Corral machine.

    ``kernel_image``: a library image whose kernel and initrd boot the machine, for disks
    without a boot loader Corral can use. ``allowed_paths``: files or folders outside
    ``folder`` that the machine's disks may read. ``source`` names the imported file in
    messages. Nothing is created when a check fails; a failure after that rolls back
    everything (disk, domain, record) and raises the original error.
    """
    local_host(ctx)
    plan = _plan(ctx, foreign, folder, name=name, host=host, kernel_image=kernel_image,
                 allowed_paths=allowed_paths, new_identity=new_identity, project=project)
    job = _write_job(ctx, plan)
    execute_job(ctx, job)
    machine = ctx.store.get_machine(plan.machine.name)
    started = False
    if start:
        try:
            lifecycle.start(ctx, machine.name)
            started = True
        except CorralError:
            # Like vm create: a machine that will not start is not left half-made.
            try:
                lifecycle.delete(ctx, machine.name, force=True)
            except CorralError:
                log.exception("could not delete %s, which did not start", machine.name)
            raise
    return ImportResult(
        machine=machine,
        source=source or foreign.name,
        identity=plan.identity,
        changed=tuple(plan.changed),
        dropped=tuple(plan.dropped),
        started=started,
    )


def machine_name(foreign_name: str) -> str:
    """A Corral name from a foreign display name: ``Web Server (2)`` -> ``web-server-2``."""
    slug = re.sub(r"[^a-z0-9]+", "-", foreign_name.lower()).strip("-")[:63].strip("-")
    return slug or "imported"


def _plan(
    ctx: Context,
    foreign: ForeignMachine,
    folder: Path,
    *,
    name: str | None,
    host: str | None,
    kernel_image: str | None,
    allowed_paths: Iterable[Path],
    new_identity: bool,
    project: str,
) -> _Plan:
    name = check_name(name or machine_name(foreign.name))
    if ctx.store.taken(names=[name]) or name in ctx.driver.domain_names():
        raise Conflict(f"A machine named '{name}' already exists.",
                       hint="Choose another name with --name.")
    if foreign.cpus < 1 or foreign.memory_bytes < 64 << 20:
        raise InvalidInput(f"'{foreign.name}' asks for {foreign.cpus} vCPUs and "
                           f"{format_size(foreign.memory_bytes)}; Corral needs at least 1 "
                           "vCPU and 64 MiB.")
    changed: list[str] = []
    dropped = list(foreign.dropped)
    if not foreign.disks:
        raise InvalidInput(f"'{foreign.name}' has no disk to import.")
    first, *others = foreign.disks
    dropped += [f"The disk '{d.path}' ({d.bus}) was not imported; a Corral machine has one "
                "disk, the first." for d in others]
    kernel = _kernel_image(ctx, kernel_image, project)
    disk = locate_disk(ctx.limits, folder, first, allowed_paths)
    if first.bus != _CORRAL_BUS:
        changed.append(f"The disk '{first.path}' moved from the {first.bus} bus to virtio; "
                       "the guest needs virtio drivers.")
    if foreign.firmware == "efi":
        boots = (f"boots the kernel of image '{kernel.name}'" if kernel is not None
                 else "boots from its disk with BIOS")
        dropped.append(f"The EFI firmware was not carried over; the machine {boots}.")
    elif kernel is not None:
        changed.append(f"The machine boots the kernel and initrd of image '{kernel.name}', "
                       "not a boot loader on its disk.")
    if foreign.nics:
        nic = foreign.nics[0]
        if nic.model and nic.model.lower() != _CORRAL_NIC:
            changed.append(f"The network card {nic.model} became a virtio one.")
        dropped += [f"A further network card ({n.model or 'unknown model'}"
                    f"{', ' + n.mac if n.mac else ''}) was not carried over; a Corral machine "
                    "has one." for n in foreign.nics[1:]]
    identity, changes = _identity(ctx, foreign, name, new_identity)
    handle = _place(ctx, name, foreign, disk, kernel, host)
    stem = f"{name}-{identity.uuid[:8]}"
    machine = Machine(
        name=name,
        identity=identity,
        host=handle.host.name,
        image=None,
        cpus=foreign.cpus,
        memory_bytes=foreign.memory_bytes,
        clone=None,
        disk_path=str(handle.storage.volume_path(stem)),
        seed_path=None,
        record_state=RecordState.PROVISIONING,
        managed=True,
        created_at=utcnow(),
        project=project,
        disk_bytes=disk.virtual_size,
        disk_claim=disk.virtual_size,
        placement=PlacementHints(host=host),
        kernel_image=kernel.name if kernel is not None else None,
    )
    require_quota(ctx, project, Usage.of(1, machine.cpus, machine.memory_bytes,
                                         machine.disk_claim))
    return _Plan(machine, disk, kernel, changes, changed, dropped)


def _kernel_image(ctx: Context, name: str | None, project: str) -> Image | None:
    if name is None:
        return None
    image = ctx.store.get_image(name)
    if image.project not in (None, project):
        raise NotFound("image", name)
    if image.kernel_boot is None:
        raise InvalidInput(f"Image '{name}' boots from its own disk: it has no kernel to lend.",
                           hint="Name an image imported with --kernel, such as 'appliance'.")
    return image


def _identity(ctx: Context, foreign: ForeignMachine, name: str,
              new: bool) -> tuple[Identity, tuple[IdentityChange, ...]]:
    source_mac = foreign.nics[0].mac if foreign.nics else None
    machine_uuid = foreign.uuid if foreign.uuid and not new else str(uuids.uuid4())
    mac = source_mac if source_mac and not new else None
    if not new:
        clashes = []
        if foreign.uuid and any(m.identity.uuid == foreign.uuid
                                for m in ctx.store.list_machines()):
            clashes.append(f"UUID {foreign.uuid}")
        if mac and ctx.store.taken(macs=[mac]):
            clashes.append(f"MAC {mac}")
        if clashes:
            raise Conflict(
                f"A machine in the inventory already has the {' and '.join(clashes)} of "
                f"'{foreign.name}'; importing it again would make two machines one.",
                hint="Add --new-identity to give the imported machine a UUID and MAC of its own.",
            )
    if mac is None:
        (mac,) = allocate_macs(1, lambda c: ctx.store.taken(macs=c))
    identity = Identity(uuid=machine_uuid, mac=mac, hostname=name,
                        instance_id=f"i-{machine_uuid}")
    changes = (IdentityChange("uuid", foreign.uuid, machine_uuid),
               IdentityChange("mac", source_mac, mac))
    return identity, changes


def _place(ctx: Context, name: str, foreign: ForeignMachine, disk: DiskSource,
           kernel: Image | None, host: str | None) -> HostHandle:
    """The host: the one named (it must exist), else the scheduler's choice."""
    from corral.ops import placement
    from corral.scheduler import Request, Resources

    request = Request(
        name=name,
        needs=Resources(foreign.cpus, foreign.memory_bytes, disk.virtual_size),
        image=kernel.name if kernel is not None else None,
        arch=kernel.arch if kernel is not None else "x86_64",
        accelerator=kernel.accelerator.value if kernel and kernel.accelerator else None,
    )
    inv = placement.inventory(ctx, only=host)
    chosen = placement.scheduler(ctx).place(inv, request)
    handle = ctx.on(chosen.host)
    if not handle.local and name in handle.driver.domain_names():
        raise Conflict(f"Host '{chosen.host}' already has a domain named '{name}'.",
                       hint="Choose another name with --name.")
    return handle


def _write_job(ctx: Context, plan: _Plan) -> Job:
    m = plan.machine
    on = {"host": m.host}
    steps = [PlannedStep("machine.record", machine_args(m))]
    if plan.kernel is not None:
        steps.append(PlannedStep("image.ensure", {**on, "image": plan.kernel.name}))
    steps += [
        PlannedStep("disk.import", {**on, "path": m.disk_path, "disk": plan.disk.to_args()}),
        PlannedStep("domain.define", {**on, "name": m.name, "uuid": m.identity.uuid}),
        PlannedStep("machine.ready", {"name": m.name}),
    ]
    check_steps(steps)
    recorded = [Step(s.name, StepState.DONE if i == 0 else StepState.PENDING, s.args)
                for i, s in enumerate(steps)]
    for _attempt in range(CLAIM_ATTEMPTS):
        try:
            # The record is written with the job: it is the machine's claim on the host.
            (job,) = ctx.store.create_claimed_jobs(
                [ClaimedJob(MACHINE_IMPORT.name, m, recorded)], ctx.owner, ctx.overcommit)
            return job
        except ClaimRefused:
            log.info("host %s filled up while %s was imported", m.host, m.name)
    raise InsufficientResources(
        f"Host '{m.host}' kept filling up while '{m.name}' was being imported.",
        hint="Try again, or name another host with --host.",
    )


# -- physical disks ----------------------------------------------------------------------


def import_disk(ctx: Context, path: Path, name: str, *, project: str | None = None) -> Image:
    """Capture a physical disk (a block device) or a raw image file into the library.

    A block device is read as raw bytes (no format to probe, nothing it could name); it
    must not be mounted, or the copy would be torn. A file must really be raw. The
    library keeps a read-only qcow2 of it, like any image.
    """
    check_name(name, what="image name")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotFound("disk", str(path)) from None
    if stat.S_ISREG(st.st_mode):
        with _open_regular(path) as fd:
            found = detect_format(os.pread(fd, _HEAD_BYTES, 0))
        if found is not ImageFormat.RAW:
            raise UnsafeImage(f"'{path.name}' is a {found} image, not a raw disk.",
                              hint="Import images of other formats with 'corral image import'.")
        return import_image(ctx, path, name=name, declared=ImageFormat.RAW, project=project)
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidInput(f"'{path}' is neither a block device nor a raw image file.")
    mounted = _mounted(st.st_rdev)
    if mounted:
        raise Conflict(f"'{path}' is mounted at {mounted}; its copy would be inconsistent.",
                       hint="Unmount it (or capture it from a rescue system), then try again.")
    if ctx.store.find_image(name) is not None:
        raise Conflict(f"An image named '{name}' already exists.",
                       hint="Choose another name with --name, or delete the old image first.")
    size = qemu_img.info(path, ImageFormat.RAW, ctx.limits).virtual_size
    stem = ctx.settings.image_dir / f"{name}-{os.urandom(4).hex()}"
    args = {
        "name": name,
        "source": str(path),
        "format": ImageFormat.RAW.value,
        "virtual_size": size,
        "paths": [f"{stem}.qcow2"],
        "extra_sources": [],
        "kernel_boot": None,
        "project": project,
    }
    from corral.ops.images import IMPORT

    job = prepare_job(ctx, IMPORT, name, [PlannedStep("image.convert", args),
                                          PlannedStep("image.record", args)], project=project)
    execute_job(ctx, job)
    return ctx.store.get_image(name)


def _mounted(device: int) -> str | None:
    """Where the block device ``device`` (st_rdev), or a partition of it, is mounted."""
    major, minor = os.major(device), os.minor(device)
    numbers = {f"{major}:{minor}"}
    sysfs = Path(f"/sys/dev/block/{major}:{minor}")
    if sysfs.exists():
        for part in sysfs.resolve().iterdir():
            dev = part / "dev"
            if (part / "partition").exists() and dev.exists():
                numbers.add(dev.read_text().strip())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[2] in numbers:
            return fields[4]
    return None


def bare_disk_machine(path: Path, fmt: str, *, memory_bytes: int = 256 << 20,
                      cpus: int = 1) -> ForeignMachine:
    """A machine made of one disk file and nothing else (``corral import vbox disk.vdi``)."""
    return ForeignMachine(
        name=path.name.split(".")[0], cpus=cpus, memory_bytes=memory_bytes,
        disks=(ForeignDisk(path=path.name, bus=_CORRAL_BUS, format=fmt),),
    )


def with_overrides(foreign: ForeignMachine, *, cpus: int | None,
                   memory_bytes: int | None) -> ForeignMachine:
    """``foreign`` with the user's vCPUs and memory instead of the file's, where given."""
    return replace(foreign, cpus=cpus or foreign.cpus,
                   memory_bytes=memory_bytes or foreign.memory_bytes)
