"""The store's tables. Intent lives here; libvirt holds fact (see ops.reconcile)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[str]: JSON,
        int: BigInteger,
    }


class HostRow(Base):
    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    uri: Mapped[str] = mapped_column(String(255), unique=True)
    facts: Mapped[dict[str, Any]]
    accelerator: Mapped[str] = mapped_column(String(16))
    accelerator_note: Mapped[str] = mapped_column(Text)
    pool_name: Mapped[str] = mapped_column(String(63))
    pool_path: Mapped[str] = mapped_column(Text)
    enrolled_at: Mapped[datetime]
    network: Mapped[str] = mapped_column(String(63), default="corral")
    disk_bytes: Mapped[int] = mapped_column(default=0)
    cpu_score: Mapped[float | None] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="up")
    state_note: Mapped[str] = mapped_column(Text, default="")
    last_seen: Mapped[datetime | None]
    tags: Mapped[list[str]] = mapped_column(default=list)
    cpu_ratio: Mapped[float | None] = mapped_column(Float)
    memory_ratio: Mapped[float | None] = mapped_column(Float)
    disk_ratio: Mapped[float | None] = mapped_column(Float)


class ImageRow(Base):
    __tablename__ = "images"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    source_format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    virtual_size: Mapped[int]
    kernel: Mapped[str | None] = mapped_column(Text)
    initrd: Mapped[str | None] = mapped_column(Text)
    cmdline: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    project: Mapped[str | None] = mapped_column(ForeignKey("projects.name", ondelete="RESTRICT"))
    arch: Mapped[str] = mapped_column(String(32), default="x86_64")
    accelerator: Mapped[str | None] = mapped_column(String(16))
    """An accelerator the image needs (``kvm``); ``None``: any."""


class MachineRow(Base):
    __tablename__ = "machines"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    mac: Mapped[str | None] = mapped_column(String(17), unique=True)
    hostname: Mapped[str] = mapped_column(String(63))
    instance_id: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name", ondelete="RESTRICT"), index=True)
    # RESTRICT: an image cannot vanish from under the machines whose disks read it.
    image: Mapped[str | None] = mapped_column(ForeignKey("images.name", ondelete="RESTRICT"))
    cpus: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int]
    clone_mode: Mapped[str | None] = mapped_column(String(16))
    disk_path: Mapped[str] = mapped_column(Text)
    seed_path: Mapped[str | None] = mapped_column(Text)
    record_state: Mapped[str] = mapped_column(String(16))
    managed: Mapped[bool]
    ssh_keys: Mapped[list[str]]
    created_at: Mapped[datetime]
    project: Mapped[str] = mapped_column(
        ForeignKey("projects.name", ondelete="RESTRICT"), index=True
    )
    disk_bytes: Mapped[int | None]
    disk_claim: Mapped[int] = mapped_column(default=0)
    placement: Mapped[dict[str, Any]] = mapped_column(default=dict)
    placement_group: Mapped[str | None] = mapped_column(String(63), index=True)
    # RESTRICT, like ``image``: the kernel an imported machine boots cannot be deleted.
    kernel_image: Mapped[str | None] = mapped_column(
        ForeignKey("images.name", ondelete="RESTRICT")
    )
    owned_bytes: Mapped[int] = mapped_column(default=0)
    """What its disk owned when last measured; quotas count it (``ops.usage``)."""
    # RESTRICT: a pool cannot be removed from under the disks it holds.
    storage_pool: Mapped[str | None] = mapped_column(
        ForeignKey("storage_pools.name", ondelete="RESTRICT")
    )


class StoragePoolRow(Base):
    """A storage pool added with ``corral pool add`` (hosts' own pools are not rows)."""

    __tablename__ = "storage_pools"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    type: Mapped[str] = mapped_column(String(63))
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name", ondelete="RESTRICT"))
    path: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime]


class HostImageRow(Base):
    """A library image's copy in a host's pool: being copied, or present and verified."""

    __tablename__ = "host_images"

    host: Mapped[str] = mapped_column(ForeignKey("hosts.name", ondelete="CASCADE"),
                                      primary_key=True)
    image: Mapped[str] = mapped_column(ForeignKey("images.name", ondelete="CASCADE"),
                                       primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    bytes_done: Mapped[int]
    """How far a copy got: where an interrupted one resumes."""
    owner: Mapped[str | None] = mapped_column(String(64))
    """The lock of the process copying it; a free lock means the copy was abandoned."""
    updated_at: Mapped[datetime]


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), index=True)
    owner: Mapped[str] = mapped_column(String(64))
    """The lock file its running process holds; a free lock means the process died."""
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    project: Mapped[str | None] = mapped_column(String(63), index=True)
    steps: Mapped[list[StepRow]] = relationship(
        order_by="StepRow.position", cascade="all, delete-orphan", lazy="selectin"
    )


class StepRow(Base):
    __tablename__ = "job_steps"

    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    args: Mapped[dict[str, Any]]


class ProjectRow(Base):
    __tablename__ = "projects"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    quota_machines: Mapped[int | None]
    quota_cpus: Mapped[int | None]
    quota_memory_bytes: Mapped[int | None]
    quota_disk_bytes: Mapped[int | None]
    created_at: Mapped[datetime]


class UserRow(Base):
    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    memberships: Mapped[list[MembershipRow]] = relationship(
        cascade="all, delete-orphan", lazy="selectin"
    )


class MembershipRow(Base):
    __tablename__ = "memberships"

    user: Mapped[str] = mapped_column(
        ForeignKey("users.name", ondelete="CASCADE"), primary_key=True
    )
    project: Mapped[str] = mapped_column(
        ForeignKey("projects.name", ondelete="CASCADE"), primary_key=True
    )


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    """Tokens are 256 random bits, so a fast hash is enough (unlike passwords)."""
    csrf: Mapped[str | None] = mapped_column(String(64))
    """Set for browser sessions: the value every cookie-authenticated change must echo."""
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class AuditRow(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(63))
    action: Mapped[str] = mapped_column(String(128))
    target: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_target", "target", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255))
    project: Mapped[str | None] = mapped_column(String(63), index=True)
    message: Mapped[str] = mapped_column(Text)
