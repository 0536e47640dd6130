"""The store's one entry point: typed values in, typed values out.

Each method is one short transaction. Uniqueness (names, UUIDs, MACs) is enforced by
the database, so two processes racing for the same name cannot both win.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from corral.errors import Conflict, NotFound
from corral.model import (
    Accelerator,
    CloneMode,
    Host,
    HostFacts,
    Identity,
    Image,
    ImageFormat,
    Job,
    JobState,
    KernelBoot,
    Machine,
    RecordState,
    Step,
    StepState,
)
from corral.store.db import make_engine, migrate
from corral.store.tables import HostRow, ImageRow, JobRow, MachineRow, StepRow


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Store:
    def __init__(self, url: str) -> None:
        self.engine: Engine = make_engine(url)
        migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- hosts -------------------------------------------------------------------------

    def put_host(self, host: Host) -> None:
        with self._tx() as s:
            s.merge(
                HostRow(
                    name=host.name,
                    uri=host.uri,
                    facts={
                        "hostname": host.facts.hostname,
                        "arch": host.facts.arch,
                        "cpu_model": host.facts.cpu_model,
                        "cpus": host.facts.cpus,
                        "memory_bytes": host.facts.memory_bytes,
                        "hypervisor": host.facts.hypervisor,
                        "hypervisor_version": host.facts.hypervisor_version,
                    },
                    accelerator=host.accelerator.value,
                    accelerator_note=host.accelerator_note,
                    pool_name=host.pool_name,
                    pool_path=host.pool_path,
                    enrolled_at=utcnow(),
                )
            )

    def find_host(self, name: str) -> Host | None:
        with self._tx() as s:
            row = s.get(HostRow, name)
            return None if row is None else _host(row)

    def list_hosts(self) -> list[Host]:
        with self._tx() as s:
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
        with self._tx() as s:
            row = s.get(ImageRow, name)
            return None if row is None else _image(row)

    def get_image(self, name: str) -> Image:
        image = self.find_image(name)
        if image is None:
            raise NotFound("image", name, hint="'corral image list' shows the library.")
        return image

    def list_images(self) -> list[Image]:
        with self._tx() as s:
            return [_image(r) for r in s.scalars(select(ImageRow).order_by(ImageRow.name))]

    def delete_image(self, name: str) -> None:
        try:
            with self._tx() as s:
                s.execute(delete(ImageRow).where(ImageRow.name == name))
        except IntegrityError as exc:
            users = ", ".join(self.machines_using_image(name))
            raise Conflict(f"Image '{name}' is still used by: {users}.") from exc

    def machines_using_image(self, name: str) -> list[str]:
        with self._tx() as s:
            q = select(MachineRow.name).where(MachineRow.image == name).order_by(MachineRow.name)
            return list(s.scalars(q))

    # -- machines ----------------------------------------------------------------------

    def add_machine(self, machine: Machine) -> None:
        """Record a machine; Conflict if its name, UUID or MAC is taken."""
        try:
            with self._tx() as s:
                s.add(_machine_row(machine))
        except IntegrityError as exc:
            raise Conflict(
                f"A machine named '{machine.name}' already exists.",
                hint="Choose another name, or delete the old machine first.",
            ) from exc

    def find_machine(self, name: str) -> Machine | None:
        with self._tx() as s:
            row = s.get(MachineRow, name)
            return None if row is None else _machine(row)

    def get_machine(self, name: str) -> Machine:
        machine = self.find_machine(name)
        if machine is None:
            raise NotFound("machine", name, hint="'corral vm list' shows the inventory.")
        return machine

    def list_machines(self, host: str | None = None) -> list[Machine]:
        with self._tx() as s:
            q = select(MachineRow).order_by(MachineRow.name)
            if host is not None:
                q = q.where(MachineRow.host == host)
            return [_machine(r) for r in s.scalars(q)]

    def taken(self, *, names: Iterable[str] = (), macs: Iterable[str] = ()) -> set[str]:
        """Which of these names and MACs are already recorded."""
        with self._tx() as s:
            found = set(s.scalars(select(MachineRow.name).where(MachineRow.name.in_(list(names)))))
            q = select(MachineRow.mac).where(MachineRow.mac.in_(list(macs)))
            return found | {mac for mac in s.scalars(q) if mac is not None}

    def set_machine_state(self, name: str, state: RecordState) -> None:
        with self._tx() as s:
            s.execute(
                update(MachineRow).where(MachineRow.name == name).values(record_state=state.value)
            )

    def forget_machine(self, name: str, uuid: str) -> None:
        """Delete the record of this machine, never a namesake. Idempotent."""
        with self._tx() as s:
            s.execute(delete(MachineRow).where(MachineRow.name == name, MachineRow.uuid == uuid))

    # -- jobs --------------------------------------------------------------------------

    def create_job(self, kind: str, target: str, owner: str, steps: Sequence[Step]) -> Job:
        """Write a job and all its steps before any step runs."""
        with self._tx() as s:
            row = JobRow(
                kind=kind,
                target=target,
                owner=owner,
                state=JobState.RUNNING.value,
                created_at=utcnow(),
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

    def finish_job(self, job_id: int, state: JobState, error: str | None = None) -> None:
        with self._tx() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(state=state.value, error=error, finished_at=utcnow())
            )

    def get_job(self, job_id: int) -> Job:
        with self._tx() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound("job", str(job_id), called="with id")
            return _job(row)

    def list_jobs(self, state: JobState | None = None, limit: int = 50) -> list[Job]:
        with self._tx() as s:
            q = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
            if state is not None:
                q = q.where(JobRow.state == state.value)
            return [_job(r) for r in s.scalars(q)]


def _host(row: HostRow) -> Host:
    return Host(
        name=row.name,
        uri=row.uri,
        facts=HostFacts(**row.facts),
        accelerator=Accelerator(row.accelerator),
        accelerator_note=row.accelerator_note,
        pool_name=row.pool_name,
        pool_path=row.pool_path,
    )


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
    )


def _machine_row(m: Machine) -> MachineRow:
    return MachineRow(
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
    )


def _machine(row: MachineRow) -> Machine:
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
    )


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
    )
