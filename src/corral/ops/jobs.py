"""Jobs: every step is written down before it runs, and each has a compensation.

A step kind is registered by name, so a later process can compensate or finish a job
from its recorded arguments alone. A process holds an exclusive ``flock`` on its
owner file for as long as it lives (``Context.owner``), and every job it writes names
that file. When the next ``corral`` command finds a job pending or running whose lock
it can take, the process that owned it is dead, and the job is recovered:

- kinds that create something (provision, clone) roll back: the started and done
  steps are compensated in reverse order;
- kinds that remove something (delete) roll forward: the remaining steps run again;
- kinds that move something (migrate) have a *pivot* step: they roll back until it is
  done and forward after it. When a job died in the middle of its pivot, the pivot's
  ``settle`` asks the facts (libvirt, the store) whether it took effect.

Every ``run`` and ``undo`` is idempotent, because a crash can come between doing a
thing and recording that it was done.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import secrets
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError
from corral.model import HostState, Job, JobState, Step, StepState

if TYPE_CHECKING:
    from corral.ops.context import Context

log = logging.getLogger(__name__)

StepFn = Callable[["Context", dict[str, Any]], None]


class Recovery(StrEnum):
    ROLL_BACK = "roll-back"
    ROLL_FORWARD = "roll-forward"


Settle = Callable[["Context", dict[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class StepKind:
    name: str
    run: StepFn
    undo: StepFn
    settle: Settle | None = None
    """For a pivot step: whether it took effect, when it was interrupted."""


@dataclass(frozen=True, slots=True)
class JobKind:
    name: str
    recovery: Recovery
    pivot: str | None = None
    """The step after which a ROLL_BACK kind can only go forward."""


_STEPS: dict[str, StepKind] = {}
_JOBS: dict[str, JobKind] = {}


def step(name: str, *, undo: StepFn, settle: Settle | None = None) -> Callable[[StepFn], StepFn]:
    """Register a step kind: ``@step("disk.create", undo=delete_disk)``."""

    def register(run: StepFn) -> StepFn:
        _STEPS[name] = StepKind(name, run, undo, settle)
        return run

    return register


def job_kind(name: str, recovery: Recovery, pivot: str | None = None) -> JobKind:
    if pivot is not None and _STEPS.get(pivot, StepKind("", nothing, nothing)).settle is None:
        raise ValueError(f"pivot step {pivot} is not registered with a settle function")
    kind = JobKind(name, recovery, pivot)
    _JOBS[name] = kind
    return kind


def nothing(_ctx: Context, _args: dict[str, Any]) -> None:
    """The compensation of a step that changes nothing outside the record."""


@dataclass(frozen=True, slots=True)
class PlannedStep:
    name: str
    args: dict[str, Any] = field(default_factory=dict)


class JobFailed(CorralError):
    """A step failed; the job was rolled back and the original error is the cause."""


def run_job(
    ctx: Context,
    kind: JobKind,
    target: str,
    steps: Sequence[PlannedStep],
    *,
    project: str | None = None,
) -> Job:
    """Persist the job, then run it (see ``execute_job``)."""
    return execute_job(ctx, prepare_job(ctx, kind, target, steps, project=project))


def prepare_job(
    ctx: Context,
    kind: JobKind,
    target: str,
    steps: Sequence[PlannedStep],
    *,
    project: str | None = None,
    exclusive: bool = False,
) -> Job:
    """Write the job down, pending, with every step's arguments; run nothing yet.

    The API answers 202 with this job, then a worker of the same process executes it.
    ``exclusive``: refused (Conflict) while another job on ``target`` is under way.
    """
    check_steps(steps)
    return ctx.store.create_job(
        kind.name,
        target,
        ctx.owner,
        [Step(s.name, StepState.PENDING, s.args) for s in steps],
        project=project,
        exclusive=exclusive,
    )


def check_steps(steps: Sequence[PlannedStep]) -> None:
    """A job may only be written with steps some code can run and undo."""
    unknown = [s.name for s in steps if s.name not in _STEPS]
    if unknown:
        raise ValueError(f"unregistered steps: {unknown}")


def execute_job(ctx: Context, job: Job) -> Job:
    """Run a pending job's steps in order, each outcome committed before the next.

    On an error, the steps already started are compensated in reverse (or, for a
    roll-forward kind, the job is marked failed) and the original error is raised
    again; cleanup failures are logged, never hide it.
    """
    kind = _JOBS[job.kind]
    ctx.store.start_job(job.id)
    _announce(ctx, job, "started", f"{job.kind} of {job.target} started")
    try:
        done: int | None = None
        for position, planned in enumerate(job.steps):
            _failpoint(ctx, planned.name, "before")
            # The previous step's "done" and this one's "started" share a commit.
            ctx.store.advance_job(job.id, done=done, started=position)
            _STEPS[planned.name].run(ctx, planned.args)
            _failpoint(ctx, planned.name, "after")
            done = position
        ctx.store.advance_job(job.id, done=done, started=None)
    except BaseException as exc:
        if kind.recovery is Recovery.ROLL_BACK and not _past_pivot(ctx, kind, job.id):
            _roll_back(ctx, ctx.store.get_job(job.id))
            ctx.store.finish_job(job.id, JobState.ROLLED_BACK, _describe(exc))
        else:
            # Past a pivot, going back would undo what took effect: what is left stays
            # failed, to be retried, with the record telling where the thing now is.
            ctx.store.finish_job(job.id, JobState.FAILED, _describe(exc))
        _announce(ctx, job, "failed", f"{job.kind} of {job.target} failed: {_describe(exc)}")
        raise
    ctx.store.finish_job(job.id, JobState.SUCCEEDED)
    _announce(ctx, job, "succeeded", f"{job.kind} of {job.target} succeeded")
    return ctx.store.get_job(job.id)


def _announce(ctx: Context, job: Job, what: str, message: str) -> None:
    ctx.store.add_event(f"job.{what}", job.target, message, job.project)


JOB_MODULES = (
    "corral.ops.provision", "corral.ops.lifecycle", "corral.ops.images", "corral.ops.migrate",
    "corral.ops.capture", "corral.ops.snapshot_clone",
)
"""Where the job and step kinds are registered: a recovery may meet any of them, whatever
command happens to run it. A module that adds a job kind adds itself here."""


def recover_abandoned(ctx: Context) -> list[Job]:
    """Finish or roll back every job whose process died. Returns the jobs recovered."""
    recovered = []
    pending = ctx.store.list_jobs((JobState.PENDING, JobState.RUNNING), limit=1000)
    if pending:
        for module in JOB_MODULES:
            importlib.import_module(module)
    for job in pending:
        lock_path = ctx.settings.lock_dir / job.owner
        with _try_lock(lock_path) as free:
            if not free:
                continue  # its process is alive and still working on it
            kind = _JOBS.get(job.kind)
            if kind is None or (kind.recovery is Recovery.ROLL_BACK
                                and not _past_pivot(ctx, kind, job.id)):
                _roll_back(ctx, job)
                ctx.store.finish_job(job.id, JobState.ROLLED_BACK, "interrupted; rolled back")
            else:
                _roll_forward(ctx, ctx.store.get_job(job.id))
                ctx.store.finish_job(job.id, JobState.SUCCEEDED, "interrupted; finished")
            recovered.append(ctx.store.get_job(job.id))
        lock_path.unlink(missing_ok=True)
    for job in ctx.store.jobs_with_leftovers():
        # A compensation failed before (its host did not answer): try it again, unless
        # that host is known to be down (reaching it could stall every command).
        if not owner_alive(ctx, job.owner) and not _waits_for_a_down_host(ctx, job):
            _roll_back(ctx, job)
    return recovered


def _waits_for_a_down_host(ctx: Context, job: Job) -> bool:
    hosts = {st.args.get("host") for st in job.steps
             if st.state in (StepState.STARTED, StepState.DONE)}
    for name in hosts - {None}:
        host = ctx.store.find_host(str(name))
        if host is not None and host.state is HostState.DOWN:
            return True
    return False


def _past_pivot(ctx: Context, kind: JobKind, job_id: int) -> bool:
    """Whether the job's pivot took effect; settles one that was interrupted."""
    if kind.pivot is None:
        return False
    job = ctx.store.get_job(job_id)
    for position, st in enumerate(job.steps):
        if st.name != kind.pivot:
            continue
        if st.state is StepState.DONE:
            return True
        if st.state is StepState.STARTED:
            settle = _STEPS[st.name].settle
            assert settle is not None  # checked by job_kind
            if settle(ctx, st.args):
                ctx.store.set_step_state(job_id, position, StepState.DONE)
                return True
        return False
    return False


