"""A machine's serial console over a WebSocket, for the web console's terminal.

The browser authenticates with its session cookie (scripts may send a bearer token).
A WebSocket handshake carries cookies whatever page opened it, so the Origin must be
this server's own (cross-site WebSocket hijacking); a cookie without an Origin is
refused too. The caller must be able to see the machine (else it is "not found") and
to manage it. Bytes are bridged to the driver's console loop through a socket pair:
when the browser goes, our end is shut, the loop reads end of input and returns.

Close codes: 4401 not logged in, 4403 not allowed, 4404 no such machine, 4409 not
running or the console is taken, 1011 another failure; 1000 when the console ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from corral.api.deps import SESSION_COOKIE
from corral.api.routers.machines import visible
from corral.api.services import Services
from corral.errors import CorralError, Forbidden, NotFound, Unauthenticated
from corral.ops.context import HostHandle

log = logging.getLogger(__name__)
router = APIRouter(tags=["machines"])
_CHUNK = 4096
_BACKLOG = 4096


def same_origin(websocket: WebSocket) -> bool:
    """Whether the handshake's Origin names the host it was sent to."""
    origin = websocket.headers.get("origin")
    host = websocket.headers.get("host")
    if not origin or not host:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def _credentials(websocket: WebSocket) -> tuple[str | None, bool]:
    """The presented token, and whether it came from the browser's cookie."""
    auth = websocket.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), False
    return websocket.cookies.get(SESSION_COOKIE), True


def _code(exc: CorralError) -> int:
    if isinstance(exc, Unauthenticated):
        return 4401
    if isinstance(exc, NotFound):
        return 4404
    if isinstance(exc, Forbidden):
        return 4403
    return 4000 + exc.http_status if 400 <= exc.http_status < 500 else 1011


def _reason(message: str) -> str:
    """A close reason must fit in 123 bytes of UTF-8."""
    data = message.encode()
    return message if len(data) <= 123 else data[:120].decode(errors="ignore") + "…"


@router.websocket("/machines/{name}/console")
async def console(websocket: WebSocket, name: str) -> None:
    """Interactive serial console: binary frames both ways (text frames are accepted)."""
    token, from_cookie = _credentials(websocket)
    checks_origin = websocket.headers.get("origin") is not None or from_cookie
    if checks_origin and not same_origin(websocket):
        await websocket.close(code=4403, reason="cross-origin console refused")
        return
    svc: Services = websocket.app.state.services
    ctx = svc.ctx
    await websocket.accept()
    try:
        if not token:
            raise Unauthenticated("This console needs credentials: log in.")
        principal, _ = await svc.authenticate(token)
        machine = await anyio.to_thread.run_sync(visible, ctx, principal, name)
        principal.require_manage(machine.project)
    except CorralError as exc:
        await websocket.close(code=_code(exc), reason=_reason(str(exc)))
        return
    await anyio.to_thread.run_sync(
        ctx.store.add_audit, principal.name, "WS /machines/{name}/console",
        websocket.url.path, 101,
    )
    try:
        handle = await anyio.to_thread.run_sync(ctx.on, machine.host)
    except CorralError as exc:
        await websocket.close(code=_code(exc), reason=_reason(str(exc)))
        return
    backlog = await anyio.to_thread.run_sync(_backlog, handle, name)
    if backlog:
        await websocket.send_bytes(backlog)
    await _bridge(websocket, handle, name)


def _backlog(handle: HostHandle, name: str) -> bytes:
    """The last few lines the guest printed before this session, so a console opened
    on a quiet guest does not start blank. The stream carries everything after."""
    try:
        data = handle.read_console(name, _BACKLOG)
    except (OSError, CorralError):
        return b""
    if len(data) == _BACKLOG:
        data = data.partition(b"\n")[2]  # start at a whole line
    return data


async def _bridge(websocket: WebSocket, handle: HostHandle, name: str) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    failure: list[CorralError] = []
    attached = anyio.Event()

    def attach() -> None:
        try:
            handle.driver.attach_console(name, theirs.fileno(), theirs.fileno())
        except CorralError as exc:
            failure.append(exc)
        except Exception:
            log.exception("the console of %s failed", name)
            failure.append(CorralError("The console failed; see the server's log."))
        finally:
            # The loop is over: our reader sees end of file and closes the WebSocket.
            with contextlib.suppress(OSError):
                theirs.shutdown(socket.SHUT_RDWR)

    async def run_attach() -> None:
        try:
            await anyio.to_thread.run_sync(attach)
        finally:
            attached.set()

    def end_input() -> None:
        """End of input for the console loop: it returns, and its thread ends."""
        with contextlib.suppress(OSError):
            ours.shutdown(socket.SHUT_WR)

    async def browser_to_guest() -> None:
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes") or (message.get("text") or "").encode()
                if data:
                    await loop.sock_sendall(ours, data)
        except (WebSocketDisconnect, OSError, RuntimeError):
            return
        finally:
            end_input()

    async def guest_to_browser() -> None:
        browser_gone = False
        while True:
            try:
                data = await loop.sock_recv(ours, _CHUNK)
            except OSError:
                return
            if not data:
                return
            if browser_gone:
                continue  # drain until the loop has ended
            try:
                await websocket.send_bytes(data)
            except Exception:  # the browser went away mid-send
                browser_gone = True
                end_input()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_attach)
            tg.start_soon(browser_to_guest)
            await guest_to_browser()
            await attached.wait()
            if failure:
                code, reason = _code(failure[0]), _reason(str(failure[0]))
            else:
                code, reason = 1000, "console closed"
            with contextlib.suppress(Exception):
                await websocket.close(code=code, reason=reason)
            tg.cancel_scope.cancel()
    finally:
        ours.close()
        theirs.close()
