"""What the server keeps for its lifetime: one context, a job worker, the power sweeper
and the login throttle."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from corral.errors import CorralError, TooManyRequests
from corral.model import Host, HostState, PowerState
from corral.ops import hosts as host_ops
from corral.ops.accounts import Principal, expired, invalid_token, resolve_token
from corral.ops.context import Context
from corral.ops.hosts import HealthChange

log = logging.getLogger(__name__)
T = TypeVar("T")


class JobWorker:
    """Runs accepted jobs after the request that wrote them has answered 202.

    On shutdown, jobs not yet begun stay pending in the store under this process's
    owner lock; the next start recovers them like any interrupted job.
    """

    def __init__(self, max_workers: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="corral-job")

    def submit(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        def report(future: Future[Any]) -> None:
            exc = future.exception()
            if isinstance(exc, CorralError):
                log.warning("%s failed: %s", what, exc)
            elif exc is not None:
                log.error("%s failed unexpectedly", what, exc_info=exc)

        self._pool.submit(fn, *args).add_done_callback(report)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Periodic:
    """A daemon thread that calls ``run`` every ``interval`` seconds until stopped."""

    def __init__(self, name: str, interval: float) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.run()


class PowerSweeper(_Periodic):
    """Every machine's power state, refreshed in the background: one bulk call per host
    that is not down (in maintenance, machines keep running), all hosts at once.

    Listings read the last sweep instead of asking libvirt per machine per request. A
    host that fails is skipped (its machines keep the states last seen); the others'
    states are still refreshed.
    """

    def __init__(self, ctx: Context, interval: float) -> None:
        super().__init__("corral-sweep", interval)
        self._ctx = ctx
        self._by_host: dict[str, dict[str, PowerState]] = {}
        self._states: dict[str, PowerState] = {}
        self.version = 0
        """Changes whenever a sweep finds any state different from the one before."""
        self.swept_at: float | None = None
        self.healthy = False
        """Whether the last sweep reached every host it asked."""
        self._sweeping = threading.Lock()

    def start(self) -> None:
        self.sweep()
        super().start()

    def run(self) -> None:
        self.sweep()

    def sweep(self) -> dict[str, PowerState]:
        # Requests sweep too (after a power action): one at a time, so an older
        # answer never overwrites a newer one.
        with self._sweeping:
            try:
                hosts = [h for h in self._ctx.store.list_hosts() if h.state is not HostState.DOWN]
                answers = self._ask(hosts)
                by_host = {h.name: answers.get(h.name, self._by_host.get(h.name, {}))
                           for h in hosts}
                states = {name: state for part in by_host.values()
                          for name, state in part.items()}
                self._by_host = by_host
                if states != self._states:
                    self._states = states
                    self.version += 1
                self.swept_at = time.monotonic()
                self.healthy = len(answers) == len(hosts)
            except Exception:
                self.healthy = False  # keep sweeping: states must not freeze silently
                log.exception("power sweep failed unexpectedly")
            return self._states

    def _ask(self, hosts: list[Host]) -> dict[str, dict[str, PowerState]]:
        """Each host's answer; a host that fails or is slower than the host timeout is
        left out."""
        def one(host: Host) -> dict[str, PowerState]:
            return self._ctx.on(host).driver.power_states()

        answers: dict[str, dict[str, PowerState]] = {}
        if len(hosts) == 1:  # the usual case: no thread hop
            try:
                answers[hosts[0].name] = one(hosts[0])
            except CorralError as exc:
                log.warning("power sweep of host %s failed: %s", hosts[0].name, exc)
            return answers
        pool = ThreadPoolExecutor(max_workers=min(16, len(hosts)) or 1,
                                  thread_name_prefix="corral-sweep-host")
        try:
            futures = {h.name: pool.submit(one, h) for h in hosts}
            deadline = time.monotonic() + self._ctx.settings.host_timeout
            for name, future in futures.items():
                try:
                    answers[name] = future.result(max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    log.warning("power sweep of host %s: no answer in time", name)
                except CorralError as exc:
                    log.warning("power sweep of host %s failed: %s", name, exc)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return answers

    def state(self, name: str) -> PowerState | None:
        return self._states.get(name)


class HealthChecker(_Periodic):
    """Checks every host's health in the background (see ``ops.hosts.check_health``);
    no error stops it."""

    def __init__(self, ctx: Context, interval: float,
                 on_change: Callable[[HealthChange], None] = lambda c: None) -> None:
        super().__init__("corral-health", interval)
        self._ctx = ctx
        self._on_change = on_change

    def run(self) -> None:
        try:
            for change in host_ops.check_health(self._ctx, on_change=self._on_change):
                log.warning("host %s is %s: %s", change.host, change.after.value, change.note)
        except CorralError as exc:
            log.warning("host health check failed: %s", exc)
        except Exception:
            log.exception("host health check failed unexpectedly")


@dataclass
class LoginThrottle:
    """At most ``attempts`` failed logins per user name and per client address within
    ``window`` seconds; further tries are refused (429) until the window moves on."""

    attempts: int = 5
    window: float = 60.0
    remembered: int = 10_000
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, *keys: str) -> float:
        """Refuse (429) when any key is throttled; else count this attempt against
        every key now, before the slow password check, so that parallel guesses cannot
        all pass together. Returns the attempt's stamp for ``succeeded``."""
        now = time.monotonic()
        with self._lock:
            for key in keys:
                recent = self._recent(key, now)
                if len(recent) >= self.attempts:
                    retry = int(recent[0] + self.window - now) + 1
                    raise TooManyRequests(
                        f"Too many failed logins; try again in {retry} s.", retry_after=retry
                    )
            for key in keys:
                self._recent(key, now).append(now)
            if len(self._failures) > self.remembered:
                # Guessed names must not grow memory without bound: forget stale keys.
                for key in [k for k, v in self._failures.items() if not self._recent(k, now)]:
                    del self._failures[key]
        return now

    def succeeded(self, stamp: float, user_key: str, *other_keys: str) -> None:
        """The attempt was right: the user's failures are forgotten, and the attempt no
        longer counts against the other keys (a client address keeps its failures)."""
        with self._lock:
            self._failures.pop(user_key, None)
            for key in other_keys:
                recent = self._failures.get(key)
                if recent is not None and stamp in recent:
                    recent.remove(stamp)

    def _recent(self, key: str, now: float) -> deque[float]:
        recent = self._failures.setdefault(key, deque())
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        return recent


