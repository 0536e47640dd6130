"""What the API reads and writes. Create schemas forbid unknown fields, so a client
cannot slip in an owner, a UUID or a disk path (mass assignment)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from corral.formats.snapshot_xml import ParsedSnapshot
from corral.model import (
    AuditEntry,
    CloneMode,
    Event,
    GroupPolicy,
    Host,
    HostState,
    Image,
    Job,
    Machine,
    Overcommit,
    PowerState,
    Project,
    Quota,
    RecordState,
    Role,
    Token,
    Usage,
    User,
)
from corral.model.machine import DiskUsage
from corral.ops.usage import PoolUsage

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
T = TypeVar("T")
MAX_ID = 2**63 - 1
"""Ids are 64-bit integers in every store; larger ones cannot exist (and would overflow)."""


def as_utc(value: datetime) -> datetime:
    """The store keeps naive UTC; the API says so, as RFC 3339 date-times require."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


Timestamp = Annotated[datetime, AfterValidator(as_utc)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next: str | None = Field(description="Pass as 'after' (or 'before') for the next page.")
    total: int | None = Field(default=None, description="Matching items in all pages.")


# -- hosts -----------------------------------------------------------------------------


class HostCapacity(BaseModel):
    threads: int = Field(description="Logical CPUs vCPUs may run on.")
    memory_bytes: int
    disk_bytes: int = Field(description="Capacity of the host's storage pool.")


class HostClaims(BaseModel):
    machines: int
    cpus: int = Field(description="vCPUs of the machines recorded on this host.")
    memory_bytes: int
    disk_bytes: int = Field(description="Pool bytes the machines' disks reserve.")


class HostOut(BaseModel):
    name: str
    uri: str
    state: HostState = Field(description="up; down when it stops answering; maintenance.")
    state_note: str = Field(description="Why the host is down or in maintenance.")
    up: bool = Field(description="Whether the state is up: new machines may go there.")
    last_seen: Timestamp | None = Field(description="When the host last answered.")
    accelerator: str
    accelerator_note: str
    cpu_model: str
    cpus: int
    memory_bytes: int
    cpu_score: float | None = Field(description="Single-thread speed; bigger is faster.")
    network: str
    pool_name: str
    pool_path: str
    tags: list[str]
    cpu_ratio: float = Field(description="Effective vCPU overcommit (vCPUs per thread).")
    memory_ratio: float
    disk_ratio: float
    capacity: HostCapacity
    claimed: HostClaims
    disk_bytes: int = Field(description="Capacity of the host's storage pool.")
    used_cpus: int = Field(description="vCPUs of the machines recorded on this host.")
    used_memory_bytes: int
    used_disk_bytes: int = Field(description="Pool bytes its machines' disks reserve.")
    machines: int

    @classmethod
    def of(cls, host: Host, *, claimed: Usage, default: Overcommit) -> HostOut:
        ratios = host.placement.ratios(default)
        return cls(
            name=host.name,
            uri=host.uri,
            state=host.state,
            state_note=host.state_note,
            up=host.state is HostState.UP,
            last_seen=host.last_seen,
            accelerator=host.accelerator.value,
            accelerator_note=host.accelerator_note,
            cpu_model=host.facts.cpu_model,
            cpus=host.facts.cpus,
            memory_bytes=host.facts.memory_bytes,
            cpu_score=host.cpu_score,
            network=host.network,
            pool_name=host.pool_name,
            pool_path=host.pool_path,
            tags=sorted(host.placement.tags),
            cpu_ratio=ratios.cpu,
            memory_ratio=ratios.memory,
            disk_ratio=ratios.disk,
            capacity=HostCapacity(threads=host.facts.cpus, memory_bytes=host.facts.memory_bytes,
                                  disk_bytes=host.disk_bytes),
            claimed=HostClaims(machines=claimed.machines, cpus=claimed.cpus,
                               memory_bytes=claimed.memory_bytes,
                               disk_bytes=claimed.disk_bytes),
            disk_bytes=host.disk_bytes,
            used_cpus=claimed.cpus,
            used_memory_bytes=claimed.memory_bytes,
            used_disk_bytes=claimed.disk_bytes,
            machines=claimed.machines,
        )


Tag = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")]
Ratio = Annotated[float, Field(gt=0, le=1000)]
RemoteUri = Annotated[str, StringConstraints(
    pattern=r"^qemu\+(tcp|tls|ssh)://[A-Za-z0-9.\-\[\]:@_]+/system$", max_length=500)]


class HostCreate(Strict):
    name: Name
    uri: RemoteUri = Field(description="The host's libvirt URI, e.g. qemu+tcp://10.0.0.2/system.")
    pool_path: Annotated[str, StringConstraints(pattern=r"^/[^\x00]*$", max_length=1000)] | None = (
        Field(default=None, description="null: /var/lib/libvirt/images/corral on the host."))
    network: Name | None = Field(default=None, description="null: the server's network name.")
    tags: list[Tag] = Field(default_factory=list, max_length=64)
    cpu_ratio: Ratio | None = Field(default=None, description="null: the global ratio.")
    memory_ratio: Ratio | None = None
    disk_ratio: Ratio | None = None
    accelerator: Literal["auto", "kvm", "tcg"] | None = Field(
        default=None, description="null: the server's setting.")


class HostUpdate(Strict):
    tags: list[Tag] | None = Field(default=None, max_length=64)
    cpu_ratio: Ratio | None = None
    memory_ratio: Ratio | None = None
    disk_ratio: Ratio | None = None


class Maintenance(Strict):
    on: bool


class HealthChangeOut(BaseModel):
    host: str
    before: HostState
    after: HostState
    note: str


class HealthReport(BaseModel):
    changes: list[HealthChangeOut]
    hosts: list[HostOut]


# -- images ----------------------------------------------------------------------------


class ImageOut(BaseModel):
    name: str
    project: str | None = Field(description="null: shared with every project.")
    source_format: str
    sha256: str
    virtual_size: int
    kernel_boot: bool
    created_at: Timestamp

    @classmethod
    def of(cls, image: Image) -> ImageOut:
        return cls(
            name=image.name,
            project=image.project,
            source_format=image.source_format.value,
            sha256=image.sha256,
            virtual_size=image.virtual_size,
            kernel_boot=image.kernel_boot is not None,
            created_at=image.created_at,
        )


# -- machines --------------------------------------------------------------------------


class MachineCreate(Strict):
    name: Name
    image: Name
    count: int = Field(default=1, ge=1, le=100, description="Names become NAME-1…NAME-N.")
    cpus: int = Field(default=1, ge=1, le=64)
    memory_bytes: int = Field(default=256 << 20, ge=64 << 20, le=1 << 40)
    disk_bytes: int | None = Field(
        default=None, ge=1 << 20, le=1 << 44, description="null: the image's virtual size."
    )
    clone: CloneMode = CloneMode.LINKED
    ssh_keys: list[Annotated[str, StringConstraints(max_length=8192)]] = Field(
        default_factory=list, max_length=16
    )
    start: bool = True
    project: Name | None = Field(default=None, description="null: the caller's own project.")
    host: Name | None = Field(default=None, description="Admins only: this host, no scheduling.")
    tags: list[Tag] = Field(default_factory=list, max_length=64,
                            description="The host must carry every one of these tags.")
    group: Name | None = Field(default=None, description="A placement group to join.")
    policy: GroupPolicy | None = Field(
        default=None, description="A new group's policy; null joins a group as it is.")
    soft: bool = Field(default=False, description="The group's policy is only a preference.")
    fast: bool = Field(default=False, description="Prefer the fastest single thread.")
    dry_run: bool = Field(default=False, description="Only say where each machine would go.")
    pool: Name | None = Field(
        default=None, description="A storage pool, which decides the host; null: the host's own.")


class PlacementOut(BaseModel):
    machine: str
    host: str
    score: float
    scores: dict[str, float]


class PlacementPlan(BaseModel):
    """A dry run: where each machine would go; nothing was created."""

    placements: list[PlacementOut]


class RefusalOut(BaseModel):
    filter: str
    key: str
    detail: str


class VerdictOut(BaseModel):
    host: str
    passed: bool
    total: float | None
    scores: dict[str, float]
    refusals: list[RefusalOut]


class RemovedOut(BaseModel):
    filter: str
    hosts: int


class NeedsOut(BaseModel):
    cpus: int
    memory_bytes: int
    disk_bytes: int


class ExplanationOut(BaseModel):
    """Every host's verdict for one machine, best first, then the refused by name."""

    machine: str
    needs: NeedsOut
    hosts: int
    passed: int
    best: str | None
    summary: str = Field(description="One sentence: the request, the hosts and the refusals.")
    hint: str | None
    removed: list[RemovedOut]
    verdicts: list[VerdictOut]
    lines: list[str] = Field(description="The per-host breakdown as plain-text rows.")


class MoveOut(BaseModel):
    machine: str
    source: str
    target: str
    reason: str
    spread_before: float
    spread_after: float


class RebalancePlan(BaseModel):
    """Migrations that would even out the load; a plan only, nothing moves."""

    moves: list[MoveOut]


class RebalanceRun(Strict):
    max_moves: int = Field(default=50, ge=1, le=1000, description="At most this many moves.")


class RebalanceAccepted(BaseModel):
    """Accepted: these moves are carried out one after another, each a job of its own
    (``migrate``, or ``migrate-live`` for a running machine). The plan is made again when
    the first move begins, so a pool that changed in between may move a little otherwise;
    a move that cannot be made is an event ``machine.move-failed`` and the rest go on."""

    moves: list[MoveOut]


class EvacuationMove(BaseModel):
    machine: str
    project: str
    live: bool = Field(description="It runs, so it moves live; a stopped machine moves cold.")


class EvacuationAccepted(BaseModel):
    """Accepted: the host is in maintenance, and each of its machines moves in turn to
    the host the scheduler picks then (a job each, ``migrate`` or ``migrate-live``); a
    move that cannot be made is an event ``machine.move-failed`` and the rest go on."""

    host: str
    state: HostState = Field(description="maintenance: nothing new goes there.")
    machines: list[EvacuationMove] = Field(description="The machines that will move.")


class MachineClone(Strict):
    name: Name
    clone: CloneMode = CloneMode.LINKED


class SnapshotCreate(Strict):
    name: Name
    description: str | None = Field(default=None, max_length=1000)


class SnapshotOut(BaseModel):
    name: str
    parent: str | None
    created_at: Timestamp
    state: str = Field(description="The machine's state when the snapshot was taken.")
    memory: bool = Field(description="Memory and devices are in it: a revert resumes the "
                                     "running machine.")
    description: str | None
    current: bool

    @classmethod
    def of(cls, s: ParsedSnapshot, current: str | None) -> SnapshotOut:
        return cls(name=s.name, parent=s.parent, created_at=s.created_at, state=s.state,
                   memory=s.with_memory, description=s.description, current=s.name == current)


class SnapshotClone(Strict):
    name: Name = Field(description="The new machine's name.")
    clone: CloneMode = Field(
        default=CloneMode.LINKED,
        description="linked: an overlay of the source's base when the source is a linked "
                    "clone (only the snapshot's own data is copied); full: standalone.")
    start: bool = Field(default=True, description="Start the new machine once it is made.")


class MachineMigrate(Strict):
    to: Name | None = Field(default=None, description="Target host; null: the scheduler's pick.")
    live: bool = Field(default=False, description="Move a running machine without stopping it.")


class UsageOut(BaseModel):
    virtual_size: int
    owned_bytes: int
    shared_bytes: int

    @classmethod
    def of(cls, usage: DiskUsage) -> UsageOut:
        return cls(
            virtual_size=usage.virtual_size,
            owned_bytes=usage.owned_bytes,
            shared_bytes=usage.shared_bytes,
        )


class MachineOut(BaseModel):
    name: str
    project: str
    host: str
    image: str | None
    cpus: int
    memory_bytes: int
    disk_bytes: int | None
    clone: CloneMode | None
    uuid: str
    mac: str | None
    hostname: str
    record_state: RecordState
    power: PowerState | None = Field(
        description="From the latest sweep of the host; null when the domain is missing."
    )
    managed: bool
    created_at: Timestamp

    @classmethod
    def of(cls, m: Machine, power: PowerState | None) -> MachineOut:
        return cls(
            name=m.name,
            project=m.project,
            host=m.host,
            image=m.image,
            cpus=m.cpus,
            memory_bytes=m.memory_bytes,
            disk_bytes=m.disk_bytes,
            clone=m.clone,
            uuid=m.identity.uuid,
            mac=m.identity.mac,
            hostname=m.identity.hostname,
            record_state=m.record_state,
            power=power,
            managed=m.managed,
            created_at=m.created_at,
        )


class MachineDetail(MachineOut):
    instance_id: str
    disk_path: str
    ssh_keys: int = Field(description="How many SSH keys its seed carries.")
    usage: UsageOut | None


# -- jobs and events -------------------------------------------------------------------


class StepOut(BaseModel):
    name: str
    state: str


class JobOut(BaseModel):
    id: int
    kind: str
    target: str
    project: str | None
    state: str
    progress: float = Field(ge=0, le=1)
    error: str | None
    steps: list[StepOut]
    created_at: Timestamp
    finished_at: Timestamp | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id,
            kind=job.kind,
            target=job.target,
            project=job.project,
            state=job.state.value,
            progress=job.progress,
            error=job.error,
            steps=[StepOut(name=s.name, state=s.state.value) for s in job.steps],
            created_at=job.created_at,
            finished_at=job.finished_at,
        )


