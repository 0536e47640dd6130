"""Dependencies every router shares: the services, and the authenticated caller."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from corral.api.services import Services
from corral.errors import Forbidden, Unauthenticated
from corral.ops.accounts import Principal
from corral.ops.context import Context

SESSION_COOKIE = "corral_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_bearer = HTTPBearer(auto_error=False, description="An API token from POST /tokens.")
_cookie = APIKeyCookie(
    name=SESSION_COOKIE, auto_error=False, description="A browser session from POST /auth/session."
)


async def services(request: Request) -> Services:  # async: no thread hop for a lookup
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(services)]


async def context(svc: ServicesDep) -> Context:
    return svc.ctx


ContextDep = Annotated[Context, Depends(context)]


async def caller(
    request: Request,
    svc: ServicesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    session: Annotated[str | None, Security(_cookie)],
) -> Principal:
    """Authenticate by bearer token, else by session cookie with CSRF on changes."""
    if bearer is not None:
        principal, _ = await svc.authenticate(bearer.credentials)
    elif session is not None:
        principal, csrf = await svc.authenticate(session)
        sent = request.headers.get(CSRF_HEADER, "")
        if request.method not in SAFE_METHODS and (
            # As bytes: compare_digest refuses non-ASCII text, and a header may hold any.
            csrf is None or not hmac.compare_digest(sent.encode(), csrf.encode())
        ):
            raise Forbidden(
                f"A change made with a session cookie needs the {CSRF_HEADER} header.",
                hint="Reload the page and try again.",
            )
    else:
        raise Unauthenticated(
            "This call needs credentials.",
            hint="Send 'Authorization: Bearer <token>' (see 'corral login'), or log in.",
        )
    request.state.actor = principal.name
    return principal


Caller = Annotated[Principal, Depends(caller)]
