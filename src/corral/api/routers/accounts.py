"""Users and projects (admins), and API tokens (each user their own)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter
from starlette.status import HTTP_204_NO_CONTENT

from corral.api.deps import Caller, ServicesDep
from corral.api.problems import documented, linked
from corral.api.schemas import (
    Name,
    ProjectCreate,
    ProjectOut,
    QuotaIn,
    TokenCreate,
    TokenIssued,
    TokenOut,
    UserCreate,
    UserOut,
    UserUpdate,
)
from corral.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from corral.model import Role
from corral.ops import accounts
from corral.ops.accounts import Principal

users = APIRouter(
    prefix="/users", tags=["accounts"], responses=documented(400, 401, 403, 404, 422)
)
projects = APIRouter(
    prefix="/projects", tags=["accounts"], responses=documented(400, 401, 403, 404, 422)
)
tokens = APIRouter(
    prefix="/tokens", tags=["accounts"], responses=documented(400, 401, 403, 404, 422)
)


@users.get("", summary="Every user (admins)")
def list_users(caller: Caller, svc: ServicesDep) -> list[UserOut]:
    caller.require_admin()
    return [UserOut.of(u) for u in svc.ctx.store.list_users()]


@users.post("", status_code=201, summary="Create a user (admins)", responses={
    **linked(201, "Created",
             GetUser=("get", "/users/{name}", {"name": "$response.body#/name"}),
             UpdateUser=("patch", "/users/{name}", {"name": "$response.body#/name"}),
             DeleteUser=("delete", "/users/{name}", {"name": "$response.body#/name"})),
    **documented(409),
})
def create_user(body: UserCreate, caller: Caller, svc: ServicesDep) -> UserOut:
    caller.require_admin()
    user = accounts.create_user(svc.ctx.store, body.name, body.password, body.role,
                                body.projects)
    return UserOut.of(user)


def _self_or_admin(caller: Principal, name: str) -> None:
    if caller.name != name and not caller.is_admin:
        raise NotFound("user", name)


@users.get("/{name}", summary="One user (admins, or the user itself)")
def get_user(name: Name, caller: Caller, svc: ServicesDep) -> UserOut:
    _self_or_admin(caller, name)
    return UserOut.of(svc.ctx.store.get_user(name))


@users.patch("/{name}", summary="Change role, projects (admins) or password (also oneself)",
             responses=documented(409, 429))
def update_user(name: Name, body: UserUpdate, caller: Caller, svc: ServicesDep) -> UserOut:
    _self_or_admin(caller, name)
    store = svc.ctx.store
    # Every check before any change: a refused request must change nothing.
    if body.password is not None and name == caller.name:
        _confirm_password(svc, name, body.current_password)
    if body.role is not None or body.projects is not None:
        caller.require_admin()
        role = body.role or store.get_user(name).role
        if role is not Role.ADMIN:
            accounts.keep_an_admin(store, name)
        if role is Role.ADMIN and body.projects:
            raise InvalidInput("An admin sees every project; give no projects.")
        user = store.update_user(name, role=body.role,
                                 projects=[] if role is Role.ADMIN else body.projects)
    else:
        user = store.get_user(name)
    if body.password is not None:
        user = accounts.set_password(store, name, body.password)
        # Whoever knew the old password may hold a session: end them all but this one.
        store.revoke_sessions(name, keep=caller.token.id)
    return UserOut.of(user)


def _confirm_password(svc: ServicesDep, name: str, current: str | None) -> None:
    """A stolen session alone must not be enough to take an account over."""
    key = f"user:{name}"
    stamp = svc.throttle.begin(key)
    try:
        accounts.authenticate(svc.ctx.store, name, current or "")
    except Unauthenticated:
        raise Forbidden(
            "To change your password, give your current one as 'current_password'."
        ) from None
    svc.throttle.succeeded(stamp, key)


@users.delete("/{name}", status_code=HTTP_204_NO_CONTENT, summary="Delete a user (admins)")
def delete_user(name: Name, caller: Caller, svc: ServicesDep) -> None:
    caller.require_admin()
    if name == caller.name:
        raise InvalidInput("You cannot delete your own account.")
    accounts.keep_an_admin(svc.ctx.store, name)
    svc.ctx.store.delete_user(name)


@projects.get("", summary="Projects the caller belongs to (every project for admins)")
def list_projects(caller: Caller, svc: ServicesDep) -> list[ProjectOut]:
    store = svc.ctx.store
    return [ProjectOut.of(p, store.project_usage(p.name))
            for p in store.list_projects(caller.projects)]


@projects.post("", status_code=201, summary="Create a project (admins)", responses={
    **linked(201, "Created",
             GetProject=("get", "/projects/{name}", {"name": "$response.body#/name"}),
             SetQuota=("put", "/projects/{name}/quota", {"name": "$response.body#/name"}),
             DeleteProject=("delete", "/projects/{name}", {"name": "$response.body#/name"})),
    **documented(409),
})
def create_project(body: ProjectCreate, caller: Caller, svc: ServicesDep) -> ProjectOut:
    caller.require_admin()
    store = svc.ctx.store
    project = accounts.create_project(store, body.name, body.quota.to_quota())
    return ProjectOut.of(project, store.project_usage(project.name))


def _visible_project(caller: Principal, name: str) -> None:
    if not caller.can_read(name):
        raise NotFound("project", name)


@projects.get("/{name}", summary="One project with its quota and usage")
def get_project(name: Name, caller: Caller, svc: ServicesDep) -> ProjectOut:
    _visible_project(caller, name)
    store = svc.ctx.store
    return ProjectOut.of(store.get_project(name), store.project_usage(name))


@projects.put("/{name}/quota", summary="Set a project's quota (admins)")
def set_quota(name: Name, body: QuotaIn, caller: Caller, svc: ServicesDep) -> ProjectOut:
    _visible_project(caller, name)
    caller.require_admin()
    store = svc.ctx.store
    return ProjectOut.of(accounts.set_quota(store, name, body.to_quota()),
                         store.project_usage(name))


@projects.delete("/{name}", status_code=HTTP_204_NO_CONTENT,
                 summary="Delete an empty project (admins)", responses=documented(409))
def delete_project(name: Name, caller: Caller, svc: ServicesDep) -> None:
    _visible_project(caller, name)
    caller.require_admin()
    svc.ctx.store.delete_project(name)


@tokens.get("", summary="The caller's API tokens (admins: everyone's)")
def list_tokens(caller: Caller, svc: ServicesDep) -> list[TokenOut]:
    user = None if caller.is_admin else caller.name
    return [TokenOut.of(t) for t in svc.ctx.store.list_tokens(user)]


@tokens.post("", status_code=201, summary="Create an API token; its secret is shown once",
             responses=linked(201, "Created", RevokeToken=(
                 "delete", "/tokens/{token_id}", {"token_id": "$response.body#/id"})))
def create_token(body: TokenCreate, caller: Caller, svc: ServicesDep) -> TokenIssued:
    lifetime = None if body.expires_in is None else timedelta(seconds=body.expires_in)
    issued = accounts.issue_token(svc.ctx.store, caller.name, body.name, expires_in=lifetime)
    return TokenIssued.issued(issued.token, issued.secret)


@tokens.delete("/{token_id}", summary="Revoke a token")
def revoke_token(token_id: str, caller: Caller, svc: ServicesDep) -> TokenOut:
    return TokenOut.of(accounts.revoke_token(svc.ctx.store, caller, token_id))
