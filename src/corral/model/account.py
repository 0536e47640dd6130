"""Who may do what: users with a role, projects that own machines and images, quotas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from corral.errors import QuotaExceeded
from corral.model.states import Role
from corral.model.units import format_size

DEFAULT_PROJECT = "default"


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits on what a project holds at once; ``None`` means unlimited."""

    machines: int | None = None
    cpus: int | None = None
    memory_bytes: int | None = None
    disk_bytes: int | None = None

    @property
    def unlimited(self) -> bool:
        return all(v is None for v in (self.machines, self.cpus, self.memory_bytes,
                                       self.disk_bytes))

    def require_room(self, project: str, used: Usage, asked: Usage) -> None:
        """Raise QuotaExceeded naming the first limit that ``used + asked`` would pass."""
        for what, limit, in_use, wanted, show in (
            ("machines", self.machines, used.machines, asked.machines, str),
            ("vCPUs", self.cpus, used.cpus, asked.cpus, str),
            ("memory", self.memory_bytes, used.memory_bytes, asked.memory_bytes, format_size),
            ("disk", self.disk_bytes, used.disk_bytes, asked.disk_bytes, format_size),
        ):
            if limit is not None and in_use + wanted > limit:
                raise QuotaExceeded(
                    f"Project '{project}' would exceed its {what} quota: "
                    f"{show(in_use)} in use + {show(wanted)} asked > {show(limit)}.",
                    hint="Ask for less, delete machines, or ask an admin to raise the quota.",
                )


@dataclass(frozen=True, slots=True)
class Usage:
    machines: int
    cpus: int
    memory_bytes: int
    disk_bytes: int

    @classmethod
    def of(cls, count: int, cpus: int, memory_bytes: int, disk_bytes: int) -> Usage:
        """What ``count`` machines of one size hold together."""
        return cls(count, count * cpus, count * memory_bytes, count * disk_bytes)


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
