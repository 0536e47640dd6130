"""Accounts: users, projects, API tokens and browser sessions, and who may do what.

Passwords are hashed with argon2id. Tokens are ``corral_<id>_<secret>``: the id finds
the row, and only a SHA-256 of the 256-bit secret is stored, so a stolen database
yields no usable token. Sessions are tokens too, with a CSRF value of their own.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from corral.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from corral.identity import check_name
from corral.model import DEFAULT_PROJECT, Project, Quota, Role, Token, Usage, User
from corral.store import Store
from corral.store.repository import utcnow

TOKEN_PREFIX = "corral_"  # noqa: S105  (marks a token in logs and secret scanners)
MIN_PASSWORD = 10
SESSION_LIFETIME = timedelta(hours=12)
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so a wrong name costs as much time
    as a wrong password and does not reveal which names exist. Made on first use: an
    argon2 hash costs ~90 ms, which every ``corral`` command would pay at start."""
    return _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller and what its role lets it see and change."""

    user: User
    token: Token

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def is_admin(self) -> bool:
        return self.user.role is Role.ADMIN

    @property
    def projects(self) -> Collection[str] | None:
        """The projects this caller may read; ``None`` means every project."""
        return None if self.is_admin else self.user.projects

    def can_read(self, project: str | None) -> bool:
        """Whether the caller may see things of ``project``. ``None`` (host jobs, shared
        images' changes) is for admins; callers check shared images separately."""
        return self.is_admin or (project is not None and project in self.user.projects)

    def can_manage(self, project: str | None) -> bool:
        return self.is_admin or (
            self.user.role is Role.OPERATOR
            and project is not None
            and project in self.user.projects
        )

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("Only an admin may do this.")

    def require_manage(self, project: str | None) -> None:
        if not self.can_manage(project):
            raise Forbidden(
                f"Role '{self.user.role}' may not change things in project '{project}'."
                if project is not None
                else "Only an admin may change shared resources."
            )

    def home_project(self) -> str:
        """Where a new machine or image goes when the caller names no project."""
        if self.is_admin or DEFAULT_PROJECT in self.user.projects or not self.user.projects:
            return DEFAULT_PROJECT
        return self.user.projects[0]


@dataclass(frozen=True, slots=True)
class IssuedToken:
    secret: str
    """The whole token; shown once, never stored."""
    token: Token
    csrf: str | None


def create_user(
    store: Store, name: str, password: str, role: Role, projects: Collection[str] = ()
) -> User:
    check_name(name, what="user name")
    check_password(password)
    if role is Role.ADMIN and projects:
        raise InvalidInput("An admin sees every project; give no --project.")
    return store.add_user(name, _hasher.hash(password), role, projects)


def keep_an_admin(store: Store, name: str) -> None:
    """Refuse to demote or remove ``name`` when it is the last admin: nobody could
    manage users any more."""
    admins = [u.name for u in store.list_users() if u.role is Role.ADMIN]
    if admins == [name]:
        raise Conflict(f"'{name}' is the last admin.", hint="Make another user admin first.")


def set_password(store: Store, name: str, password: str) -> User:
    check_password(password)
    return store.update_user(name, password_hash=_hasher.hash(password))


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"A password needs at least {MIN_PASSWORD} characters.")


def authenticate(store: Store, name: str, password: str) -> User:
    stored = store.password_hash(name)
    try:
        _hasher.verify(stored or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        stored = None
    if stored is None:
        raise Unauthenticated("Wrong user name or password.")
    return store.get_user(name)


def issue_token(
    store: Store,
    user: str,
    name: str,
    *,
    expires_in: timedelta | None = None,
    session: bool = False,
) -> IssuedToken:
    """A new API token (or, with ``session``, a browser session with its CSRF value)."""
    check_name(name, what="token name")
    if expires_in is not None and expires_in <= timedelta(0):
        raise InvalidInput("A token's lifetime must be positive.")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    token = Token(
        id=token_id,
        user=user,
        name=name,
        session=session,
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        revoked_at=None,
    )
    csrf = secrets.token_urlsafe(32) if session else None
    store.add_token(token, _digest(secret), csrf)
    return IssuedToken(f"{TOKEN_PREFIX}{token_id}_{secret}", token, csrf)


def resolve_token(store: Store, presented: str) -> tuple[Principal, str | None]:
    """The caller a token stands for, and its session's CSRF value (if a session).

    Unauthenticated for a malformed, unknown, revoked or expired token; the message
    does not say which, so probing learns nothing.
    """
    refused = invalid_token()
    if not presented.startswith(TOKEN_PREFIX):
        raise refused
    token_id, _, secret = presented.removeprefix(TOKEN_PREFIX).partition("_")
    cred = store.token_credential(token_id) if token_id and secret else None
    if cred is None or not hmac.compare_digest(cred.secret_sha256, _digest(secret)):
        raise refused
    if cred.token.revoked_at is not None or expired(cred.token):
        raise refused
    return Principal(cred.user, cred.token), cred.csrf


def expired(token: Token) -> bool:
    return token.expires_at is not None and token.expires_at <= utcnow()


def invalid_token() -> Unauthenticated:
    """One answer for every bad token, so probing learns nothing about which it was."""
    return Unauthenticated(
        "The token is not valid: unknown, revoked or expired.",
        hint="Log in again, or create a new token.",
    )


def revoke_token(store: Store, caller: Principal, token_id: str) -> Token:
    """Revoke one of the caller's tokens; an admin may revoke anyone's."""
    cred = store.token_credential(token_id)
    if cred is None or (cred.user.name != caller.name and not caller.is_admin):
        raise NotFound("token", token_id, called="with id")
    return store.revoke_token(token_id)


def ensure_first_admin(store: Store, password: str | None) -> str | None:
    """Create user ``admin`` when there are no users yet.

    Returns the generated password to print once, or ``None`` when nothing was
    created or the password came from the caller.
    """
    if store.list_users():
        return None
    generated = password is None
    password = password or secrets.token_urlsafe(12)
    try:
        create_user(store, "admin", password, Role.ADMIN)
    except Conflict:
        return None  # another process made it first
    return password if generated else None


def require_room(store: Store, project: str, asked: Usage) -> None:
    """Refuse up front what the project's quota has no room for. The store checks
    again, atomically, as each machine is recorded; this check spares a doomed job."""
    store.get_project(project).quota.require_room(project, store.project_usage(project), asked)


def create_project(store: Store, name: str, quota: Quota) -> Project:
    check_name(name, what="project name")
    _check_quota_values(quota)
    return store.add_project(name, quota)


def set_quota(store: Store, name: str, quota: Quota) -> Project:
    _check_quota_values(quota)
    return store.set_quota(name, quota)


def _check_quota_values(quota: Quota) -> None:
    for value in (quota.machines, quota.cpus, quota.memory_bytes, quota.disk_bytes):
        if value is not None and value < 0:
            raise InvalidInput("A quota cannot be negative; leave it out for no limit.")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