class Accepted(BaseModel):
    """A long operation was accepted: follow its jobs at /jobs/{id} or /jobs/{id}/stream."""

    jobs: list[JobOut]


class EventOut(BaseModel):
    id: int
    at: Timestamp
    kind: str
    target: str
    project: str | None
    message: str

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(id=e.id, at=e.at, kind=e.kind, target=e.target, project=e.project,
                   message=e.message)


class AuditOut(BaseModel):
    id: int
    at: Timestamp
    actor: str
    action: str
    target: str
    status: int

    @classmethod
    def of(cls, a: AuditEntry) -> AuditOut:
        return cls(id=a.id, at=a.at, actor=a.actor, action=a.action, target=a.target,
                   status=a.status)


# -- accounts --------------------------------------------------------------------------


class Login(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=63)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class TokenCreate(Strict):
    name: Name = "api"
    expires_in: int | None = Field(
        default=None, ge=60, le=10 * 365 * 86400, description="Seconds; null: never expires."
    )


class TokenLogin(Login):
    token_name: Name = "cli"  # noqa: S105  (a label, not a secret)
    expires_in: int | None = Field(
        default=None, ge=60, le=10 * 365 * 86400, description="Seconds; null: never expires."
    )


class TokenOut(BaseModel):
    id: str
    user: str
    name: str
    created_at: Timestamp
    expires_at: Timestamp | None
    revoked_at: Timestamp | None

    @classmethod
    def of(cls, t: Token) -> TokenOut:
        return cls(id=t.id, user=t.user, name=t.name, created_at=t.created_at,
                   expires_at=t.expires_at, revoked_at=t.revoked_at)


