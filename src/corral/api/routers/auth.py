"""Logging in: a browser session (cookie) or a bearer token for the CLI and scripts."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, Response
from starlette.status import HTTP_204_NO_CONTENT

from corral.api.deps import SESSION_COOKIE, Caller, ServicesDep
from corral.api.problems import documented
from corral.api.schemas import Login, SessionOut, TokenIssued, TokenLogin, UserOut
from corral.model import User
from corral.ops import accounts

router = APIRouter(
    prefix="/auth", tags=["auth"], responses=documented(400, 401, 403, 422, 429)
)


def _login(request: Request, svc: ServicesDep, body: Login) -> User:
    """Check the password, counting failures per name and per client address."""
    request.state.actor = body.name[:63]
    client = request.client.host if request.client else "unknown"
    keys = (f"user:{body.name}", f"addr:{client}")
    stamp = svc.throttle.begin(*keys)
    user = accounts.authenticate(svc.ctx.store, body.name, body.password)
    svc.throttle.succeeded(stamp, *keys)
    return user


@router.post("/session", summary="Log in for the web console (sets a session cookie)")
def create_session(
    request: Request, response: Response, svc: ServicesDep, body: Login
) -> SessionOut:
    user = _login(request, svc, body)
    issued = accounts.issue_token(
        svc.ctx.store, user.name, "session", expires_in=accounts.SESSION_LIFETIME, session=True
    )
    response.set_cookie(
        SESSION_COOKIE,
        issued.secret,
        max_age=int(accounts.SESSION_LIFETIME.total_seconds()),
        httponly=True,
        secure=svc.ctx.settings.cookie_secure,
        samesite="strict",
        path="/",
    )
    return SessionOut(user=UserOut.of(user), csrf_token=issued.csrf)


@router.post(
    "/token", summary="Log in for the CLI or a script (returns a bearer token)", status_code=201
)
def create_token(request: Request, svc: ServicesDep, body: TokenLogin) -> TokenIssued:
    user = _login(request, svc, body)
    lifetime = None if body.expires_in is None else timedelta(seconds=body.expires_in)
    issued = accounts.issue_token(svc.ctx.store, user.name, body.token_name, expires_in=lifetime)
    return TokenIssued.issued(issued.token, issued.secret)


@router.delete("/session", status_code=HTTP_204_NO_CONTENT, summary="Log out")
def delete_session(caller: Caller, svc: ServicesDep, response: Response) -> None:
    if caller.token.session:
        svc.ctx.store.revoke_token(caller.token.id)
    response.delete_cookie(SESSION_COOKIE, path="/")


@router.get("/me", summary="Who the credentials belong to")
def me(caller: Caller) -> UserOut:
    return UserOut.of(caller.user)
