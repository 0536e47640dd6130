"""Every error answer is an RFC 9457 problem document, from one place.

``CorralError`` already carries its HTTP status and a sentence for a person; this
module only translates. Unexpected exceptions become a plain 500 whose detail says
nothing about internals (the traceback goes to the log).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from corral.errors import CorralError, TooManyRequests, Unauthenticated
from corral.scheduler import Explanation, NoValidHost

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    type: str = Field(description="A URI reference naming the kind of problem.")
    title: str = Field(description="A short summary of the kind of problem.")
    status: int
    detail: str = Field(description="What went wrong this time, and what to do.")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Per-field problems of a request that failed validation."
    )
    explanation: dict[str, Any] | None = Field(
        default=None,
        description="When no host can take a machine: every host's verdict (see "
        "POST /placement/explain), with 'lines', the breakdown as plain-text rows.",
    )


def problem_response(
    status: int,
    kind: str,
    title: str,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    explanation: dict[str, Any] | None = None,
) -> JSONResponse:
    body = Problem(
        type=f"/problems/{kind}", title=title, status=status, detail=detail, errors=errors,
        explanation=explanation,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, media_type=MEDIA_TYPE
    )


def _slug(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _title(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).capitalize()


def explain_dict(explanation: Explanation) -> dict[str, Any]:
    """An explanation's stable keys, plus its per-host breakdown as text rows."""
    return {**explanation.to_dict(), "lines": explanation.lines()}


def install(app: FastAPI) -> None:
    @app.exception_handler(CorralError)
    async def corral_error(_request: Request, exc: CorralError) -> JSONResponse:
        name = type(exc).__name__
        detail, explanation = str(exc), None
        if isinstance(exc, NoValidHost):
            # The summary sentence; the hint and every host's verdict go in an extension.
            detail, explanation = exc.message, explain_dict(exc.explanation)
        response = problem_response(exc.http_status, _slug(name), _title(name), detail,
                                    explanation=explanation)
        if isinstance(exc, TooManyRequests):
            response.headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, Unauthenticated):  # RFC 9110: a 401 names its scheme
            response.headers["WWW-Authenticate"] = 'Bearer realm="corral"'
        if exc.http_status >= 500:
            log.error("%s: %s", name, exc)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(part) for part in e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid"}
        where = ".".join(first["loc"][1:] or first["loc"])
        detail = f"The request is invalid at '{where}': {first['msg']}."
        return problem_response(422, "invalid-request", "Invalid request", detail,
                                errors=errors)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "The request failed."
        response = problem_response(exc.status_code, f"http-{exc.status_code}", detail, detail)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return problem_response(
            500, "internal", "Internal error",
            "Corral failed unexpectedly; the server log has the details.",
        )


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problems a route can answer with."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {
            "model": Problem,
            "description": _DESCRIPTIONS.get(status, "A problem"),
            "content": {MEDIA_TYPE: {"schema": schema}},
        }
        for status in statuses
    }


_DESCRIPTIONS = {
    400: "The request is wrong",
    401: "No valid credentials",
    403: "The caller's role does not allow this",
    404: "No such thing, or not visible to the caller",
    409: "Conflicts with the current state, or exceeds a quota",
    413: "The upload is larger than the server accepts",
    422: "The request failed validation, or an image is unsafe",
    429: "Too many attempts; retry later",
    500: "Server or hypervisor failure",
    503: "libvirtd cannot be reached",
    507: "The storage pool is full",
}


def linked(status: int, description: str, **links: tuple[str, str, dict[str, str]]
           ) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI success entry with links (``Name=(method, path, parameters)``): what a
    client, or a stateful test, can call next with values from this answer."""
    return {
        status: {
            "description": description,
            "links": {
                name: {
                    "operationRef": f"#/paths/{path.replace('/', '~1')}/{method}",
                    "parameters": parameters,
                }
                for name, (method, path, parameters) in links.items()
            },
        }
    }
