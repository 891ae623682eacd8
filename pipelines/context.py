"""What a step is given and what it gives back: one signature, ``(runtime, StepContext) -> Outcome``.

A step either finishes (``Done`` with its output, and optionally rows to commit with its
completion) or hands a provider job to the poller (``Waiting``); it never sleeps while the provider
renders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from genline.config.catalog import Profile
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext


@dataclass(frozen=True)
class StepContext:
    step_id: str
    pipeline_id: str
    kind: str
    attempt: int
    user_id: str
    feature: str
    profile: Profile
    description: str
    image_url: str
    image_ref: str  # the caller's URL, or the key of our copy of the uploaded photo
    models: dict[str, str]  # step kind -> model the request asked for
    outputs: dict[str, dict[str, Any]]  # earlier steps' outputs, by kind
    deadline_at: datetime | None = None  # copy steps: when the provider's links expire
    prepared: Any = None  # what the step's prepare hook found or did in the claiming transaction
    first_run: bool = False  # no earlier run of this step left rows behind (provider jobs, stored objects)
    no_cache: bool = False  # the request asked for a fresh answer, not the copy cache's
    batch: bool = False  # overnight batch work (priority "batch"): the provider's batch price and mode

    def call(self, model: str | None) -> CallContext:
        ids = (self.user_id, self.feature, self.pipeline_id, self.step_id)
        return CallContext(*ids, model, batch=self.batch, retried=self.attempt > 1)

    def candidates(self, step: str, listed: tuple[str, ...]) -> list[str]:
        """Models to try, in order: the one asked for, then the profile's list."""
        first = [self.models[step]] if step in self.models else []
        return list(dict.fromkeys(first + list(listed)))


@dataclass(frozen=True)
class Done:
    output: dict[str, Any]
    # Rows to commit in the same transaction as the step's completion (e.g. the stored objects).
    write: Callable[[Session], None] | None = None


@dataclass(frozen=True)
class Waiting:
    job_id: str


Outcome = Done | Waiting
StepFn = Callable[[Runtime, StepContext], Outcome]
PrepareFn = Callable[[Session, Runtime, StepContext], Any]
