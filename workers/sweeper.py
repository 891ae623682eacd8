"""The sweeper: finds steps whose nudge was lost, whose retry fell due, or whose worker died, and
sends them again.

- A QUEUED step whose retry time (``not_before``, the engine's backoff) has come is sent once it
  is due; one untouched for ``GENLINE_SWEEP_AFTER_S`` is sent again (its nudge was lost).
- A RUNNING step whose lease lapsed (``GENLINE_LEASE_S``; its worker renews it while it works) lost
  its worker: it is queued again and sent at once.
Either way the step's own idempotency makes the repeat harmless, and the recovery is logged. A step
that keeps coming back fails with a plain reason; a copy keeps being retried until its link
expires, and raises a ``copy_at_risk`` alert when that comes close. The poller runs it every
couple of seconds.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, or_, select

from genline.config.clock import utcnow
from genline.config.constants import PIPELINE_TERMINAL, StepKind, StepStatus
from genline.config.logging import get_logger
from genline.pipelines.callbacks import deliver_due
from genline.pipelines.dispatch import nudge
from genline.pipelines.engine import Effects, apply_effects, fail_step, may_retry
from genline.pipelines.retention import maybe_run_retention
from genline.pipelines.runtime import Runtime
from genline.provider.stages import alert
from genline.storage.models import Pipeline, Step

log = get_logger("genline.sweeper")


def sweep(rt: Runtime, *, limit: int = 500) -> int:
    """Re-nudge stuck steps and flag copies at risk; returns how many steps were re-sent or failed."""
    now = utcnow()
    lost_cutoff = now - timedelta(seconds=rt.settings.sweep_after_s)
    effects = Effects()
    touched = 0
    with rt.db.transaction() as s:
        due = or_(Step.not_before.is_(None), Step.not_before <= now)
        stuck = s.scalars(
            select(Step)
            .join(Pipeline)
            .where(
                Pipeline.status.not_in([str(p) for p in PIPELINE_TERMINAL]),
                or_(
                    and_(
                        Step.status == StepStatus.QUEUED,
                        due,
                        or_(Step.updated_at < lost_cutoff, Step.updated_at < Step.not_before),
                    ),
                    and_(Step.status == StepStatus.RUNNING, Step.lease_until < now),
                ),
            )
            .order_by(Step.updated_at)
            .limit(limit)
        ).all()
        for step in stuck:
            touched += 1
            if not may_retry(rt, step.kind, step.attempts, step.deadline_at):
                if step.kind == StepKind.STORE and step.deadline_at is not None:
                    reason = "the provider's result link expired before the copy could finish"
                    code = "result_expired"
                else:
                    reason = f"it did not finish after {step.attempts} attempts"
                    code = step.error_code or "step_gave_up"
                if step.error_message:
                    reason += f" (last error: {step.error_message})"
                effects.merge(fail_step(s, step, code, reason))
                continue
            why = (
                "lease_lapsed"
                if step.status == StepStatus.RUNNING
                else "retry_due"
                if step.not_before
                else "nudge_lost"
            )
            log.info("step_renudged", step_id=step.id, was=step.status, why=why, attempts=step.attempts)
            step.status = StepStatus.QUEUED
            step.lease_owner = step.lease_until = None
            step.updated_at = now
            effects.nudges.append(nudge(step.id, step.kind, step.pipeline.priority, step.pipeline_id))
        at_risk = s.execute(
            select(Step.id, Step.pipeline_id, Step.deadline_at)
            .where(
                Step.kind == StepKind.STORE,
                Step.status.in_([StepStatus.QUEUED, StepStatus.RUNNING]),
                Step.deadline_at < now + timedelta(seconds=rt.settings.copy_risk_margin_s),
            )
            .limit(limit)
        ).all()
    for step_id, pipeline_id, deadline in at_risk:
        assert deadline is not None  # the query asked for steps with a deadline
        if rt.shared.set_if_absent(f"alerted:copy:{step_id}", "1", rt.settings.copy_risk_margin_s * 2):
            alert(
                rt.shared,
                "copy_at_risk",
                step_id=step_id,
                pipeline_id=pipeline_id,
                seconds_left=round((deadline - now).total_seconds(), 1),
            )
    apply_effects(rt, effects)
    deliver_due(rt)  # webhooks: retries that fell due, and alerts raised since (pipelines/callbacks.py)
    maybe_run_retention(rt)  # hourly (GENLINE_RETENTION_EVERY_S): outputs and audit rows past retention
    return touched
