"""The CLI against a Corral server: an HTTP client and the remote :class:`Backend`.

Problem documents (RFC 9457) come back as the ``corral.errors`` class of their status
(refined by their ``type``), so the CLI's one error boundary prints the server's
sentence and exits with the same code as if the work had been done locally.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from corral import __version__, errors
from corral.cli import credentials
from corral.cli.backend import Batch, Board, HostRequest, ImportRequest, Progress, Row
from corral.errors import (
    Conflict,
    CorralError,
    Forbidden,
    GuestTimeout,
    HypervisorUnavailable,
    InvalidInput,
    NoSpace,
    NotFound,
    TooManyRequests,
    Unauthenticated,
)
from corral.model import CloneMode, HostPlacement, JobState, MachineSpec
from corral.ops.snapshot_clone import SnapshotRef

_CHUNK = 1 << 20
_RUNNING = (JobState.PENDING.value, JobState.RUNNING.value)
_TIMEOUT = httpx.Timeout(connect=10, read=660, write=660, pool=10)
"""Reads wait out a graceful stop (up to the server's stop timeout) and more."""


class ServerUnreachable(CorralError):
    """No HTTP answer at all: refused, unresolvable, timed out."""

    exit_code = 7
    http_status = 503


_BY_STATUS: dict[int, type[CorralError]] = {
    400: InvalidInput,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: InvalidInput,
    422: InvalidInput,
    429: TooManyRequests,
    503: HypervisorUnavailable,
    504: GuestTimeout,
    507: NoSpace,
}


def _subclasses(cls: type[CorralError]) -> Iterator[type[CorralError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _slug(name: str) -> str:
    return "".join(f"-{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


_BY_TYPE = {
    f"/problems/{_slug(c.__name__)}": c
    for c in _subclasses(CorralError)
    if c.__module__ == errors.__name__
}


def problem_error(response: httpx.Response) -> CorralError:
    """The Corral error a problem answer stands for, carrying the server's sentence."""
    status = response.status_code
    try:
        body = response.json()
        detail = str(body["detail"])
        kind = str(body.get("type", ""))
    except (ValueError, KeyError, TypeError):
        return CorralError(
            f"The server answered {status} {response.reason_phrase or ''}".rstrip() + "."
        )
    cls = _BY_TYPE.get(kind)
    if cls is None or cls.http_status != status:
        cls = _BY_STATUS.get(status, CorralError)
    exc = cls.__new__(cls)
    CorralError.__init__(exc, detail)  # the server's sentence already holds the hint
    if isinstance(exc, TooManyRequests):
        retry = response.headers.get("retry-after", "")
        exc.retry_after = int(retry) if retry.isdigit() else 60
    return exc


class Client:
    """An API client: bearer token, problem documents mapped to Corral errors."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        headers = {"User-Agent": f"corral-cli/{__version__}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=url, headers=headers, timeout=_TIMEOUT)

    def close(self) -> None:
        self.http.close()

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(
                f"The Corral server at {self.url} did not answer in time."
            ) from exc
        except httpx.TransportError as exc:
            reason = "connection refused" if isinstance(exc, httpx.ConnectError) else "no answer"
            raise ServerUnreachable(
                f"Cannot reach the Corral server at {self.url} ({reason}).",
                hint="Check the URL and that 'corral serve' runs there.",
            ) from exc

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._reaching():
            response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise problem_error(response)
        return response

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        response = self.request("POST", path, json=body, params=clean)
        return response.json() if response.content else None

    def delete(self, path: str, **params: Any) -> Any:
        response = self.request("DELETE", path, params=params)
        return response.json() if response.content else None

    def send(self, method: str, path: str, body: Any) -> Any:
        """PUT or PATCH a JSON body."""
        response = self.request(method, path, json=body)
        return response.json() if response.content else None

    def follow(self, job: Row, on_update: Callable[[Row], None] = lambda job: None) -> Row:
        """Follow a job to its end over Server-Sent Events; poll if the stream breaks."""
        last = job
        if last["state"] in _RUNNING:
            try:
                with self._reaching(), self.http.stream(
                    "GET", f"/jobs/{job['id']}/stream",
                    headers={"Accept": "text/event-stream"},
                    timeout=httpx.Timeout(10, read=None),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise problem_error(response)
                    for event in _sse(response.iter_lines()):
                        last = event
                        on_update(last)
            except ServerUnreachable:
                pass  # the stream broke off; polling below says whether the server is gone
        while last["state"] in _RUNNING:
            time.sleep(0.25)
            last = self.get(f"/jobs/{job['id']}")
            on_update(last)
        return last


def _sse(lines: Iterator[str]) -> Iterator[Row]:
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


def job_failure(job: Row) -> CorralError:
    return CorralError(
        f"Job {job['id']} ({job['kind']} {job['target']}) {job['state']}: "
        f"{job['error'] or 'no reason given'}"
    )


# -- answers as render dicts -------------------------------------------------------------


def iso(value: str | None) -> str | None:
    return None if value is None else datetime.fromisoformat(value).isoformat()


def machine_row(m: Row) -> Row:
    usage = m.get("usage") or {}
    return {
        "name": m["name"],
        "project": m["project"],
        "state": m["power"] or "missing",
        "record": m["record_state"],
        "host": m["host"],
        "image": m["image"],
        "clone": m["clone"],
        "uuid": m["uuid"],
        "mac": m["mac"],
        "hostname": m["hostname"],
        "instance_id": m.get("instance_id"),
        "cpus": m["cpus"],
        "memory_bytes": m["memory_bytes"],
        "disk_path": m.get("disk_path"),
        "seed_path": None,
        "virtual_size": usage.get("virtual_size"),
        "owned_bytes": usage.get("owned_bytes"),
        "shared_bytes": usage.get("shared_bytes"),
        "adopted": not m["managed"],
    }


def image_row(i: Row) -> Row:
    return {
        "name": i["name"],
        "project": i["project"],
        "path": None,
        "source_format": i["source_format"],
        "virtual_size": i["virtual_size"],
        "sha256": i["sha256"],
        "boot": "kernel" if i["kernel_boot"] else "disk",
        "kernel": None,
        "initrd": None,
        "cmdline": None,
        "created_at": iso(i["created_at"]),
    }


def host_row(h: Row) -> Row:
    return {
        "name": h["name"],
        "uri": h["uri"],
        "hostname": None,
        "arch": None,
        "cpu_model": h["cpu_model"],
        "cpus": h["cpus"],
        "memory_bytes": h["memory_bytes"],
        "hypervisor": None,
        "accelerator": h["accelerator"],
        "accelerator_note": h["accelerator_note"],
        "pool": h["pool_name"],
        "pool_path": h["pool_path"],
        "pool_bytes": h["disk_bytes"],
        "state": h["state"],
        "state_note": h["state_note"],
        "tags": h["tags"],
        "cpu_score": h["cpu_score"],
        "claimed": h["claimed"],
    }


def job_row(j: Row) -> Row:
    return {
        "id": j["id"],
        "kind": j["kind"],
        "target": j["target"],
        "state": j["state"],
        "error": j["error"],
        "created_at": iso(j["created_at"]),
        "finished_at": iso(j["finished_at"]),
        "steps": [{"name": s["name"], "state": s["state"]} for s in j["steps"]],
    }


def _doing(job: Row) -> str:
    state = str(job["state"])
    if state not in _RUNNING:
        return state
    current = next((str(s["name"]) for s in job["steps"] if s["state"] == "started"), None)
    return current or state


# -- the backend -----------------------------------------------------------------------


class RemoteBackend:
    def __init__(self, client: Client) -> None:
        self.api = client

    @classmethod
    @contextmanager
    def connect(cls, server: str | None) -> Iterator[RemoteBackend]:
        client = connect(server)
        try:
            yield cls(client)
        finally:
            client.close()

    def machines(self) -> list[Row]:
        rows: list[Row] = []
        after: str | None = None
        while True:
            page = self.api.get("/machines", limit=1000, after=after)
            rows += [machine_row(m) for m in page["items"]]
            after = page["next"]
            if after is None:
                return rows

    def machine(self, name: str) -> Row:
        return machine_row(self.api.get(f"/machines/{name}"))

    def plan_placement(self, spec: MachineSpec, count: int) -> list[Row]:
        body = {**_create_body(spec, count), "dry_run": True}
        placements: list[Row] = self.api.post("/machines", body)["placements"]
        return placements

    def create_machines(
        self, spec: MachineSpec, count: int, *, wait: bool, timeout: float | None
    ) -> Batch:
        body = _create_body(spec, count)
        jobs: list[Row] = self.api.post("/machines", body)["jobs"]
        names = [j["target"] for j in jobs]
        failed: dict[str, CorralError] = {}
        made: list[str] = []
        with Board(names, "pending") as board:
            for job in jobs:
                end = self.api.follow(job, lambda j: board.update(j["target"], _doing(j)))
                if end["state"] == JobState.SUCCEEDED.value:
                    made.append(end["target"])
                    board.update(end["target"], "created")
                else:
                    failed[end["target"]] = job_failure(end)
            if spec.start and made:
                made = self._until_running(made, failed, board, timeout or 180.0)
        return Batch([self.machine(n) for n in made], failed)

    def _until_running(
        self, names: list[str], failed: dict[str, CorralError], board: Board, timeout: float
    ) -> list[str]:
        """The server starts new machines in turn after provisioning them, and deletes
        one that will not start; wait until each runs or is gone."""
        deadline = time.monotonic() + timeout
        waiting = list(names)
        while waiting:
            for name in list(waiting):
                try:
                    power = self.api.get(f"/machines/{name}")["power"]
                except NotFound:
                    failed[name] = CorralError(f"Machine '{name}' did not start; "
                                               "the server deleted it ('corral job list').")
                    waiting.remove(name)
                    continue
                if power == "running":
                    board.update(name, "running")
                    waiting.remove(name)
            if waiting and time.monotonic() > deadline:
                late = ", ".join(f"'{n}'" for n in waiting)
                raise GuestTimeout(f"{late} did not start running within {timeout:.0f} s.")
            if waiting:
                time.sleep(0.25)
        return [n for n in names if n not in failed]

    def _power(self, action: str, name: str, **params: Any) -> None:
        self.api.post(f"/machines/{name}/{action}", **params)

    def start(self, name: str) -> None:
        self._power("start", name)

    def stop(self, name: str, timeout: float | None) -> bool:
        self._power("stop", name, timeout=timeout)
        return True  # the API answers with the machine, not with how it went down

    def reboot(self, name: str) -> None:
        self._power("reboot", name)

    def kill(self, name: str) -> None:
        self._power("kill", name)

    def _run(self, accepted: Row, on_update: Callable[[Row], None] = lambda job: None) -> Row:
        end = self.api.follow(accepted["jobs"][0], on_update)
        if end["state"] != JobState.SUCCEEDED.value:
            raise job_failure(end)
        return end

    def delete_machine(self, name: str, *, force: bool) -> None:
        self._run(self.api.delete(f"/machines/{name}", force=str(force).lower()))

    def clone_machine(self, source: str, new: str, mode: CloneMode) -> Row:
        self._run(self.api.post(f"/machines/{source}/clone", {"name": new, "clone": mode.value}))
        return self.machine(new)

    def create_from_snapshot(
        self, ref: SnapshotRef, new: str, mode: CloneMode, *, start: bool, wait: bool,
        timeout: float | None,
    ) -> Row:
        # As create_machines: the server starts the machine after its job (deleting it
        # if it will not start); --wait waits until it runs.
        accepted = self.api.post(f"/machines/{ref.machine}/snapshots/{ref.snapshot}/clone",
                                 {"name": new, "clone": mode.value, "start": start})
        failed: dict[str, CorralError] = {}
        with Board([new], "pending") as board:
            self._run(accepted, lambda j: board.update(new, _doing(j)))
            board.update(new, "created")
            if start:
                self._until_running([new], failed, board, timeout or 180.0)
        if failed:
            raise failed[new]
        return self.machine(new)

    def images(self) -> list[Row]:
        return [image_row(i) for i in self.api.get("/images")]

    def image(self, name: str) -> Row:
        d = image_row(self.api.get(f"/images/{name}"))
        users: list[str] = []
        after: str | None = None
        while True:
            page = self.api.get("/machines", image=name, limit=1000, after=after)
            users += [m["name"] for m in page["items"]]
            after = page["next"]
            if after is None:
                break
        d["used_by"] = users
        return d

    def import_image(self, req: ImportRequest, progress: Progress) -> Row:
        if req.kernel or req.initrd or req.cmdline:
            raise InvalidInput(
                "A server import takes the disk image only; --kernel, --initrd and "
                "--cmdline work with a local import."
            )
        name = req.name or _default_name(req.file)
        try:
            size = req.file.stat().st_size
            source = req.file.open("rb")
        except OSError as exc:
            raise InvalidInput(f"Cannot read {req.file}: {exc.strerror}.") from exc
        what = f"uploading {req.file.name}"

        def chunks() -> Iterator[bytes]:
            sent = 0
            progress(what, 0)
            while chunk := source.read(_CHUNK):
                sent += len(chunk)
                progress(what, 100 * sent / max(size, 1))
                yield chunk

        with source:
            response = self.api.request(
                "POST", "/images",
                params={"name": name, **({"format": req.fmt.value} if req.fmt else {})},
                content=chunks(),
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(size)},
            )
        importing = f"importing {name} on the server"
        self._run(response.json(), lambda j: progress(importing, 100 * j["progress"]))
        return image_row(self.api.get(f"/images/{name}"))

    def delete_image(self, name: str) -> None:
        self.api.delete(f"/images/{name}")

    def capture_image(self, machine: str, name: str, *, seal: bool, progress: Progress) -> Row:
        what = f"capturing {machine}"
        accepted = self.api.post("/images/capture",
                                 {"machine": machine, "name": name, "seal": seal})
        self._run(accepted, lambda job: progress(what, 100 * float(job.get("progress") or 0)))
        d = image_row(self.api.get(f"/images/{name}"))
        lines: list[str] = []
        if seal:
            # The job says what it did in an event on the image (ops.capture): "Sealed
            # image NAME from machine M: emptied /etc/machine-id; removed ...".
            events = self.api.get("/events", target=name, limit=50)["items"]
            sealed = next((e for e in events if e["kind"] == "image.sealed"), None)
            if sealed is not None:
                what_was_done = sealed["message"].partition(": ")[2].removesuffix(".")
                if what_was_done != "nothing to remove":
                    lines = what_was_done.split("; ")
        return {**d, "sealed": seal, "seal_report": lines}

    def hosts(self) -> list[Row]:
        return [host_row(h) for h in self.api.get("/hosts")]

    def host(self, name: str) -> Row:
        return host_row(self.api.get(f"/hosts/{name}"))

    def add_host(self, req: HostRequest) -> Row:
        p = req.placement
        return host_row(self.api.post("/hosts", {
            "name": req.name, "uri": req.uri, "pool_path": req.pool_path,
            "network": req.network, "tags": sorted(p.tags), "cpu_ratio": p.cpu_ratio,
            "memory_ratio": p.memory_ratio, "disk_ratio": p.disk_ratio,
            "accelerator": req.accelerator,
        }))

    def set_host_placement(self, name: str, placement: HostPlacement) -> Row:
        return host_row(self.api.send("PATCH", f"/hosts/{name}", {
            "tags": sorted(placement.tags), "cpu_ratio": placement.cpu_ratio,
            "memory_ratio": placement.memory_ratio, "disk_ratio": placement.disk_ratio,
        }))

    def set_maintenance(self, name: str, on: bool) -> Row:
        return host_row(self.api.send("PUT", f"/hosts/{name}/maintenance", {"on": on}))

    def remove_host(self, name: str) -> None:
        self.api.delete(f"/hosts/{name}")

    def check_hosts(self) -> tuple[list[Row], list[Row]]:
        report = self.api.post("/hosts/check")
        return list(report["changes"]), [host_row(h) for h in report["hosts"]]

    def explain_placement(self, spec: MachineSpec) -> Row:
        explained: Row = self.api.post("/placement/explain", _create_body(spec, 1))
        return explained

    def rebalance(self, max_moves: int) -> list[Row]:
        moves: list[Row] = self.api.get("/pool/rebalance")["moves"]
        return moves[:max_moves]

    def migrate(self, name: str, to: str | None, live: bool, progress: Progress) -> Row:
        started = time.monotonic()
        before = self.api.get(f"/machines/{name}")
        what = f"moving {name}" + (" live" if live else "")
        end = self._run(self.api.post(f"/machines/{name}/migrate", {"to": to, "live": live}),
                        lambda job: progress(what, 100 * float(job.get("progress") or 0)))
        after = self.api.get(f"/machines/{name}")
        return {"machine": name, "state": "moved", "source": before["host"],
                "target": after["host"], "live": live,
                "shared_storage": after["disk_path"] == before["disk_path"],
                "seconds": round(time.monotonic() - started, 2), "job": end["id"]}

    def pool_usage(self, host: str | None) -> list[Row]:
        return list(self.api.get("/pools/usage", host=host))

    def storage_pools(self) -> list[Row]:
        return list(self.api.get("/pools"))

    def storage_pool(self, name: str) -> Row:
        pool: Row = self.api.get(f"/pools/{name}")
        return pool

    def add_storage_pool(self, name: str, type_: str, path: str) -> Row:
        pool: Row = self.api.post("/pools", {"name": name, "type": type_, "path": path})
        return pool

    def remove_storage_pool(self, name: str) -> None:
        self.api.delete(f"/pools/{name}")

    def snapshots(self, name: str) -> list[Row]:
        return list(self.api.get(f"/machines/{name}/snapshots"))

    def create_snapshot(self, name: str, snapshot: str, description: str | None) -> Row:
        made: Row = self.api.post(f"/machines/{name}/snapshots",
                                  {"name": snapshot, "description": description})
        return made

    def revert_snapshot(self, name: str, snapshot: str) -> Row:
        reverted: Row = self.api.post(f"/machines/{name}/snapshots/{snapshot}/revert")
        return reverted

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        self.api.delete(f"/machines/{name}/snapshots/{snapshot}")

    def evacuate(self, host: str, on_move: Callable[[Row], None]) -> list[Row]:
        # The same moves the server's own evacuation makes: maintenance first, then each
        # machine where the scheduler places it at that moment.
        self.set_maintenance(host, True)
        names = [m["name"] for m in self.api.get("/machines", host=host, limit=1000)["items"]]
        return self._moves([(n, None) for n in names], on_move)

    def carry_out_rebalance(self, max_moves: int, on_move: Callable[[Row], None]) -> list[Row]:
        return self._moves([(m["machine"], m["target"]) for m in self.rebalance(max_moves)],
                           on_move)

    def _moves(self, moves: list[tuple[str, str | None]],
               on_move: Callable[[Row], None]) -> list[Row]:
        rows = []
        for name, to in moves:
            try:
                live = self.api.get(f"/machines/{name}")["power"] in ("running", "paused")
                row = self.migrate(name, to, live, lambda what, pct: None)
            except errors.CorralError as exc:
                row = {"machine": name, "state": "failed", "error": str(exc)}
            on_move(row)
            rows.append(row)
        return rows

    def jobs(self, state: JobState | None, limit: int) -> list[Row]:
        page = self.api.get("/jobs", limit=limit, state=state.value if state else None)
        return [job_row(j) for j in page["items"]]

    def job(self, job_id: int) -> Row:
        return job_row(self.api.get(f"/jobs/{job_id}"))


def _default_name(source: Path) -> str:
    """The name a local import would give (see ``corral.ops.images``)."""
    stem = source.name.split(".")[0].lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in stem).strip("-") or "image"


def connect(server: str | None) -> Client:
    """A client for ``server`` (or the saved one), with the saved token when it is for
    that server."""
    saved = credentials.load()
    if server is not None:
        url = credentials.normalize(server)
    elif saved is not None:
        url = saved.server
    else:
        raise InvalidInput("No server given and none logged in to.",
                           hint="Pass --server URL or run 'corral login'.")
    token = saved.token if saved is not None and saved.server == url else None
    return Client(url, token)


def _create_body(spec: MachineSpec, count: int) -> dict[str, Any]:
    """POST /machines, as the API takes it."""
    h = spec.placement
    body: dict[str, Any] = {
        "name": spec.name,
        "image": spec.image,
        "count": count,
        "cpus": spec.cpus,
        "memory_bytes": spec.memory_bytes,
        "disk_bytes": spec.disk_bytes,
        "clone": spec.clone.value,
        "ssh_keys": list(spec.ssh_keys),
        "start": spec.start,
        "host": h.host,
        "tags": sorted(h.tags),
        "group": h.group,
        "policy": h.policy.value if h.policy else None,
        "soft": not h.hard,
        "fast": h.fast,
        "pool": spec.pool,
    }
    return body