def _roll_back(ctx: Context, job: Job) -> None:
    for position in reversed(range(len(job.steps))):
        st = job.steps[position]
        if st.state not in (StepState.STARTED, StepState.DONE):
            continue
        try:
            _STEPS[st.name].undo(ctx, st.args)
            ctx.store.set_step_state(job.id, position, StepState.COMPENSATED)
        except CorralError as exc:
            # Keep compensating the rest: one stuck resource must not strand the others.
            # The step stays uncompensated, so a later recovery tries it again.
            log.warning("job %s: compensating step %s failed: %s", job.id, st.name, exc)
        except Exception:
            log.exception("job %s: compensating step %s failed", job.id, st.name)


def _roll_forward(ctx: Context, job: Job) -> None:
    for position, st in enumerate(job.steps):
        if st.state is StepState.DONE:
            continue
        _STEPS[st.name].run(ctx, st.args)
        ctx.store.set_step_state(job.id, position, StepState.DONE)


def _failpoint(ctx: Context, step_name: str, when: str) -> None:
    # Crash injection for the tests that kill Corral at every step (like etcd's gofail):
    # inert unless CORRAL_FAILPOINT names this step.
    if ctx.settings.failpoint == f"{step_name}:{when}":
        os.kill(os.getpid(), signal.SIGKILL)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CorralError) else f"{type(exc).__name__}: {exc}"


class OwnerLock:
    """This process's claim on the jobs it writes, held until ``release`` or death."""

    def __init__(self, lock_dir: Path) -> None:
        lock_dir.mkdir(parents=True, exist_ok=True)
        self.name = f"job-{os.getpid()}-{secrets.token_hex(4)}.lock"
        self._path = lock_dir / self.name
        self._fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        self._path.unlink(missing_ok=True)
        os.close(self._fd)


def owner_alive(ctx: Context, owner: str) -> bool:
    """Whether the process that wrote ``owner`` (an OwnerLock's name) still runs."""
    with _try_lock(ctx.settings.lock_dir / owner) as free:
        return not free


@contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        yield True  # the owner removed its file on exit, or never got to lock it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)
