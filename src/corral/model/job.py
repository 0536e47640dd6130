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
