"""The job engine: steps recorded first, compensated in reverse, recovered after a kill."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from corral.config import Settings
from corral.model import JobState, StepState
from corral.ops.context import Context
from corral.ops.jobs import PlannedStep, Recovery, job_kind, recover_abandoned, run_job, step


def _touch(_ctx: Context, a: dict[str, Any]) -> None:
    Path(a["path"]).write_text("x")


def _remove(_ctx: Context, a: dict[str, Any]) -> None:
    Path(a["path"]).unlink(missing_ok=True)


def _boom(_ctx: Context, _a: dict[str, Any]) -> None:
    raise RuntimeError("step failed")


def _stall(_ctx: Context, a: dict[str, Any]) -> None:
    path = Path(a["path"])
    if path.exists():
        return  # run again by recovery: this time it completes
    path.write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)  # die half-way, as a crash would


step("test.touch", undo=_remove)(_touch)
step("test.boom", undo=_remove)(_boom)
step("test.die", undo=_remove)(_stall)
CREATE = job_kind("test-create", Recovery.ROLL_BACK)
REMOVE = job_kind("test-remove", Recovery.ROLL_FORWARD)


def context(tmp_path: Path) -> Context:
    return Context(Settings(state_dir=tmp_path / "state"), recover=False)


def test_a_failing_step_compensates_the_earlier_ones_in_reverse(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with context(tmp_path) as ctx, pytest.raises(RuntimeError, match="step failed"):
        run_job(ctx, CREATE, "t", [PlannedStep("test.touch", {"path": str(a)}),
                                   PlannedStep("test.boom", {"path": str(b)})])
    assert not a.exists() and not b.exists()
    with context(tmp_path) as ctx:
        (job,) = ctx.store.list_jobs()
        assert job.state is JobState.ROLLED_BACK and "step failed" in (job.error or "")
        assert [s.state for s in job.steps] == [StepState.COMPENSATED, StepState.COMPENSATED]


def _run_in_child(tmp_path: Path, kind: str, steps: list[PlannedStep]) -> int:
    def child() -> None:
        with context(tmp_path) as ctx:
            run_job(ctx, CREATE if kind == "create" else REMOVE, "t", steps)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    return proc.exitcode or 0


def test_a_killed_create_job_is_rolled_back_by_the_next_process(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    code = _run_in_child(tmp_path, "create", [
        PlannedStep("test.touch", {"path": str(a)}),
        PlannedStep("test.die", {"path": str(b)}),
        PlannedStep("test.touch", {"path": str(c)}),
    ])
    assert code == -signal.SIGKILL
    assert a.exists() and b.exists() and not c.exists()
    with context(tmp_path) as ctx:
        (job,) = recover_abandoned(ctx)
        assert job.state is JobState.ROLLED_BACK
        assert not a.exists() and not b.exists()
        assert recover_abandoned(ctx) == []  # once only


def test_a_killed_remove_job_is_finished_by_the_next_process(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    code = _run_in_child(tmp_path, "remove", [
        PlannedStep("test.die", {"path": str(a)}),
        PlannedStep("test.touch", {"path": str(b)}),
    ])
    assert code == -signal.SIGKILL
    with context(tmp_path) as ctx:
        (job,) = recover_abandoned(ctx)
        assert job.state is JobState.SUCCEEDED
        assert b.exists()


def test_a_live_job_is_left_alone(tmp_path: Path) -> None:
    seen: list[list[int]] = []

    def peek(ctx: Context, _a: dict[str, Any]) -> None:
        # another process's recovery runs while this job is mid-flight
        with context(tmp_path) as other:
            seen.append([j.id for j in recover_abandoned(other)])

    step("test.peek", undo=lambda c, a: None)(peek)
    with context(tmp_path) as ctx:
        job = run_job(ctx, CREATE, "t", [PlannedStep("test.peek")])
    assert seen == [[]] and job.state is JobState.SUCCEEDED
