"""``genline retry``: a failed pipeline runs again from the step that failed.

In one transaction:

- the failed step's row is kept as history, moved after the pipeline's steps (position 100 and
  up: no step follows it and none waits for it), with its provider jobs, its audit rows and its
  error; a fresh step row of the same kind takes its place, queued, with a new id;
- the steps after it (cancelled when it failed; they never ran) go back to pending;
- the pipeline goes back to running, its error cleared;
- what the remaining steps are estimated to cost (the accepted estimate, by step) is reserved
  again against every spend cap that applies now (``spend.reserve``): a cap it would cross
  refuses the retry and nothing changes.

Why a fresh step row rather than the same one queued again: a paid job's idempotency key is
derived from its step's id and model (``jobs._job_key``: ``genline:<step>:<model>``). The failed
step's keys were sent already: the same row queued again would resume its old job or skip every
model that refused it, and the provider answers a reused key with the job it made before. The
new row's id makes every key of the new try new, and only its paid jobs are new ones: the steps
that succeeded are not run again, so they start nothing.

The new step is nudged after the commit (``engine.apply_effects``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, delete, func, select, update

from genline.config.clock import utcnow
from genline.config.constants import PipelineStatus, StepStatus
from genline.config.errors import InvalidState, NotFound
from genline.config.logging import get_logger
from genline.pipelines.dispatch import nudge
from genline.pipelines.engine import Effects, apply_effects
from genline.pipelines.runtime import Runtime
from genline.pipelines.spend import announce, ledgers_for, release, reserve
from genline.storage.models import Pipeline, SpendHold, Step, new_id

log = get_logger("genline.retry")
STEPS = cast(Table, Step.__table__)
HOLDS = cast(Table, SpendHold.__table__)
HISTORY_FROM = 100  # positions of steps kept as history of an earlier try


def remaining_estimate(estimate: dict[str, Any] | None, kinds: set[str]) -> Decimal:
    """What the accepted estimate says the steps of ``kinds`` cost (0 without an estimate)."""
    if not estimate:
        return Decimal(0)
    return sum(
        (Decimal(str(step.get("cost_usd") or 0)) for step in estimate.get("steps", []) if step.get("kind") in kinds),
        Decimal(0),
    )


def retry_pipeline(rt: Runtime, pipeline_id: str) -> dict[str, Any]:
    """Run a failed pipeline again from its failed step; see the module docstring."""
    with rt.db.transaction() as s:
        pipeline = s.get(Pipeline, pipeline_id, with_for_update=True)
        if pipeline is None:
            raise NotFound(f"No pipeline has the id {pipeline_id!r}.", code="pipeline_not_found", field="id")
        if pipeline.status != PipelineStatus.FAILED:
            raise InvalidState(
                f"Pipeline {pipeline_id} is {pipeline.status}; only a failed pipeline can be retried.",
                code="pipeline_not_failed",
                field="id",
            )
        live = [st for st in pipeline.steps if st.position < HISTORY_FROM]
        failed = next((st for st in live if st.status == StepStatus.FAILED), None)
        if failed is None:
            raise InvalidState(
                f"Pipeline {pipeline_id} failed before any step ran; submit it again with a new idempotency key.",
                code="no_failed_step",
                field="id",
            )
        later = [st for st in live if st.position > failed.position]
        amount = remaining_estimate(pipeline.estimate, {failed.kind, *(st.kind for st in later)})
        conn = s.connection()
        # The caps: what the pipeline still holds is given back (nothing, once it failed), its
        # holds of the earlier try are dropped, and the remaining estimate is reserved anew
        # against the caps that apply now (today's ledgers; the try may be on another day).
        release(conn, pipeline_id)
        conn.execute(delete(HOLDS).where(HOLDS.c.pipeline_id == pipeline_id))
        alerts = reserve(conn, ledgers_for(rt.catalog, pipeline.user_id, pipeline.feature), pipeline_id, amount)
        now = utcnow()
        top = s.scalar(select(func.max(Step.position)).where(Step.pipeline_id == pipeline_id)) or 0
        archive_at = max(HISTORY_FROM, top + 1)
        old_id, position, kind, deadline = failed.id, failed.position, failed.kind, failed.deadline_at
        # The failed row becomes history first (statement order: its place is free before the new row).
        conn.execute(update(STEPS).where(STEPS.c.id == old_id).values(position=archive_at, updated_at=now))
        fresh = new_id("st")
        conn.execute(
            STEPS.insert().values(
                id=fresh,
                pipeline_id=pipeline_id,
                position=position,
                kind=kind,
                status=StepStatus.QUEUED.value,
                attempts=0,
                deadline_at=deadline,  # a copy's link expires when it did
                created_at=now,
                updated_at=now,
            )
        )
        for st in later:
            conn.execute(
                update(STEPS)
                .where(STEPS.c.id == st.id)
                .values(
                    status=StepStatus.PENDING.value,
                    error_code=None,
                    error_message=None,
                    attempts=0,
                    started_at=None,
                    finished_at=None,
                    not_before=None,
                    lease_owner=None,
                    lease_until=None,
                    updated_at=now,
                )
            )
        spent = Decimal(str(pipeline.cost_usd or 0))
        was = pipeline.error_code
        pipeline.status = PipelineStatus.RUNNING
        pipeline.error_code = pipeline.error_message = None
        pipeline.finished_at = None
        # What the budget stage compares with spent + rendering: the earlier try's spend plus the new reservation.
        pipeline.reserved_usd = spent + amount
        priority = pipeline.priority
        s.expire(pipeline, ["steps"])
    announce(alerts)
    apply_effects(rt, Effects(nudges=[nudge(fresh, kind, priority, pipeline_id)]))
    log.info(
        "pipeline_retried", pipeline_id=pipeline_id, step=kind, failed_with=was, reserved_usd=str(amount.normalize())
    )
    return {
        "pipeline_id": pipeline_id,
        "status": PipelineStatus.RUNNING.value,
        "from_step": kind,
        "step_id": fresh,
        "previous_step_id": old_id,
        "previous_error_code": was,
        "reserved_usd": str(amount),
    }