class TokenIssued(TokenOut):
    token: str = Field(description="The secret; shown only in this answer.")

    @classmethod
    def issued(cls, t: Token, secret: str) -> TokenIssued:
        return cls(**TokenOut.of(t).model_dump(), token=secret)


class SessionOut(BaseModel):
    user: UserOut
    csrf_token: str | None = Field(description="Echo in X-CSRF-Token on cookie-made changes.")


class UserCreate(Strict):
    name: Name
    password: Annotated[str, StringConstraints(min_length=10, max_length=1024)]
    role: Role
    projects: list[Name] = Field(default_factory=list, max_length=100)


class UserUpdate(Strict):
    role: Role | None = None
    projects: list[Name] | None = Field(default=None, max_length=100)
    password: Annotated[str, StringConstraints(min_length=10, max_length=1024)] | None = None
    current_password: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="Needed to change one's own password."
    )


class UserOut(BaseModel):
    name: str
    role: Role
    projects: list[str]
    created_at: Timestamp

    @classmethod
    def of(cls, u: User) -> UserOut:
        return cls(name=u.name, role=u.role, projects=list(u.projects), created_at=u.created_at)


class QuotaIn(Strict):
    machines: int | None = Field(default=None, ge=0, le=1_000_000)
    cpus: int | None = Field(default=None, ge=0, le=100_000_000)
    memory_bytes: int | None = Field(default=None, ge=0, le=1 << 60)
    disk_bytes: int | None = Field(default=None, ge=0, le=1 << 60)

    def to_quota(self) -> Quota:
        return Quota(self.machines, self.cpus, self.memory_bytes, self.disk_bytes)


