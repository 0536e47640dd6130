"""The store's one entry point: typed values in, typed values out.

Each method is one short transaction. Uniqueness (names, UUIDs, MACs) is enforced by
the database, so two processes racing for the same name cannot both win.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Engine,
    Row,
    Select,
    String,
    Table,
    bindparam,
    case,
    delete,
    func,
    select,
    type_coerce,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from corral.errors import Conflict, InsufficientResources, NotFound
from corral.model import (
    Accelerator,
    AuditEntry,
    CloneMode,
    Event,
    Host,
    HostFacts,
    HostPlacement,
    HostState,
    Identity,
    Image,
    ImageFormat,
    Job,
    JobState,
    KernelBoot,
    Machine,
    Overcommit,
    PlacementHints,
    Project,
    Quota,
    RecordState,
    Role,
    Step,
    StepState,
    StoragePool,
    Token,
    Usage,
    User,
)
from corral.model.units import format_size
from corral.store.db import make_engine, migrate
from corral.store.tables import (
    AuditRow,
    EventRow,
    HostImageRow,
    HostRow,
    ImageRow,
    JobRow,
    MachineRow,
    MembershipRow,
    ProjectRow,
    StepRow,
    StoragePoolRow,
    TokenRow,
    UserRow,
)


class _ChangeWatch:
    """SQLite's ``PRAGMA data_version`` on a connection of its own, which never writes:
    its value changes exactly when another connection has committed."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str) -> _ChangeWatch | None:
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return None
        return cls(sqlite3.connect(parsed.database, check_same_thread=False))

    def version(self) -> int:
        with self._lock:
            row = self._conn.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class MachineFilter:
    """Which machines a listing shows. ``projects=None`` means every project."""

    projects: Collection[str] | None = None
    host: str | None = None
    image: str | None = None
    state: RecordState | None = None
    name_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class HostLoad:
    """A host with what is claimed on it: one row of the scheduler's inventory."""

    host: Host
    used: Usage
    groups: dict[str, int]
    """Placement group -> how many of its machines the host holds."""
    images: frozenset[str]
    """Library images present (copied and verified) in the host's pool."""


