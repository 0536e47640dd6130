"""The store against SQLite and a real PostgreSQL: same behaviour on both."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from corral.errors import Conflict, NotFound
from corral.model import (
    Accelerator,
    CloneMode,
    Host,
    HostFacts,
    Identity,
    Image,
    ImageFormat,
    JobState,
    KernelBoot,
    Machine,
    RecordState,
    Step,
    StepState,
)
from corral.store import Store
from corral.store.db import MIGRATIONS, SCHEMA_REVISION, current_revision
from corral.store.repository import utcnow

HOST = Host(
    name="local",
    uri="qemu:///system",
    facts=HostFacts("vm", "x86_64", "EPYC", 2, 24 << 30, "QEMU", "7.2.0"),
    accelerator=Accelerator.TCG,
    accelerator_note="probe said no",
    pool_name="corral",
    pool_path="/var/lib/corral/pool",
)


CREATED = datetime(2026, 11, 22, 3, 4, 5, 678000)


def image(name: str = "base") -> Image:
    return Image(
        name=name,
        path=f"/lib/{name}.qcow2",
        source_format=ImageFormat.VMDK,
        sha256="ab" * 32,
        virtual_size=1 << 40,
        kernel_boot=KernelBoot("/k", None, "console=ttyS0"),
        created_at=CREATED,
    )


def machine(name: str, mac: str | None, uuid: str) -> Machine:
    return Machine(
        name=name,
        identity=Identity(uuid=uuid, mac=mac, hostname=name, instance_id=f"i-{uuid}"),
        host="local",
        image="base",
        cpus=2,
        memory_bytes=512 << 20,
        clone=CloneMode.LINKED,
        disk_path=f"/pool/{name}.qcow2",
        seed_path=None,
        record_state=RecordState.PROVISIONING,
        managed=True,
        created_at=utcnow(),
        ssh_keys=("ssh-ed25519 AAAA k",),
    )


def test_schema_revision_constant_is_alembic_head() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_REVISION


def test_reopening_keeps_data_and_schema(store_url: str) -> None:
    first = Store(store_url)
    first.put_host(HOST)
    first.close()
    second = Store(store_url)
    assert current_revision(second.engine) == SCHEMA_REVISION
    assert second.find_host("local") == HOST


def test_sqlite_is_wal_with_full_sync(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_image_round_trip_and_duplicate(store: Store) -> None:
    assert store.get_image("base") == image()
    with pytest.raises(Conflict, match="already exists"):
        store.add_image(image())
    with pytest.raises(NotFound, match="No image named 'nope'"):
        store.get_image("nope")


def test_machine_uniqueness_of_name_uuid_and_mac(store: Store) -> None:
    store.add_machine(machine("a", "02:00:00:00:00:01", "u1"))
    for dup in (
        machine("a", "02:00:00:00:00:02", "u2"),  # name
        machine("b", "02:00:00:00:00:01", "u3"),  # mac
        machine("c", "02:00:00:00:00:03", "u1"),  # uuid
    ):
        with pytest.raises(Conflict):
            store.add_machine(dup)
    assert [m.name for m in store.list_machines()] == ["a"]
    # machines without a NIC do not collide with each other
    store.add_machine(machine("n1", None, "u4"))
    store.add_machine(machine("n2", None, "u5"))
    assert store.taken(names=["a", "zz"], macs=["02:00:00:00:00:01", "x"]) == {
        "a",
        "02:00:00:00:00:01",
    }


def test_forget_never_deletes_a_namesake(store: Store) -> None:
    store.add_machine(machine("a", "02:00:00:00:00:01", "u1"))
    store.forget_machine("a", "other-uuid")
    assert store.find_machine("a") is not None
    store.forget_machine("a", "u1")
    store.forget_machine("a", "u1")  # idempotent
    assert store.find_machine("a") is None


def test_image_in_use_cannot_be_deleted(store: Store) -> None:
    store.add_machine(machine("a", "02:00:00:00:00:01", "u1"))
    assert store.machines_using_image("base") == ["a"]
    with pytest.raises(Conflict, match="still used by: a"):
        store.delete_image("base")
    assert store.find_image("base") is not None


def test_kernel_image_is_kept_and_holds_its_image(store: Store) -> None:
    """An imported machine without an image of its own still depends on its kernel's."""
    store.add_machine(replace(machine("imp", "02:00:00:00:00:09", "u9"), image=None,
                              clone=None, kernel_image="base"))
    assert store.get_machine("imp").kernel_image == "base"
    assert store.machines_using_image("base") == ["imp"]
    with pytest.raises(Conflict, match="still used by: imp"):
        store.delete_image("base")


