"""The sweeper: finds steps whose nudge was lost or whose worker died, and sends them again.

A QUEUED step untouched for ``sweep_after_s`` is re-sent; a RUNNING step untouched for five times
that is taken to have lost its worker and is queued again. Either way the step's own idempotency
makes the repeat harmless. A step that keeps coming back fails with a plain reason.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, or_, select

from config.clock import utcnow
from config.constants import PIPELINE_TERMINAL, StepStatus
from config.logging import get_logger
from pipelines.dispatch import queue_for
from pipelines.engine import MAX_STEP_ATTEMPTS, Effects, apply_effects, fail_step
from pipelines.runtime import Runtime
from storage.models import Pipeline, Step

log = get_logger("genline.sweeper")


def sweep(rt: Runtime, *, limit: int = 500) -> int:
    """Re-nudge stuck steps; returns how many were touched."""
    now = utcnow()
    queued_cutoff = now - timedelta(seconds=rt.settings.sweep_after_s)
    running_cutoff = now - timedelta(seconds=rt.settings.sweep_after_s * 5)
    effects = Effects()
    with rt.db.transaction() as s:
        stuck = s.scalars(
            select(Step)
            .join(Pipeline)
            .where(
                Pipeline.status.not_in([str(p) for p in PIPELINE_TERMINAL]),
                or_(
                    and_(Step.status == StepStatus.QUEUED, Step.updated_at < queued_cutoff),
                    and_(Step.status == StepStatus.RUNNING, Step.updated_at < running_cutoff),
                ),
            )
            .order_by(Step.updated_at)
            .limit(limit)
        ).all()
        for step in stuck:
            if step.attempts >= MAX_STEP_ATTEMPTS:
                effects.merge(
                    fail_step(
                        s,
                        step,
                        step.error_code or "step_gave_up",
                        f"it did not finish after {step.attempts} attempts"
                        + (f" (last error: {step.error_message})" if step.error_message else ""),
                    )
                )
                continue
            log.info("step_renudged", step_id=step.id, was=step.status, attempts=step.attempts)
            step.status = StepStatus.QUEUED
            step.updated_at = now
            effects.nudges.append((step.id, queue_for(step.kind, step.pipeline.priority)))
    apply_effects(rt, effects)
    return len(stuck)