class ReadCache:
    """Answers computed from the store, reused until the store changes.

    Each entry remembers the version it was computed at (``Store.data_version`` plus
    whatever else it depends on); a different version is a miss, so a hit is always
    what a fresh read would give. Where the store has no version (PostgreSQL) nothing
    is cached. Least recently used entries go first, and a new version clears the
    old ones; give each kind of answer a cache of its own, with one kind of version.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[Hashable, Any]] = OrderedDict()
        self._version: Hashable = None
        self._lock = threading.Lock()

    def get(self, key: Hashable, version: Hashable) -> Any | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] != version:
                return None
            self._entries.move_to_end(key)
            return found[1]

    def put(self, key: Hashable, version: Hashable, value: Any) -> None:
        with self._lock:
            if version != self._version:
                # Versions never come back: entries of an older one can only waste memory.
                self._entries.clear()
                self._version = version
            self._entries[key] = (version, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


@dataclass
class Services:
    ctx: Context
    worker: JobWorker
    sweeper: PowerSweeper
    throttle: LoginThrottle
    health: HealthChecker | None = None
    tokens: ReadCache = field(default_factory=lambda: ReadCache(1024))
    pages: ReadCache = field(default_factory=ReadCache)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a hot read (tokens, machine pages) of the store.

        On SQLite, on the event loop itself: the read is a millisecond of in-process
        work, and sqlite3 drops the GIL around every row it steps, so from worker
        threads it convoys on the GIL with the loop (measured: four reads at once took
        ten times as long each as one alone). Reads over a network (PostgreSQL) go
        to a worker thread, as blocking I/O must.
        """
        if self.ctx.store.data_version() is not None:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args)

    async def authenticate(self, presented: str) -> tuple[Principal, str | None]:
        """The caller behind a token or session, and the session's CSRF value.

        Served from the cache while the store is unchanged (a revocation is a commit,
        so it takes effect at once); expiry is checked on every call.
        """
        version = self.ctx.store.data_version()
        key = ("token", presented)
        hit: tuple[Principal, str | None] | None = (
            None if version is None else self.tokens.get(key, version)
        )
        if hit is None:
            hit = await self.read(resolve_token, self.ctx.store, presented)
            if version is not None:
                self.tokens.put(key, version, hit)
        principal, csrf = hit
        if expired(principal.token):
            raise invalid_token()
        return principal, csrf