class ProjectCreate(Strict):
    name: Name
    quota: QuotaIn = Field(default_factory=QuotaIn)


class UsageCounts(BaseModel):
    machines: int
    cpus: int
    memory_bytes: int
    disk_bytes: int


class ProjectOut(BaseModel):
    name: str
    quota: QuotaIn
    usage: UsageCounts
    created_at: Timestamp

    @classmethod
    def of(cls, p: Project, used: Usage) -> ProjectOut:
        q = p.quota
        return cls(
            name=p.name,
            quota=QuotaIn(machines=q.machines, cpus=q.cpus, memory_bytes=q.memory_bytes,
                          disk_bytes=q.disk_bytes),
            usage=UsageCounts(machines=used.machines, cpus=used.cpus,
                              memory_bytes=used.memory_bytes, disk_bytes=used.disk_bytes),
            created_at=p.created_at,
        )


class MachineSpaceOut(BaseModel):
    name: str
    virtual_size: int
    owned_bytes: int = Field(description="Allocated to the machine's own files (USED).")
    shared_bytes: int = Field(description="Allocated to the bases it reads through.")
    base: str | None


class ImageSpaceOut(BaseModel):
    name: str
    virtual_size: int
    allocated_bytes: int


class PoolUsageOut(BaseModel):
    host: str
    pool: str
    path: str
    capacity_bytes: int
    used_bytes: int = Field(description="Allocated in the pool's filesystem by anyone.")
    available_bytes: int
    fill: float = Field(ge=0, le=1, description="used / (used + available), as df counts.")
    machines: list[MachineSpaceOut]
    images: list[ImageSpaceOut]
    unreadable: list[str] = Field(description="Machines or images whose files were unreadable.")

    @classmethod
    def of(cls, u: PoolUsage) -> PoolUsageOut:
        return cls(
            host=u.host, pool=u.pool, path=u.path, capacity_bytes=u.capacity_bytes,
            used_bytes=u.used_bytes, available_bytes=u.available_bytes, fill=u.fill,
            machines=[MachineSpaceOut(name=m.name, virtual_size=m.virtual_size,
                                      owned_bytes=m.owned_bytes, shared_bytes=m.shared_bytes,
                                      base=m.base) for m in u.machines],
            images=[ImageSpaceOut(name=i.name, virtual_size=i.virtual_size,
                                  allocated_bytes=i.allocated_bytes) for i in u.images],
            unreadable=u.unreadable,
        )


class PoolOut(BaseModel):
    name: str
    host: str
    type: str = Field(description="The corral.storage plugin: qcow2, btrfs, reflink…")
    path: str
    added: bool = Field(description="Added with POST /pools; false: a host's own pool.")
    capabilities: list[str] = Field(description="linked-clone, snapshot, thin-provisioning…")
    capacity_bytes: int | None = Field(
        description="The filesystem's size; a host's own pool: as its last probe measured it.")
    claimed_bytes: int = Field(description="What the machines' disks on it reserve.")
    free_bytes: int | None = Field(description="Capacity not yet claimed.")
    machines: list[str] = Field(description="Machines whose disks it holds.")
    images: list[str] = Field(description="Library images an added pool holds a copy of.")


class PoolCreate(Strict):
    name: Name
    type: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)] = Field(
        description="An absolute directory on the host the server runs on.")
