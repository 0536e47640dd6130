"""The console's pages: server-rendered with Jinja2, refreshed in place by htmx.

Pages read through the very functions that answer the JSON API (so visibility rules
are the API's); every change is made by the browser calling the JSON API itself, with
the session cookie and the page's CSRF value, so it is checked and audited once.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from corral import __version__
from corral.api.deps import SESSION_COOKIE, ServicesDep
from corral.api.routers import hosts as host_routes
from corral.api.routers import images as image_routes
from corral.api.routers import jobs as job_routes
from corral.api.routers import machines as machine_routes
from corral.api.schemas import JobOut, MachineOut
from corral.errors import CorralError, Unauthenticated
from corral.ops import usage as usage_ops
from corral.ops.accounts import Principal
from corral.ops.usage import PoolUsage
from corral.store.repository import MachineFilter
from corral.web import format as fmt

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters.update(
    size=fmt.size, ago=fmt.ago, stamp=fmt.stamp, share=fmt.share, level=fmt.level
)
templates.env.globals["version"] = __version__

router = APIRouter(prefix="/ui", include_in_schema=False, default_response_class=HTMLResponse)
LOGIN = "/ui/login"
ACTIVE_JOBS = ("pending", "running")


class LoginRequired(Exception):
    """A page was asked for without a valid session: send the browser to log in."""


@dataclass(frozen=True, slots=True)
class WebSession:
    principal: Principal
    csrf: str


async def web_session(request: Request, svc: ServicesDep) -> WebSession:
    """The session cookie's caller and CSRF value; pages take no bearer tokens."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        raise LoginRequired
    try:
        principal, csrf = await svc.authenticate(cookie)
    except Unauthenticated:
        raise LoginRequired from None
    if csrf is None:
        raise LoginRequired
    request.state.actor = principal.name
    return WebSession(principal, csrf)


SessionDep = Annotated[WebSession, Depends(web_session)]


def _render(request: Request, template: str, session: WebSession | None, page: str = "",
            status_code: int = 200, **context: Any) -> HTMLResponse:
    context.update(
        me=session.principal if session else None,
        csrf=session.csrf if session else "",
        page=page,
    )
    return templates.TemplateResponse(request, template, context, status_code=status_code)


# -- pages -----------------------------------------------------------------------------


@router.get("/login")
async def login_page(request: Request, svc: ServicesDep,
                     next: Annotated[str, Query(max_length=500)] = "/ui/") -> Response:
    try:
        await web_session(request, svc)
    except LoginRequired:
        return _render(request, "login.html", None, next=_local(next))
    return RedirectResponse(_local(next), status_code=303)


@router.get("/")
def dashboard(request: Request, session: SessionDep, svc: ServicesDep) -> HTMLResponse:
    return _render(request, "dashboard.html", session, "dashboard",
                   **_overview(session.principal, svc))


@router.get("/partials/overview")
def overview_partial(request: Request, session: SessionDep, svc: ServicesDep) -> HTMLResponse:
    return _render(request, "_overview.html", session, **_overview(session.principal, svc))


@router.get("/machines")
def machines_page(request: Request, session: SessionDep, svc: ServicesDep) -> HTMLResponse:
    caller = session.principal
    images = image_routes.list_images(caller, svc)
    return _render(request, "machines.html", session, "machines",
                   machines=_machines(caller, svc), images=images,
                   hosts=host_routes.list_hosts(caller, svc),
                   jobs=_jobs(caller, svc, 6))


@router.get("/partials/machines")
def machine_rows(request: Request, session: SessionDep, svc: ServicesDep) -> HTMLResponse:
    return _render(request, "_machine_rows.html", session,
                   machines=_machines(session.principal, svc))


@router.get("/partials/jobs")
def job_list(request: Request, session: SessionDep, svc: ServicesDep,
             limit: Annotated[int, Query(ge=1, le=50)] = 8,
             target: Annotated[str | None, Query(max_length=255)] = None) -> HTMLResponse:
    return _render(request, "_jobs.html", session,
                   jobs=_jobs(session.principal, svc, limit, target))


@router.get("/machines/{name}")
def machine_page(name: str, request: Request, session: SessionDep,
                 svc: ServicesDep) -> HTMLResponse:
    caller = session.principal
    machine = machine_routes.get_machine(name, caller, svc)
    events = job_routes.list_events(caller, svc, limit=30, before=None, after=None, target=name)
    return _render(request, "machine.html", session, "machines", m=machine,
                   events=events.items, jobs=_jobs(caller, svc, 5, name),
                   can_manage=caller.can_manage(machine.project))


@router.get("/partials/machines/{name}")
def machine_summary(name: str, request: Request, session: SessionDep,
                    svc: ServicesDep) -> HTMLResponse:
    caller = session.principal
    machine = machine_routes.get_machine(name, caller, svc)
    return _render(request, "_machine_summary.html", session, m=machine,
                   can_manage=caller.can_manage(machine.project))


