"""The job engine: steps recorded first, compensated in reverse, recovered after a kill."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from corral.config import Settings
from corral.errors import HypervisorUnavailable
from corral.model import Accelerator, Host, HostFacts, HostState, JobState, StepState
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


# -- jobs with a pivot: back before it, forward after it ---------------------------------


def _took_effect(_ctx: Context, a: dict[str, Any]) -> bool:
    return Path(a["path"]).exists()


def _pivot_then_die(_ctx: Context, a: dict[str, Any]) -> None:
    Path(a["path"]).write_text("x")
    if a.get("die"):
        os.kill(os.getpid(), signal.SIGKILL)  # the pivot took effect, unrecorded


def _die_before_effect(_ctx: Context, a: dict[str, Any]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


step("test.pivot", undo=_remove, settle=_took_effect)(_pivot_then_die)
step("test.pivot-dies-first", undo=_remove, settle=_took_effect)(_die_before_effect)
MOVE = job_kind("test-move", Recovery.ROLL_BACK, pivot="test.pivot")
MOVE_EARLY = job_kind("test-move-early", Recovery.ROLL_BACK, pivot="test.pivot-dies-first")


def _run_move_in_child(tmp_path: Path, kind: Any, steps: list[PlannedStep]) -> int:
    def child() -> None:
        with context(tmp_path) as ctx:
            run_job(ctx, kind, "t", steps)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    return proc.exitcode or 0


def test_a_failure_after_the_pivot_is_not_undone(tmp_path: Path) -> None:
    before, pivot, after = (tmp_path / n for n in ("before", "pivot", "after"))
    with context(tmp_path) as ctx, pytest.raises(RuntimeError):
        run_job(ctx, MOVE, "t", [PlannedStep("test.touch", {"path": str(before)}),
                                 PlannedStep("test.pivot", {"path": str(pivot)}),
                                 PlannedStep("test.boom", {"path": str(after)})])
    assert before.exists() and pivot.exists()  # what took effect stays
    with context(tmp_path) as ctx:
        (job,) = ctx.store.list_jobs()
        assert job.state is JobState.FAILED


def test_a_job_killed_inside_its_pivot_is_settled_by_the_facts(tmp_path: Path) -> None:
    before, pivot, after = (tmp_path / n for n in ("before", "pivot", "after"))
    code = _run_move_in_child(tmp_path, MOVE, [
        PlannedStep("test.touch", {"path": str(before)}),
        PlannedStep("test.pivot", {"path": str(pivot), "die": True}),
        PlannedStep("test.touch", {"path": str(after)}),
    ])
    assert code == -signal.SIGKILL and pivot.exists() and not after.exists()
    with context(tmp_path) as ctx:
        (job,) = recover_abandoned(ctx)
    # the pivot had taken effect: the job is finished, not undone
    assert job.state is JobState.SUCCEEDED
    assert before.exists() and pivot.exists() and after.exists()


def test_a_job_killed_before_its_pivot_took_effect_rolls_back(tmp_path: Path) -> None:
    before, pivot = tmp_path / "before", tmp_path / "pivot"
    code = _run_move_in_child(tmp_path, MOVE_EARLY, [
        PlannedStep("test.touch", {"path": str(before)}),
        PlannedStep("test.pivot-dies-first", {"path": str(pivot)}),
    ])
    assert code == -signal.SIGKILL
    with context(tmp_path) as ctx:
        (job,) = recover_abandoned(ctx)
    assert job.state is JobState.ROLLED_BACK and not before.exists()


def test_a_pivot_needs_a_settle_function() -> None:
    with pytest.raises(ValueError, match="settle"):
        job_kind("test-no-settle", Recovery.ROLL_BACK, pivot="test.touch")


def _undo_when_reachable(_ctx: Context, a: dict[str, Any]) -> None:
    if Path(a["down"]).exists():
        raise HypervisorUnavailable("Cannot reach libvirtd at test://down: is it running?")
    Path(a["path"]).unlink(missing_ok=True)


step("test.touch-remote", undo=_undo_when_reachable)(_touch)


def test_a_compensation_that_failed_is_tried_again_later(tmp_path: Path) -> None:
    made, down = tmp_path / "made", tmp_path / "down"
    down.write_text("the host is down")
    with context(tmp_path) as ctx, pytest.raises(RuntimeError):
        run_job(ctx, CREATE, "t", [PlannedStep("test.touch-remote",
                                               {"path": str(made), "down": str(down)}),
                                   PlannedStep("test.boom", {"path": str(tmp_path / "b")})])
    assert made.exists()  # its host did not answer: left for later
    with context(tmp_path) as ctx:
        recover_abandoned(ctx)
        assert made.exists()  # still down: still there, still recorded
        down.unlink()
        recover_abandoned(ctx)
        assert not made.exists()
        (job,) = ctx.store.list_jobs()
        assert job.state is JobState.ROLLED_BACK
        assert {s.state for s in job.steps} == {StepState.COMPENSATED}
        assert ctx.store.jobs_with_leftovers() == []


def test_a_compensation_waits_while_its_host_is_recorded_down(tmp_path: Path) -> None:
    made = tmp_path / "made"
    down = tmp_path / "down"  # makes the undo fail, as an unreachable host would
    down.write_text("unreachable")
    host = Host(name="far", uri="qemu+tcp://far/system",
                facts=HostFacts("far", "x86_64", "EPYC", 2, 4 << 30, "QEMU", "7.2.0"),
                accelerator=Accelerator.TCG, accelerator_note="", pool_name="corral",
                pool_path="/var/lib/corral/pool")
    args = {"path": str(made), "down": str(down), "host": "far"}
    with context(tmp_path) as ctx, pytest.raises(RuntimeError):
        ctx.store.put_host(host)
        run_job(ctx, CREATE, "t", [PlannedStep("test.touch-remote", args),
                                   PlannedStep("test.boom", {"path": str(tmp_path / "b")})])
    down.unlink()  # the host answers again, but the store still says it is down
    with context(tmp_path) as ctx:
        ctx.store.set_host_state("far", HostState.DOWN, "no answer")
        recover_abandoned(ctx)
        assert made.exists()  # not tried: reaching a down host could stall every command
        ctx.store.set_host_state("far", HostState.UP)
        recover_abandoned(ctx)
        assert not made.exists()
