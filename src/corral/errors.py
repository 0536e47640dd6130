"""Every error Corral raises on purpose.

    CorralError                 one sentence for a person, an exit code, an HTTP status
    ├── InvalidInput            the request itself is wrong (400)
    ├── NotFound                an image, machine or host that does not exist (404)
    ├── Conflict                a duplicate name, a running machine, a dependent image (409)
    │   └── QuotaExceeded       more than the project's quota allows (409)
    ├── InsufficientResources   more memory, CPUs or disk than the host has (409)
    ├── Unauthenticated         no credentials, or a wrong, revoked or expired one (401)
    ├── Forbidden               known caller, action outside its role (403)
    ├── TooManyRequests         too many failed logins; try again later (429)
    ├── UnsafeImage             an image that reaches outside itself, or is not what it says (422)
    ├── CorruptImage            a truncated or damaged image (422)
    ├── StorageError            the storage pool failed (500)
    │   └── NoSpace             the pool's filesystem is full (507)
    ├── HypervisorUnavailable   libvirtd cannot be reached (503)
    ├── HypervisorError         libvirt refused an operation (500)
    ├── GuestTimeout            a guest did not report ready in time (504)
    └── DriverNotFound          no plugin of that name (500)

Low-level errors (libvirt, OSError, subprocess) are translated at one boundary per
subsystem with ``raise ... from exc``; nobody above the drivers sees them.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of all Corral errors: ``str(err)`` is the one sentence a user sees."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} {self.hint}"


class InvalidInput(CorralError):
    exit_code = 2
    http_status = 400


class NotFound(CorralError):
    exit_code = 3
    http_status = 404

    def __init__(
        self, kind: str, name: str, *, hint: str | None = None, called: str = "named"
    ) -> None:
        super().__init__(f"No {kind} {called} '{name}'.", hint=hint)
        self.kind = kind
        self.name = name


class Conflict(CorralError):
    exit_code = 4
    http_status = 409


class QuotaExceeded(Conflict):
    pass


class InsufficientResources(CorralError):
    exit_code = 4
    http_status = 409


class Unauthenticated(CorralError):
    exit_code = 11
    http_status = 401


class Forbidden(CorralError):
    exit_code = 12
    http_status = 403


class TooManyRequests(CorralError):
    exit_code = 13
    http_status = 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnsafeImage(CorralError):
    exit_code = 5
    http_status = 422


class CorruptImage(CorralError):
    exit_code = 5
    http_status = 422


class StorageError(CorralError):
    exit_code = 6
    http_status = 500


class NoSpace(StorageError):
    http_status = 507


class HypervisorUnavailable(CorralError):
    exit_code = 7
    http_status = 503


class HypervisorError(CorralError):
    exit_code = 8
    http_status = 500


class GuestTimeout(CorralError):
    exit_code = 9
    http_status = 504


class DriverNotFound(CorralError):
    exit_code = 10

    def __init__(self, group: str, name: str, available: list[str]) -> None:
        names = ", ".join(sorted(available)) or "none"
        super().__init__(f"No {group} plugin named '{name}' (available: {names}).")
        self.group = group
        self.name = name
        self.available = available