@router.get("/images")
def images_page(request: Request, session: SessionDep, svc: ServicesDep) -> HTMLResponse:
    caller = session.principal
    return _render(request, "images.html", session, "images",
                   images=image_routes.list_images(caller, svc),
                   jobs=[j for j in _jobs(caller, svc, 30) if j.kind == "import"][:6])


@router.get("/partials/images")
def image_rows(request: Request, session: SessionDep, svc: ServicesDep) -> HTMLResponse:
    return _render(request, "_image_rows.html", session,
                   images=image_routes.list_images(session.principal, svc))


@router.get("/hosts")
def hosts_page(request: Request, session: SessionDep, svc: ServicesDep) -> HTMLResponse:
    caller = session.principal
    return _render(request, "hosts.html", session, "hosts",
                   hosts=host_routes.list_hosts(caller, svc),
                   pools=host_routes.list_pools(caller, svc),
                   space=_space(caller, svc),
                   jobs=_jobs(caller, svc, 6))


@router.get("/partials/hosts")
def host_cards(request: Request, session: SessionDep, svc: ServicesDep) -> HTMLResponse:
    """The hosts' cards, refreshed in place: states and claims change as machines move."""
    return _render(request, "_host_cards.html", session,
                   hosts=host_routes.list_hosts(session.principal, svc))


@router.get("/audit")
def audit_page(request: Request, session: SessionDep, svc: ServicesDep,
               before: Annotated[int | None, Query(ge=1)] = None,
               actor: Annotated[str | None, Query(max_length=63)] = None) -> HTMLResponse:
    entries = job_routes.list_audit(session.principal, svc, limit=100, before=before,
                                    actor=actor or None)
    return _render(request, "audit.html", session, "audit", entries=entries.items,
                   next=entries.next, actor=actor or "")


# -- what the pages show ---------------------------------------------------------------


def _machines(caller: Principal, svc: ServicesDep) -> list[MachineOut]:
    """Like ``GET /machines``: the caller's projects, power from the latest sweep."""
    machines = svc.ctx.store.list_machines(where=MachineFilter(projects=caller.projects),
                                           limit=1000)
    return [MachineOut.of(m, svc.sweeper.state(m.name)) for m in machines]


def _jobs(caller: Principal, svc: ServicesDep, limit: int,
          target: str | None = None) -> list[JobOut]:
    return job_routes.list_jobs(caller, svc, limit=limit, before=None, state=None,
                                target=target).items


def _overview(caller: Principal, svc: ServicesDep) -> dict[str, Any]:
    machines = _machines(caller, svc)
    power = Counter(m.power.value if m.power else "missing" for m in machines)
    jobs = _jobs(caller, svc, 8)
    return {
        "hosts": host_routes.list_hosts(caller, svc),
        "machine_total": len(machines),
        "power": sorted(power.items(), key=lambda kv: (-kv[1], kv[0])),
        "running": power.get("running", 0),
        "jobs": jobs,
        "active_jobs": sum(j.state in ACTIVE_JOBS for j in jobs),
        "image_count": len(image_routes.list_images(caller, svc)),
        "events": job_routes.list_events(caller, svc, limit=8, before=None, after=None,
                                         target=None).items,
    }


def _space(caller: Principal, svc: ServicesDep) -> dict[tuple[str, str], PoolUsage]:
    """Admins see each pool's filesystem use and what its machines own; a host that
    does not answer leaves the column empty rather than the page broken."""
    if not caller.is_admin:
        return {}
    try:
        return {(u.host, u.pool): u for u in usage_ops.pool_usage(svc.ctx)}
    except CorralError:
        return {}


def _local(target: str) -> str:
    """Only the console's own pages after login (no open redirect).

    Browsers drop tabs and newlines from URLs, so "/\t/evil.example" would become
    "//evil.example": any control character, space or backslash sends home instead.
    """
    if (
        not target.startswith("/ui/")
        or any(ch <= " " or ch in "\\\x7f" for ch in target)
        or urlsplit(target).netloc
    ):
        return "/ui/"
    return target


# -- wiring ----------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Mount the console on the API app: ``/`` lands on the dashboard (or the login)."""
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _exc: LoginRequired) -> Response:
        there = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        to = f"{LOGIN}?next={quote(there, safe='/')}"
        if request.headers.get("HX-Request"):
            return Response(status_code=204, headers={"HX-Redirect": to})
        return RedirectResponse(to, status_code=303)

    previous = app.exception_handlers.get(CorralError)

    @app.exception_handler(CorralError)
    async def page_error(request: Request, exc: CorralError) -> Response:
        """On the console's pages an error is a page; on the API, a problem document."""
        if request.url.path.startswith("/ui/") and not request.headers.get("HX-Request"):
            return templates.TemplateResponse(
                request, "error.html",
                {"me": None, "csrf": "", "page": "", "status": exc.http_status,
                 "message": str(exc)},
                status_code=exc.http_status,
            )
        assert previous is not None
        response = previous(request, exc)
        if inspect.isawaitable(response):
            response = await response
        return response
