"""Jobs: long operations written down, step by step, before they run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from corral.model.states import JobState, StepState


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    state: StepState
    args: dict[str, Any]
    """What the step and its compensation need, recorded before it runs."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    target: str
    state: JobState
    owner: str
    steps: tuple[Step, ...]
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    project: str | None = None
    """Whose members may see the job; ``None``: admins only (host and shared-image work)."""

    @property
    def progress(self) -> float:
        """Fraction of steps done, 0.0 to 1.0; 1.0 once the job has ended."""
        if self.state not in (JobState.PENDING, JobState.RUNNING) or not self.steps:
            return 1.0
        return sum(s.state is StepState.DONE for s in self.steps) / len(self.steps)