@dataclass(frozen=True, slots=True)
class HostImage:
    host: str
    image: str
    path: str
    state: str
    """``copying`` or ``present``."""
    bytes_done: int
    owner: str | None


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job to write together with the machine it claims (see create_claimed_jobs)."""

    kind: str
    machine: Machine
    steps: Sequence[Step]


class ClaimRefused(InsufficientResources):
    """The host filled up between placement and claim; the caller places again."""


@dataclass(frozen=True, slots=True)
class TokenCredential:
    """What authenticating a token needs: its owner, its hash and its limits."""

    token: Token
    secret_sha256: str
    csrf: str | None
    user: User


class Store:
    def __init__(self, url: str) -> None:
        self.engine: Engine = make_engine(url)
        migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Reads take no write lock (SQLite: a deferred BEGIN; see store.db).
        self._read_engine = self.engine.execution_options(corral_read_only=True)
        self._readers = sessionmaker(self._read_engine, expire_on_commit=False)
        self._watch = _ChangeWatch.open(url)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self.engine.dispose()

    def data_version(self) -> int | None:
        """A number that changes whenever anyone, in any process, commits to the store.

        Read caches check it to stay exact. ``None`` where the database offers no such
        counter (PostgreSQL): then nothing may be cached.
        """
        return None if self._watch is None else self._watch.version()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._readers.begin() as session:
            yield session

    # -- hosts -------------------------------------------------------------------------

    def put_host(self, host: Host) -> None:
        """Enrol a host, or record what a new probe found; its state and tags are kept."""
        with self._tx() as s:
            row = s.get(HostRow, host.name)
            if row is None:
                s.add(_new_host_row(host))
            else:
                _probed_into(row, host)

    def add_host(self, host: Host) -> None:
        """Enrol a new host with its tags and ratios; Conflict if its name or URI is
        enrolled already."""
        try:
            with self._tx() as s:
                if s.get(HostRow, host.name) is not None:
                    raise Conflict(f"A host named '{host.name}' is already enrolled.",
                                   hint="Choose another name, or remove the old host first.")
                row = _new_host_row(host)
                row.cpu_ratio = host.placement.cpu_ratio
                row.memory_ratio = host.placement.memory_ratio
                row.disk_ratio = host.placement.disk_ratio
                s.add(row)
        except IntegrityError as exc:
            raise Conflict(f"A host with URI {host.uri} is already enrolled.",
                           hint="'corral host list' shows it under its name.") from exc

    def set_host_state(self, name: str, state: HostState, note: str = "", *,
                       seen: bool = False) -> None:
        with self._tx() as s:
            row = s.get(HostRow, name)
            if row is None:
                raise NotFound("host", name)
            row.state, row.state_note = state.value, note
            if seen:
                row.last_seen = utcnow()

    def set_host_placement(self, name: str, placement: HostPlacement) -> Host:
        with self._tx() as s:
            row = s.get(HostRow, name)
            if row is None:
                raise NotFound("host", name)
            row.tags = sorted(placement.tags)
            row.cpu_ratio = placement.cpu_ratio
            row.memory_ratio = placement.memory_ratio
            row.disk_ratio = placement.disk_ratio
            return _host(row)

    def delete_host(self, name: str) -> None:
        """Forget a host; refused while machines are recorded on it."""
        with self._tx() as s:
            if s.get(HostRow, name) is None:
                raise NotFound("host", name)
            held = list(s.scalars(select(MachineRow.name).where(MachineRow.host == name)
                                  .order_by(MachineRow.name).limit(4)))
            if held:
                more = ", …" if len(held) > 3 else ""
                raise Conflict(
                    f"Host '{name}' still holds machines: {', '.join(held[:3])}{more}.",
                    hint="Delete or move them first ('corral vm list --host NAME').",
                )
            pools = list(s.scalars(select(StoragePoolRow.name)
                                   .where(StoragePoolRow.host == name)
                                   .order_by(StoragePoolRow.name)))
            if pools:
                raise Conflict(
                    f"Host '{name}' still holds the storage pools {', '.join(pools)}.",
                    hint="Remove them first ('corral pool remove NAME').",
                )
            s.execute(delete(HostRow).where(HostRow.name == name))

    def get_host(self, name: str) -> Host:
        host = self.find_host(name)
        if host is None:
            raise NotFound("host", name, hint="'corral host list' shows the enrolled hosts.")
        return host

    def pool_snapshot(self) -> list[HostLoad]:
        """Every host with what is claimed on it, its groups and its images: what the
        scheduler's inventory is built from, in four queries whatever the pool's size."""
        with self._read() as s:
            # Plain rows, not ORM objects: a thousand hosts load in a third of the time.
            hosts = [_host(r) for r in s.execute(
                select(*HostRow.__table__.c).order_by(HostRow.name))]
            used = {
                r[0]: Usage(machines=r[1], cpus=r[2], memory_bytes=r[3], disk_bytes=r[4])
                for r in s.execute(
                    select(MachineRow.host, func.count(), func.sum(MachineRow.cpus),
                           func.sum(MachineRow.memory_bytes), func.sum(MachineRow.disk_claim))
                    .group_by(MachineRow.host)
                )
            }
            groups: dict[str, dict[str, int]] = {}
            for host, group, count in s.execute(
                select(MachineRow.host, MachineRow.placement_group, func.count())
                .where(MachineRow.placement_group.is_not(None))
                .group_by(MachineRow.host, MachineRow.placement_group)
            ):
                if group is not None:
                    groups.setdefault(host, {})[group] = count
            images: dict[str, set[str]] = {}
            for host, image in s.execute(
                select(HostImageRow.host, HostImageRow.image)
                .where(HostImageRow.state == "present")
            ):
                images.setdefault(host, set()).add(image)
        empty = Usage(0, 0, 0, 0)
        return [
            HostLoad(h, used.get(h.name, empty), groups.get(h.name, {}),
                     frozenset(images.get(h.name, ())))
            for h in hosts
        ]

    def group_policy(self, group: str) -> PlacementHints | None:
        """The hints of a placement group's first machine: what its policy is."""
        with self._read() as s:
            row = s.scalars(select(MachineRow.placement)
                            .where(MachineRow.placement_group == group).limit(1)).first()
        return None if row is None else PlacementHints.from_json(row, group)

    # -- images on hosts -----------------------------------------------------------------

    def host_image(self, host: str, image: str) -> HostImage | None:
        with self._read() as s:
            row = s.get(HostImageRow, (host, image))
            return None if row is None else _host_image(row)

    def take_host_image(self, host: str, image: str, path: str, owner: str,
                        *, unless_owner: Callable[[str], bool]) -> HostImage:
        """Become the copier of ``image`` to ``host``, unless it is there already or a
        live process is copying it (``unless_owner(owner)`` says whether one is alive).

        Returns the row as it is after the call: its owner says who copies it.
        """
        with self._tx() as s:
            row = s.get(HostImageRow, (host, image), with_for_update=True)
            if row is None:
                row = HostImageRow(host=host, image=image, path=path, state="copying",
                                   bytes_done=0, owner=owner, updated_at=utcnow())
                s.add(row)
            elif row.state == "copying" and (row.owner is None or not unless_owner(row.owner)):
                row.owner, row.updated_at = owner, utcnow()
            return _host_image(row)

    def host_image_progress(self, host: str, image: str, bytes_done: int) -> None:
        with self._tx() as s:
            s.execute(update(HostImageRow)
                      .where(HostImageRow.host == host, HostImageRow.image == image)
                      .values(bytes_done=bytes_done, updated_at=utcnow()))

    def host_image_present(self, host: str, image: str) -> None:
        with self._tx() as s:
            s.execute(update(HostImageRow)
                      .where(HostImageRow.host == host, HostImageRow.image == image)
                      .values(state="present", owner=None, updated_at=utcnow()))

    def drop_host_image(self, host: str, image: str) -> None:
        with self._tx() as s:
            s.execute(delete(HostImageRow)
                      .where(HostImageRow.host == host, HostImageRow.image == image))

    def find_host(self, name: str) -> Host | None:
        with self._read() as s:
            row = s.get(HostRow, name)
            return None if row is None else _host(row)

    def list_hosts(self) -> list[Host]:
        with self._read() as s:
            return [_host(r) for r in s.scalars(select(HostRow).order_by(HostRow.name))]

    # -- images ------------------------------------------------------------------------

    def add_image(self, image: Image) -> None:
        row = ImageRow(
            name=image.name,
            path=image.path,
            source_format=image.source_format.value,
            sha256=image.sha256,
            virtual_size=image.virtual_size,
            kernel=image.kernel_boot.kernel if image.kernel_boot else None,
            initrd=image.kernel_boot.initrd if image.kernel_boot else None,
            cmdline=image.kernel_boot.cmdline if image.kernel_boot else None,
            created_at=image.created_at,
            project=image.project,
            arch=image.arch,
            accelerator=image.accelerator.value if image.accelerator else None,
        )
        try:
            with self._tx() as s:
                s.add(row)
        except IntegrityError as exc:
            raise Conflict(
                f"An image named '{image.name}' already exists.",
                hint="Choose another name with --name, or delete the old image first.",
            ) from exc

    def find_image(self, name: str) -> Image | None:
        with self._read() as s:
            row = s.get(ImageRow, name)
            return None if row is None else _image(row)

    def get_image(self, name: str) -> Image:
        image = self.find_image(name)
        if image is None:
            raise NotFound("image", name, hint="'corral image list' shows the library.")
        return image

    def list_images(self, projects: Collection[str] | None = None) -> list[Image]:
        """Every image, or the shared ones plus those of ``projects``."""
        with self._read() as s:
            q = select(ImageRow).order_by(ImageRow.name)
            if projects is not None:
                q = q.where(ImageRow.project.is_(None) | ImageRow.project.in_(list(projects)))
            return [_image(r) for r in s.scalars(q)]

    def delete_image(self, name: str) -> None:
        try:
            with self._tx() as s:
                s.execute(delete(ImageRow).where(ImageRow.name == name))
        except IntegrityError as exc:
            users = ", ".join(self.machines_using_image(name))
            raise Conflict(f"Image '{name}' is still used by: {users}.") from exc

    def machines_using_image(self, name: str) -> list[str]:
        with self._read() as s:
            q = (select(MachineRow.name)
                 .where((MachineRow.image == name) | (MachineRow.kernel_image == name))
                 .order_by(MachineRow.name))
            return list(s.scalars(q))

    # -- storage pools -----------------------------------------------------------------

    def add_storage_pool(self, pool: StoragePool) -> None:
        row = StoragePoolRow(name=pool.name, type=pool.type, host=pool.host, path=pool.path,
                             created_at=pool.created_at or utcnow())
        try:
            with self._tx() as s:
                if s.get(HostRow, pool.host) is None:
                    raise NotFound("host", pool.host)
                s.add(row)
        except IntegrityError as exc:
            raise Conflict(
                f"A storage pool named '{pool.name}', or one at {pool.path}, already exists.",
                hint="'corral pool list' shows the pools.",
            ) from exc

    def find_storage_pool(self, name: str) -> StoragePool | None:
        with self._read() as s:
            row = s.get(StoragePoolRow, name)
            return None if row is None else _storage_pool(row)

    def list_storage_pools(self, host: str | None = None) -> list[StoragePool]:
        with self._read() as s:
            q = select(StoragePoolRow).order_by(StoragePoolRow.name)
            if host is not None:
                q = q.where(StoragePoolRow.host == host)
            return [_storage_pool(r) for r in s.scalars(q)]

    def delete_storage_pool(self, name: str) -> None:
        """Forget a pool; refused while a machine's disk is recorded in it."""
        with self._tx() as s:
            if s.get(StoragePoolRow, name) is None:
                raise NotFound("storage pool", name)
            held = list(s.scalars(select(MachineRow.name)
                                  .where(MachineRow.storage_pool == name)
                                  .order_by(MachineRow.name).limit(4)))
            if held:
                more = ", …" if len(held) > 3 else ""
                raise Conflict(
                    f"Storage pool '{name}' still holds the disks of {', '.join(held[:3])}"
                    f"{more}.",
                    hint="Delete those machines first ('corral vm list').",
                )
            s.execute(delete(StoragePoolRow).where(StoragePoolRow.name == name))

    # -- machines ----------------------------------------------------------------------

    def add_machine(self, machine: Machine, overcommit: Overcommit | None = None) -> None:
        """Record a machine; Conflict if its name, UUID or MAC is taken.

        The project's quota is checked in the same transaction as the insert, with the
        project row locked, so concurrent creations can never exceed it together. With
        ``overcommit``, the record is also the machine's claim on its host: the host row
        is locked and its capacity checked the same way (ClaimRefused if it is full).
        """
        try:
            with self._tx() as s:
                _insert_machine(s, machine, overcommit)
        except IntegrityError as exc:
            raise _name_taken(machine.name) from exc

    def create_claimed_jobs(
        self, jobs: Sequence[ClaimedJob], owner: str, overcommit: Overcommit
    ) -> list[Job]:
        """Claim every machine on its host and write its job, all in one transaction.

        Either the whole batch is claimed or nothing is (ClaimRefused, QuotaExceeded,
        Conflict). Each job's first step, the record, is written done: the record is
        the claim.
        """
        created = utcnow()
        try:
            with self._tx() as s:
                made = []
                for job in jobs:
                    _insert_machine(s, job.machine, overcommit)
                    job_id = s.execute(
                        _INSERT_JOB,
                        dict(kind=job.kind, target=job.machine.name, owner=owner,
                             state=JobState.PENDING.value, created_at=created,
                             project=job.machine.project),
                    ).scalar_one()
                    s.execute(_INSERT_STEPS, [
                        dict(job_id=job_id, position=i, name=st.name, state=st.state.value,
                             args=st.args)
                        for i, st in enumerate(job.steps)
                    ])
                    made.append(Job(id=job_id, kind=job.kind, target=job.machine.name,
                                    state=JobState.PENDING, owner=owner,
                                    steps=tuple(job.steps), error=None, created_at=created,
                                    finished_at=None, project=job.machine.project))
                return made
        except IntegrityError as exc:
            names = ", ".join(j.machine.name for j in jobs)
            raise _name_taken(names) from exc

    def host_claims(self, host: str) -> Usage:
        """What the machines recorded on ``host`` claim together."""
        with self._read() as s:
            return _host_claims(s, host)

    def find_machine(self, name: str) -> Machine | None:
        with self._read() as s:
            row = s.get(MachineRow, name)
            return None if row is None else _machine(row)

    def get_machine(self, name: str) -> Machine:
        machine = self.find_machine(name)
        if machine is None:
            raise NotFound("machine", name, hint="'corral vm list' shows the inventory.")
        return machine

    def list_machines(
        self,
        host: str | None = None,
        *,
        where: MachineFilter | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[Machine]:
        """Machines in name order; ``after`` and ``limit`` page through them (keyset).

        Reads plain rows rather than ORM objects: this is the API's busiest query,
        and loading objects costs it five times as much.
        """
        where = where or MachineFilter(host=host)
        with self._read() as s:
            q = _filtered(select(MachineRow), where).order_by(MachineRow.name)
            if after is not None:
                q = q.where(MachineRow.name > after)
            if limit is not None:
                q = q.limit(limit)
            rows = s.execute(q.with_only_columns(*MachineRow.__table__.c)).all()
            return [_machine(r) for r in rows]

    def machine_summaries(
        self, where: MachineFilter, *, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """One page of machines as plain rows for listings, keyed as the API shows them.

        The API's busiest query skips the typed ``Machine`` on purpose: building a
        hundred frozen dataclasses costs more than the query itself.
        """
        t = MachineRow
        q = select(
            t.name, t.project, t.host, t.image, t.cpus, t.memory_bytes, t.disk_bytes,
            t.clone_mode.label("clone"), t.uuid, t.mac, t.hostname, t.record_state, t.managed,
            # As stored, not parsed: SQLAlchemy's SQLite datetime parsing is most of the cost.
            type_coerce(t.created_at, String).label("created_at"),
        )
        q = _filtered(q, where).order_by(t.name).limit(limit)
        if after is not None:
            q = q.where(t.name > after)
        with self._read_engine.connect() as conn:
            rows = [r._asdict() for r in conn.execute(q)]
        for row in rows:
            row["created_at"] = _iso(row["created_at"])
        return rows

    def count_machines(self, where: MachineFilter) -> int:
        with self._read() as s:
            return s.scalar(_filtered(select(func.count()).select_from(MachineRow), where)) or 0

    def taken(self, *, names: Iterable[str] = (), macs: Iterable[str] = ()) -> set[str]:
        """Which of these names and MACs are already recorded."""
        with self._read() as s:
            found = set(s.scalars(select(MachineRow.name).where(MachineRow.name.in_(list(names)))))
            q = select(MachineRow.mac).where(MachineRow.mac.in_(list(macs)))
            return found | {mac for mac in s.scalars(q) if mac is not None}

    def set_machine_state(self, name: str, state: RecordState) -> None:
        with self._tx() as s:
            s.execute(
                update(MachineRow).where(MachineRow.name == name).values(record_state=state.value)
            )

    def move_machine(self, moved: Machine, overcommit: Overcommit | None) -> None:
        """Record that the machine (same name and UUID) now lives on ``moved.host`` with
        ``moved``'s files: its claim moves with it. Idempotent.

        With ``overcommit``, the target host row is locked and its capacity checked
        without the machine's own claim (ClaimRefused if it cannot hold it); ``None``
        records a move that already happened, whatever the room.
        """
        with self._tx() as s:
            row = s.execute(
                select(MachineRow.host).where(
                    MachineRow.name == moved.name, MachineRow.uuid == moved.identity.uuid
                ).with_for_update()
            ).first()
            if row is None:
                raise NotFound("machine", moved.name)
            if row.host == moved.host:
                return
            if overcommit is not None:
                _claim(s, moved, overcommit)
            s.execute(
                update(MachineRow).where(MachineRow.name == moved.name).values(
                    host=moved.host, disk_path=moved.disk_path, seed_path=moved.seed_path,
                )
            )

    def record_owned_bytes(self, owned: dict[str, int]) -> None:
        """What each named machine's disk owns, just measured (quotas count it)."""
        if not owned:
            return
        with self._tx() as s:
            for name, value in owned.items():
                s.execute(update(MachineRow).where(MachineRow.name == name)
                          .values(owned_bytes=value))

    def forget_machine(self, name: str, uuid: str) -> None:
        """Delete the record of this machine, never a namesake. Idempotent."""
        with self._tx() as s:
            s.execute(delete(MachineRow).where(MachineRow.name == name, MachineRow.uuid == uuid))

    # -- jobs --------------------------------------------------------------------------

    def create_job(
        self,
        kind: str,
        target: str,
        owner: str,
        steps: Sequence[Step],
        *,
        project: str | None = None,
        exclusive: bool = False,
    ) -> Job:
        """Write a job and all its steps, pending, before any step runs.

        ``exclusive``: Conflict if a job on the same target is pending or running; the
        target machine's row is locked first, so two such requests cannot both pass.
        """
        with self._tx() as s:
            if exclusive:
                s.execute(select(MachineRow.name).where(MachineRow.name == target)
                          .with_for_update())
                busy = s.scalars(select(JobRow).where(
                    JobRow.target == target,
                    JobRow.state.in_([JobState.PENDING.value, JobState.RUNNING.value]),
                ).limit(1)).first()
                if busy is not None:
                    raise Conflict(f"'{target}' is busy with job {busy.id} ({busy.kind}).",
                                   hint=f"Wait for it to end: corral job show {busy.id}.")
            row = JobRow(
                kind=kind,
                target=target,
                owner=owner,
                state=JobState.PENDING.value,
                created_at=utcnow(),
                project=project,
            )
            row.steps = [
                StepRow(position=i, name=st.name, state=st.state.value, args=st.args)
                for i, st in enumerate(steps)
            ]
            s.add(row)
            s.flush()
            return _job(row)

    def set_step_state(self, job_id: int, position: int, state: StepState) -> None:
        with self._tx() as s:
            s.execute(
                update(StepRow)
                .where(StepRow.job_id == job_id, StepRow.position == position)
                .values(state=state.value)
            )

    def advance_job(self, job_id: int, *, done: int | None, started: int | None) -> None:
        """Mark one step done and the next started in one transaction (one fsync)."""
        with self._tx() as s:
            for position, state in ((done, StepState.DONE), (started, StepState.STARTED)):
                if position is not None:
                    s.execute(
                        update(StepRow)
                        .where(StepRow.job_id == job_id, StepRow.position == position)
                        .values(state=state.value)
                    )

    def start_job(self, job_id: int) -> None:
        with self._tx() as s:
            s.execute(
                update(JobRow).where(JobRow.id == job_id).values(state=JobState.RUNNING.value)
            )

    def finish_job(self, job_id: int, state: JobState, error: str | None = None) -> None:
        with self._tx() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(state=state.value, error=error, finished_at=utcnow())
            )

    def get_job(self, job_id: int) -> Job:
        with self._read() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound("job", str(job_id), called="with id")
            return _job(row)

    def list_jobs(
        self,
        state: JobState | Collection[JobState] | None = None,
        limit: int = 50,
        *,
        projects: Collection[str] | None = None,
        target: str | None = None,
        before: int | None = None,
    ) -> list[Job]:
        """Newest first; ``before`` pages back by id. ``projects=None``: every job."""
        with self._read() as s:
            q = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
            if isinstance(state, JobState):
                q = q.where(JobRow.state == state.value)
            elif state is not None:
                q = q.where(JobRow.state.in_([st.value for st in state]))
            if projects is not None:
                q = q.where(JobRow.project.in_(list(projects)))
            if target is not None:
                q = q.where(JobRow.target == target)
            if before is not None:
                q = q.where(JobRow.id < before)
            return [_job(r) for r in s.scalars(q)]

    def jobs_with_leftovers(self, limit: int = 100) -> list[Job]:
        """Rolled-back jobs with a step whose compensation has not succeeded yet (its
        host was unreachable, say): recovery tries those again."""
        with self._read() as s:
            unfinished = select(StepRow.job_id).where(
                StepRow.job_id == JobRow.id,
                StepRow.state.in_([StepState.STARTED.value, StepState.DONE.value]),
            ).exists()
            q = (select(JobRow).where(JobRow.state == JobState.ROLLED_BACK.value, unfinished)
                 .order_by(JobRow.id).limit(limit))
            return [_job(r) for r in s.scalars(q)]

    # -- projects ----------------------------------------------------------------------

    def add_project(self, name: str, quota: Quota) -> Project:
        try:
            with self._tx() as s:
                row = ProjectRow(name=name, created_at=utcnow(), **_quota_columns(quota))
                s.add(row)
                s.flush()
                return _project(row)
        except IntegrityError as exc:
            raise Conflict(f"A project named '{name}' already exists.") from exc

    def get_project(self, name: str) -> Project:
        with self._read() as s:
            row = s.get(ProjectRow, name)
            if row is None:
                raise NotFound("project", name)
            return _project(row)

    def list_projects(self, names: Collection[str] | None = None) -> list[Project]:
        with self._read() as s:
            q = select(ProjectRow).order_by(ProjectRow.name)
            if names is not None:
                q = q.where(ProjectRow.name.in_(list(names)))
            return [_project(r) for r in s.scalars(q)]

    def set_quota(self, name: str, quota: Quota) -> Project:
        with self._tx() as s:
            row = s.get(ProjectRow, name)
            if row is None:
                raise NotFound("project", name)
            for column, value in _quota_columns(quota).items():
                setattr(row, column, value)
            return _project(row)

    def delete_project(self, name: str) -> None:
        with self._tx() as s:
            row = s.get(ProjectRow, name)
            if row is None:
                raise NotFound("project", name)
            held = s.scalar(
                select(func.count()).select_from(MachineRow).where(MachineRow.project == name)
            ) or 0
            images = s.scalar(
                select(func.count()).select_from(ImageRow).where(ImageRow.project == name)
            ) or 0
            if held or images:
                raise Conflict(
                    f"Project '{name}' still owns {held} machine(s) and {images} image(s).",
                    hint="Delete them first.",
                )
            s.delete(row)

    def project_usage(self, name: str) -> Usage:
        with self._read() as s:
            return _usage(s, project=name)

    def host_usage(self, name: str) -> Usage:
        with self._read() as s:
            return _usage(s, host=name)

    # -- users and tokens --------------------------------------------------------------

    def add_user(
        self, name: str, password_hash: str, role: Role, projects: Collection[str]
    ) -> User:
        try:
            with self._tx() as s:
                _require_projects(s, projects)
                row = UserRow(
                    name=name, password_hash=password_hash, role=role.value, created_at=utcnow()
                )
                row.memberships = [MembershipRow(user=name, project=p) for p in sorted(projects)]
                s.add(row)
                s.flush()
                return _user(row)
        except IntegrityError as exc:
            raise Conflict(f"A user named '{name}' already exists.") from exc

    def get_user(self, name: str) -> User:
        with self._read() as s:
            row = s.get(UserRow, name)
            if row is None:
                raise NotFound("user", name)
            return _user(row)

    def password_hash(self, name: str) -> str | None:
        with self._read() as s:
            return s.scalar(select(UserRow.password_hash).where(UserRow.name == name))

    def list_users(self) -> list[User]:
        with self._read() as s:
            return [_user(r) for r in s.scalars(select(UserRow).order_by(UserRow.name))]

    def update_user(
        self,
        name: str,
        *,
        role: Role | None = None,
        projects: Collection[str] | None = None,
        password_hash: str | None = None,
    ) -> User:
        with self._tx() as s:
            row = s.get(UserRow, name)
            if row is None:
                raise NotFound("user", name)
            if role is not None:
                row.role = role.value
            if password_hash is not None:
                row.password_hash = password_hash
            if projects is not None:
                _require_projects(s, projects)
                row.memberships = [MembershipRow(user=name, project=p) for p in sorted(projects)]
            s.flush()
            return _user(row)

    def delete_user(self, name: str) -> None:
        with self._tx() as s:
            row = s.get(UserRow, name)
            if row is None:
                raise NotFound("user", name)
            s.delete(row)

    def add_token(
        self,
        token: Token,
        secret_sha256: str,
        csrf: str | None = None,
    ) -> None:
        with self._tx() as s:
            s.add(
                TokenRow(
                    id=token.id,
                    user=token.user,
                    name=token.name,
                    secret_sha256=secret_sha256,
                    csrf=csrf,
                    created_at=token.created_at,
                    expires_at=token.expires_at,
                    revoked_at=token.revoked_at,
                )
            )

    def token_credential(self, token_id: str) -> TokenCredential | None:
        """On the hot path of every authenticated request: two indexed reads, no objects."""
        with self._read() as s:
            row = s.execute(
                select(*TokenRow.__table__.c, UserRow.role, UserRow.created_at.label("since"))
                .join(UserRow, UserRow.name == TokenRow.user)
                .where(TokenRow.id == token_id)
            ).first()
            if row is None:
                return None
            projects = s.scalars(
                select(MembershipRow.project).where(MembershipRow.user == row.user)
            ).all()
            user = User(name=row.user, role=Role(row.role), projects=tuple(projects),
                        created_at=row.since)
            return TokenCredential(_token(row), row.secret_sha256, row.csrf, user)

    def list_tokens(self, user: str | None = None) -> list[Token]:
        with self._read() as s:
            q = select(TokenRow).where(TokenRow.csrf.is_(None)).order_by(TokenRow.created_at)
            if user is not None:
                q = q.where(TokenRow.user == user)
            return [_token(r) for r in s.scalars(q)]

    def revoke_token(self, token_id: str) -> Token:
        with self._tx() as s:
            row = s.get(TokenRow, token_id)
            if row is None:
                raise NotFound("token", token_id, called="with id")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return _token(row)

    def revoke_sessions(self, user: str, *, keep: str | None = None) -> None:
        """End every browser session of ``user`` but ``keep``; API tokens stay."""
        with self._tx() as s:
            s.execute(
                update(TokenRow)
                .where(TokenRow.user == user, TokenRow.csrf.is_not(None),
                       TokenRow.revoked_at.is_(None), TokenRow.id != (keep or ""))
                .values(revoked_at=utcnow())
            )

    # -- audit log and events ----------------------------------------------------------

    def add_audit(self, actor: str, action: str, target: str, status: int) -> None:
        with self._tx() as s:
            s.add(AuditRow(at=utcnow(), actor=actor, action=action, target=target, status=status))

    def list_audit(self, *, limit: int = 100, before: int | None = None,
                   actor: str | None = None) -> list[AuditEntry]:
        with self._read() as s:
            q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
            if before is not None:
                q = q.where(AuditRow.id < before)
            if actor is not None:
                q = q.where(AuditRow.actor == actor)
            return [
                AuditEntry(r.id, r.at, r.actor, r.action, r.target, r.status) for r in s.scalars(q)
            ]

    def add_event(self, kind: str, target: str, message: str, project: str | None) -> None:
        with self._tx() as s:
            s.add(EventRow(at=utcnow(), kind=kind, target=target, project=project,
                           message=message))

    def list_events(
        self,
        *,
        projects: Collection[str] | None = None,
        target: str | None = None,
        after: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """Newest first, or oldest first when following with ``after``."""
        with self._read() as s:
            q = select(EventRow).limit(limit)
            q = q.order_by(EventRow.id if after is not None else EventRow.id.desc())
            if projects is not None:
                q = q.where(EventRow.project.in_(list(projects)))
            if target is not None:
                q = q.where(EventRow.target == target)
            if after is not None:
                q = q.where(EventRow.id > after)
            if before is not None:
                q = q.where(EventRow.id < before)
            return [
                Event(r.id, r.at, r.kind, r.target, r.project, r.message) for r in s.scalars(q)
            ]


def _new_host_row(host: Host) -> HostRow:
    row = HostRow(name=host.name, enrolled_at=utcnow(), state=host.state.value,
                  state_note=host.state_note, tags=sorted(host.placement.tags))
    _probed_into(row, host)
    return row


def _probed_into(row: HostRow, host: Host) -> None:
    """What a probe finds about a host; its state, tags and ratios are the operators'."""
    row.uri = host.uri
    row.facts = {
        "hostname": host.facts.hostname,
        "arch": host.facts.arch,
        "cpu_model": host.facts.cpu_model,
        "cpus": host.facts.cpus,
        "memory_bytes": host.facts.memory_bytes,
        "hypervisor": host.facts.hypervisor,
        "hypervisor_version": host.facts.hypervisor_version,
        "sockets": host.facts.sockets,
        "cores": host.facts.cores,
        "threads": host.facts.threads,
    }
    row.accelerator = host.accelerator.value
    row.accelerator_note = host.accelerator_note
    row.pool_name = host.pool_name
    row.pool_path = host.pool_path
    row.network = host.network
    row.disk_bytes = host.disk_bytes
    row.cpu_score = host.cpu_score
    row.last_seen = host.last_seen


def _host(row: HostRow | Row[*tuple[Any, ...]]) -> Host:
    return Host(
        name=row.name,
        uri=row.uri,
        facts=HostFacts(**row.facts),
        accelerator=Accelerator(row.accelerator),
        accelerator_note=row.accelerator_note,
        pool_name=row.pool_name,
        pool_path=row.pool_path,
        network=row.network,
        disk_bytes=row.disk_bytes,
        cpu_score=row.cpu_score,
        state=HostState(row.state),
        state_note=row.state_note,
        last_seen=row.last_seen,
        placement=HostPlacement(
            tags=frozenset(row.tags),
            cpu_ratio=row.cpu_ratio,
            memory_ratio=row.memory_ratio,
            disk_ratio=row.disk_ratio,
        ),
    )


def _name_taken(names: str) -> Conflict:
    return Conflict(f"A machine named '{names}' already exists.",
                    hint="Choose another name, or delete the old machine first.")


def _insert_machine(s: Session, machine: Machine, overcommit: Overcommit | None) -> None:
    if overcommit is not None:
        _claim(s, machine, overcommit)
    row = s.execute(_PROJECT_QUOTA, {"project": machine.project}).first()
    if row is None:
        raise NotFound("project", machine.project)
    quota = Quota(*row)
    if not quota.unlimited:  # summing a big project's usage costs more than the insert
        asked = Usage.of(1, machine.cpus, machine.memory_bytes, machine.disk_claim)
        quota.require_room(machine.project, _usage(s, project=machine.project), asked)
    s.execute(_INSERT_MACHINE, _machine_values(machine))


# The claim path runs once per placed machine: its statements are built once, here.
_MACHINES = cast(Table, MachineRow.__table__)
_HOST_CLAIMS = select(
    func.count(), func.coalesce(func.sum(MachineRow.cpus), 0),
    func.coalesce(func.sum(MachineRow.memory_bytes), 0),
    func.coalesce(func.sum(MachineRow.disk_claim), 0),
).where(MachineRow.host == bindparam("host"))
_HOST_FOR_CLAIM = select(
    HostRow.facts, HostRow.disk_bytes, HostRow.cpu_ratio, HostRow.memory_ratio,
    HostRow.disk_ratio,
).where(HostRow.name == bindparam("host")).with_for_update()
_PROJECT_QUOTA = select(
    ProjectRow.quota_machines, ProjectRow.quota_cpus, ProjectRow.quota_memory_bytes,
    ProjectRow.quota_disk_bytes,
).where(ProjectRow.name == bindparam("project")).with_for_update()
_INSERT_MACHINE = _MACHINES.insert()
_INSERT_JOB = cast(Table, JobRow.__table__).insert().returning(JobRow.id)
_INSERT_STEPS = cast(Table, StepRow.__table__).insert()


def _host_claims(s: Session, host: str) -> Usage:
    row = s.execute(_HOST_CLAIMS, {"host": host}).one()
    return Usage(machines=row[0], cpus=row[1], memory_bytes=row[2], disk_bytes=row[3])


def _claim(s: Session, m: Machine, overcommit: Overcommit) -> None:
    """Refuse a machine its host cannot hold, with the host row locked (see add_machine).

    Core statements, not ORM objects: this runs once per placed machine, and the unit of
    work cost several times the queries themselves.
    """
    row = s.execute(_HOST_FOR_CLAIM, {"host": m.host}).first()
    if row is None:
        raise NotFound("host", m.host)
    ratios = HostPlacement(frozenset(), row.cpu_ratio, row.memory_ratio,
                           row.disk_ratio).ratios(overcommit)
    used = _host_claims(s, m.host)
    for what, have, in_use, wanted, show in (
        ("vCPUs", row.facts["cpus"] * ratios.cpu, used.cpus, m.cpus, str),
        ("memory", row.facts["memory_bytes"] * ratios.memory, used.memory_bytes,
         m.memory_bytes, format_size),
        ("disk", row.disk_bytes * ratios.disk, used.disk_bytes, m.disk_claim, format_size),
    ):
        if in_use + wanted > have:
            raise ClaimRefused(
                f"Host '{m.host}' has no room left for '{m.name}': {show(in_use)} of "
                f"{show(int(have))} {what} claimed, {show(wanted)} asked.",
                hint="Another request took it first; place the machine again.",
            )


def _host_image(row: HostImageRow) -> HostImage:
    return HostImage(host=row.host, image=row.image, path=row.path, state=row.state,
                     bytes_done=row.bytes_done, owner=row.owner)


def _image(row: ImageRow) -> Image:
    boot = None
    if row.kernel is not None:
        boot = KernelBoot(kernel=row.kernel, initrd=row.initrd, cmdline=row.cmdline or "")
    return Image(
        name=row.name,
        path=row.path,
        source_format=ImageFormat(row.source_format),
        sha256=row.sha256,
        virtual_size=row.virtual_size,
        kernel_boot=boot,
        created_at=row.created_at,
        project=row.project,
        arch=row.arch,
        accelerator=Accelerator(row.accelerator) if row.accelerator else None,
    )


def _machine_row(m: Machine) -> MachineRow:
    return MachineRow(**_machine_values(m))


def _machine_values(m: Machine) -> dict[str, Any]:
    return dict(
        name=m.name,
        uuid=m.identity.uuid,
        mac=m.identity.mac,
        hostname=m.identity.hostname,
        instance_id=m.identity.instance_id,
        host=m.host,
        image=m.image,
        cpus=m.cpus,
        memory_bytes=m.memory_bytes,
        clone_mode=m.clone.value if m.clone else None,
        disk_path=m.disk_path,
        seed_path=m.seed_path,
        record_state=m.record_state.value,
        managed=m.managed,
        ssh_keys=list(m.ssh_keys),
        created_at=m.created_at,
        project=m.project,
        disk_bytes=m.disk_bytes,
        disk_claim=m.disk_claim,
        placement=m.placement.to_json(),
        placement_group=m.placement.group,
        kernel_image=m.kernel_image,
        storage_pool=m.storage_pool,
        owned_bytes=m.owned_bytes,
    )


def _machine(row: MachineRow | Row[*tuple[Any, ...]]) -> Machine:
    return Machine(
        name=row.name,
        identity=Identity(
            uuid=row.uuid, mac=row.mac, hostname=row.hostname, instance_id=row.instance_id
        ),
        host=row.host,
        image=row.image,
        cpus=row.cpus,
        memory_bytes=row.memory_bytes,
        clone=CloneMode(row.clone_mode) if row.clone_mode else None,
        disk_path=row.disk_path,
        seed_path=row.seed_path,
        record_state=RecordState(row.record_state),
        managed=row.managed,
        created_at=row.created_at,
        ssh_keys=tuple(row.ssh_keys),
        project=row.project,
        disk_bytes=row.disk_bytes,
        disk_claim=row.disk_claim,
        placement=PlacementHints.from_json(row.placement, row.placement_group),
        kernel_image=row.kernel_image,
        storage_pool=row.storage_pool,
        owned_bytes=row.owned_bytes,
    )


def _storage_pool(row: StoragePoolRow) -> StoragePool:
    return StoragePool(name=row.name, type=row.type, host=row.host, path=row.path,
                       created_at=row.created_at)


def _job(row: JobRow) -> Job:
    return Job(
        id=row.id,
        kind=row.kind,
        target=row.target,
        state=JobState(row.state),
        owner=row.owner,
        steps=tuple(Step(name=s.name, state=StepState(s.state), args=s.args) for s in row.steps),
        error=row.error,
        created_at=row.created_at,
        finished_at=row.finished_at,
        project=row.project,
    )


_Q = TypeVar("_Q", bound=Select[*tuple[Any, ...]])


def _iso(stored: str | datetime) -> str:
    """A stored (naive UTC) timestamp in RFC 3339 form, as the API writes datetimes."""
    if isinstance(stored, datetime):
        return stored.replace(tzinfo=UTC).isoformat()
    return stored.replace(" ", "T", 1) + "+00:00"


def _filtered(q: _Q, where: MachineFilter) -> _Q:
    if where.projects is not None:
        q = q.where(MachineRow.project.in_(list(where.projects)))
    if where.host is not None:
        q = q.where(MachineRow.host == where.host)
    if where.image is not None:
        q = q.where(MachineRow.image == where.image)
    if where.state is not None:
        q = q.where(MachineRow.record_state == where.state.value)
    if where.name_prefix:
        q = q.where(MachineRow.name.startswith(where.name_prefix, autoescape=True))
    return q


def _usage(s: Session, project: str | None = None, host: str | None = None) -> Usage:
    """What the machines of a project, or of a host, hold together. A disk counts the
    bytes it owns (as last measured), but at least its claim: a linked clone's shared
    base is not the project's, the room it was promised to grow into is."""
    held = case((MachineRow.owned_bytes > MachineRow.disk_claim, MachineRow.owned_bytes),
                else_=MachineRow.disk_claim)
    q = select(
        func.count(),
        func.coalesce(func.sum(MachineRow.cpus), 0),
        func.coalesce(func.sum(MachineRow.memory_bytes), 0),
        func.coalesce(func.sum(held), 0),
    )
    if project is not None:
        q = q.where(MachineRow.project == project)
    if host is not None:
        q = q.where(MachineRow.host == host)
    row = s.execute(q).one()
    return Usage(machines=row[0], cpus=row[1], memory_bytes=row[2], disk_bytes=row[3] or 0)


def _require_projects(s: Session, names: Collection[str]) -> None:
    known = set(s.scalars(select(ProjectRow.name).where(ProjectRow.name.in_(list(names)))))
    missing = sorted(set(names) - known)
    if missing:
        raise NotFound("project", missing[0])


def _quota_columns(q: Quota) -> dict[str, int | None]:
    return {
        "quota_machines": q.machines,
        "quota_cpus": q.cpus,
        "quota_memory_bytes": q.memory_bytes,
        "quota_disk_bytes": q.disk_bytes,
    }


def _project(row: ProjectRow) -> Project:
    quota = Quota(
        machines=row.quota_machines,
        cpus=row.quota_cpus,
        memory_bytes=row.quota_memory_bytes,
        disk_bytes=row.quota_disk_bytes,
    )
    return Project(name=row.name, quota=quota, created_at=row.created_at)


def _user(row: UserRow) -> User:
    return User(
        name=row.name,
        role=Role(row.role),
        projects=tuple(m.project for m in row.memberships),
        created_at=row.created_at,
    )


def _token(row: TokenRow | Row[*tuple[Any, ...]]) -> Token:
    return Token(
        id=row.id,
        user=row.user,
        name=row.name,
        session=row.csrf is not None,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )
