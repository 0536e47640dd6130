"""What the server keeps for its lifetime: one context, a job worker, the power sweeper
and the login throttle."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from corral.errors import CorralError, TooManyRequests
from corral.model import PowerState
from corral.ops.accounts import Principal, expired, invalid_token, resolve_token
from corral.ops.context import Context

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


class PowerSweeper:
    """Every machine's power state, refreshed in the background with one bulk call.

    Listings read the last sweep instead of asking libvirt per machine per request.
    """

    def __init__(self, ctx: Context, interval: float) -> None:
        self._ctx = ctx
        self._interval = interval
        self._states: dict[str, PowerState] = {}
        self.version = 0
        """Changes whenever a sweep finds any state different from the one before."""
        self.swept_at: float | None = None
        self.healthy = False
        """Whether the last sweep reached the host's libvirtd."""
        self._stop = threading.Event()
        self._sweeping = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="corral-sweep", daemon=True)

    def start(self) -> None:
        self.sweep()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def sweep(self) -> dict[str, PowerState]:
        # Requests sweep too (after a power action): one at a time, so an older
        # answer never overwrites a newer one.
        with self._sweeping:
            try:
                states = self._ctx.driver.power_states()
                if states != self._states:
                    self._states = states
                    self.version += 1
                self.swept_at = time.monotonic()
                self.healthy = True
            except CorralError as exc:
                self.healthy = False
                log.warning("power sweep failed: %s", exc)
            except Exception:
                self.healthy = False  # keep sweeping: states must not freeze silently
                log.exception("power sweep failed unexpectedly")
            return self._states

    def state(self, name: str) -> PowerState | None:
        return self._states.get(name)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sweep()


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