def test_job_steps_are_persisted_in_order(store: Store) -> None:
    job = store.create_job(
        "provision",
        "a",
        "job-1.lock",
        [Step("one", StepState.PENDING, {"x": 1}), Step("two", StepState.PENDING, {})],
    )
    store.set_step_state(job.id, 1, StepState.STARTED)
    again = store.get_job(job.id)
    assert [(s.name, s.state, s.args) for s in again.steps] == [
        ("one", StepState.PENDING, {"x": 1}),
        ("two", StepState.STARTED, {}),
    ]
    assert [j.id for j in store.list_jobs(JobState.PENDING)] == [job.id]
    store.start_job(job.id)
    assert [j.id for j in store.list_jobs(JobState.RUNNING)] == [job.id]
    store.finish_job(job.id, JobState.SUCCEEDED)
    assert store.list_jobs(JobState.RUNNING) == []
    assert store.get_job(job.id).finished_at is not None


def test_an_exclusive_job_waits_for_the_others_on_its_target(store: Store) -> None:
    store.add_machine(machine("m", "52:54:00:00:00:0e", "00000000-0000-4000-8000-00000000000e"))
    first = store.create_job("migrate", "m", "job-1.lock", [], exclusive=True)
    with pytest.raises(Conflict, match=f"busy with job {first.id} \\(migrate\\)"):
        store.create_job("migrate-live", "m", "job-2.lock", [], exclusive=True)
    other = store.create_job("migrate", "n", "job-3.lock", [], exclusive=True)  # another target
    assert other.id != first.id
    store.start_job(first.id)
    with pytest.raises(Conflict):
        store.create_job("migrate", "m", "job-2.lock", [], exclusive=True)
    store.finish_job(first.id, JobState.ROLLED_BACK)
    assert store.create_job("migrate", "m", "job-2.lock", [], exclusive=True).id > other.id


def test_upgrading_from_0001_keeps_machines_in_the_default_project(store_url: str) -> None:
    """A store written by the first release, with a machine in it, upgrades in place."""
    from alembic import command
    from sqlalchemy import text

    from corral.store.db import make_engine

    engine = make_engine(store_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text(
            "INSERT INTO hosts VALUES ('local', 'qemu:///system', '{}', 'tcg', '', 'p', '/p', "
            "'2026-01-01 00:00:00')"))
        conn.execute(text(
            "INSERT INTO machines (name, uuid, mac, hostname, instance_id, host, image, cpus, "
            "memory_bytes, clone_mode, disk_path, seed_path, record_state, managed, ssh_keys, "
            "created_at) VALUES ('old', 'u-1', NULL, 'old', 'i-1', 'local', NULL, 2, 1024, "
            "NULL, '/p/old.qcow2', NULL, 'ready', TRUE, '[]', '2026-01-01 00:00:00')"))
    engine.dispose()
    store = Store(store_url)
    try:
        old = store.get_machine("old")
        assert (old.project, old.cpus, old.disk_bytes) == ("default", 2, None)
        assert store.project_usage("default").machines == 1
        with pytest.raises(NotFound):  # the new foreign key holds
            store.add_machine(replace(old, name="new", identity=replace(
                old.identity, uuid="u-2", hostname="new"), project="nowhere"))
    finally:
        store.close()
