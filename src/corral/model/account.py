"""Who may do what: users with a role, projects that own machines and images, quotas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from corral.model.states import Role

DEFAULT_PROJECT = "default"


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits on what a project holds at once; ``None`` means unlimited."""

    machines: int | None = None
    cpus: int | None = None
    memory_bytes: int | None = None
    disk_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    machines: int
    cpus: int
    memory_bytes: int
    disk_bytes: int


@dataclass(frozen=True, slots=True)
class Project:
    name: str
    quota: Quota
    created_at: datetime


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role
    projects: tuple[str, ...]
    """Where an operator manages and a viewer reads; an admin sees every project."""
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Token:
    """An API token or a browser session; only a hash of its secret is stored."""

    id: str
    user: str
    name: str
    session: bool
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    """The method and path template, e.g. ``POST /machines``."""
    target: str
    status: int
    """The HTTP status the call answered with."""


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    at: datetime
    kind: str
    """``job.succeeded``, ``machine.started``…"""
    target: str
    project: str | None
    message: str
