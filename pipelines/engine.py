"""Moving pipelines forward: run a step, finish it, fail it, hand the next step to the broker.

Every transition happens inside one database transaction and is safe to repeat: a task that runs
twice, late, or on another machine re-reads the rows and does nothing a second time. Messages to
the broker are sent only after the transaction that justifies them has committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from config.clock import utcnow
from config.constants import PIPELINE_TERMINAL, STEP_TERMINAL, JobStatus, PipelineStatus, StepKind, StepStatus
from config.errors import ConfigError, GenlineError, ProviderError
from config.logging import get_logger
from pipelines.dispatch import queue_for
from pipelines.runtime import Runtime
from pipelines.steps import STEP_FUNCTIONS, Done, StepContext
from storage.models import Pipeline, ProviderCall, ProviderJob, Step

log = get_logger("genline.engine")


@dataclass
class Effects:
    """What to do once the transaction has committed."""

    nudges: list[tuple[str, str]] = field(default_factory=list)  # (step_id, queue)
    finished: list[str] = field(default_factory=list)  # pipeline ids that reached an end

    def merge(self, other: Effects) -> None:
        self.nudges.extend(other.nudges)
        self.finished.extend(other.finished)


def apply_effects(rt: Runtime, effects: Effects) -> None:
    for step_id, queue in effects.nudges:
        try:
            rt.dispatcher.send(step_id, queue)
        except Exception as exc:  # noqa: BLE001  # the broker is down: the sweeper re-sends later
            log.warning("nudge_failed", step_id=step_id, error=type(exc).__name__)
    for pipeline_id in effects.finished:
        notify_callback(rt, pipeline_id)


# --- transitions (called inside a transaction) -----------------------------------------------------
def complete_step(s: Session, step: Step, output: dict[str, Any]) -> Effects:
    effects = Effects()
    if step.status in STEP_TERMINAL:
        return effects
    now = utcnow()
    step.status = StepStatus.SUCCEEDED
    step.output = output
    step.finished_at = now
    step.error_code = step.error_message = None
    pipeline = step.pipeline
    nxt = s.scalars(select(Step).where(Step.pipeline_id == pipeline.id, Step.position == step.position + 1)).first()
    if pipeline.status in PIPELINE_TERMINAL:
        return effects
    if nxt is not None:
        if nxt.status == StepStatus.PENDING:
            nxt.deadline_at = min_expiry(s, pipeline.id, output)
            nxt.status = StepStatus.QUEUED
            effects.nudges.append((nxt.id, queue_for(nxt.kind, pipeline.priority)))
        return effects
    pipeline.status = PipelineStatus.SUCCEEDED
    pipeline.finished_at = now
    pipeline.cost_usd = pipeline_cost(s, pipeline.id)
    effects.finished.append(pipeline.id)
    return effects


def min_expiry(s: Session, pipeline_id: str, output: dict[str, Any]) -> datetime | None:
    """The earliest expiry among the provider links the rest of the pipeline still has to copy."""
    times = [datetime.fromisoformat(a["expires_at"]) for a in output.get("assets", []) if a.get("expires_at")]
    earlier = s.scalars(select(Step.output).where(Step.pipeline_id == pipeline_id, Step.kind == "image")).first()
    times += [datetime.fromisoformat(a["expires_at"]) for a in (earlier or {}).get("assets", []) if a.get("expires_at")]
    return min(times) if times else None


def fail_step(s: Session, step: Step, code: str, message: str) -> Effects:
    effects = Effects()
    now = utcnow()
    if step.status not in STEP_TERMINAL:
        step.status = StepStatus.FAILED
        step.error_code, step.error_message = code, message
        step.finished_at = now
    for job in s.scalars(
        select(ProviderJob).where(ProviderJob.step_id == step.id, ProviderJob.status == JobStatus.INTENT)
    ):
        # A submit whose answer never came: the provider may have started this job. It is
        # recorded as such (and its key never reused for anything else), not silently dropped.
        job.status = JobStatus.UNKNOWN
        job.error_code, job.error_message = "submit_outcome_unknown", "the provider may have started this job"
        log.error("orphan_suspected", alert=True, step_id=step.id, job_id=job.id, model=job.model)
    pipeline = step.pipeline
    if pipeline.status in PIPELINE_TERMINAL:
        return effects
    for other in pipeline.steps:
        if other.position > step.position and other.status not in STEP_TERMINAL:
            other.status = StepStatus.CANCELLED
    pipeline.status = PipelineStatus.FAILED
    pipeline.error_code = code
    pipeline.error_message = f"The {step.kind} step failed: {message}"
    pipeline.finished_at = now
    pipeline.cost_usd = pipeline_cost(s, pipeline.id)
    effects.finished.append(pipeline.id)
    return effects


def pipeline_cost(s: Session, pipeline_id: str) -> Decimal:
    """The audit log is the one record of spend; a pipeline's cost is derived from it."""
    total = s.scalar(
        select(func.coalesce(func.sum(ProviderCall.cost_usd), 0)).where(ProviderCall.pipeline_id == pipeline_id)
    )
    return Decimal(str(total or 0))


# --- running a step --------------------------------------------------------------------------------
def _most_urgent_copy(s: Session, rt: Runtime, nudged: Step) -> Step:
    """Copies run earliest-deadline first: a nudge for any copy step runs the most urgent one
    that is waiting (every copy step has its own nudge, so none is left behind)."""
    query = (
        select(Step)
        .where(Step.kind == StepKind.STORE, Step.status == StepStatus.QUEUED)
        .order_by(Step.deadline_at.is_(None), Step.deadline_at)
        .limit(1)
    )
    if rt.db.is_postgres:
        query = query.with_for_update(of=Step, skip_locked=True)
    return s.scalars(query).first() or nudged


def _begin(rt: Runtime, step_id: str) -> StepContext | None:
    with rt.db.transaction() as s:
        step = s.get(Step, step_id, with_for_update={"of": Step})
        if step is not None and step.kind == StepKind.STORE:
            step = _most_urgent_copy(s, rt, step)
        if step is None:
            log.warning("unknown_step", step_id=step_id)
            return None
        pipeline = step.pipeline
        if step.status != StepStatus.QUEUED:
            # Done already, owned by the poller, or running elsewhere right now. A step whose
            # worker died stays RUNNING until the sweeper finds it stale and queues it again.
            return None
        if pipeline.status in PIPELINE_TERMINAL:
            step.status = StepStatus.CANCELLED
            return None
        earlier = [x for x in pipeline.steps if x.position < step.position]
        if any(x.status != StepStatus.SUCCEEDED for x in earlier):
            return None  # out of order nudge; the right one comes when the earlier step finishes
        step.status = StepStatus.RUNNING
        step.attempts += 1
        step.started_at = step.started_at or utcnow()
        pipeline.status = PipelineStatus.RUNNING
        profile = rt.catalog.profiles.get(pipeline.profile)
        if profile is None:
            raise ConfigError(f"Profile {pipeline.profile!r} is no longer in the catalog.")
        return StepContext(
            step_id=step.id,
            pipeline_id=pipeline.id,
            kind=step.kind,
            attempt=step.attempts,
            user_id=pipeline.user_id,
            feature=pipeline.feature,
            profile=profile,
            description=pipeline.description,
            image_url=pipeline.image_url,
            image_ref=pipeline.image_ref,
            models=dict(pipeline.models or {}),
            outputs={x.kind: dict(x.output or {}) for x in earlier},
            deadline_at=step.deadline_at,
        )


def run_step(rt: Runtime, step_id: str) -> None:
    """Run one step to its next resting point. Safe to call any number of times."""
    ctx = _begin(rt, step_id)
    if ctx is None:
        return
    bound = log.bind(step_id=ctx.step_id, pipeline_id=ctx.pipeline_id, kind=ctx.kind, attempt=ctx.attempt)
    try:
        outcome = STEP_FUNCTIONS[ctx.kind](rt, ctx)
    except GenlineError as err:
        _after_error(
            rt,
            ctx,
            err.code,
            err.message,
            retryable=err.retryable,
            refund=isinstance(err, ProviderError) and err.nothing_sent,
        )
        return
    except (OperationalError, httpx.HTTPError) as exc:  # database or network hiccup
        _after_error(
            rt,
            ctx,
            "transient_error",
            f"a database or network error kept recurring ({type(exc).__name__})",
            retryable=True,
            refund=False,
        )
        return
    if isinstance(outcome, Done):
        with rt.db.transaction() as s:
            effects = complete_step(s, s.get_one(Step, ctx.step_id), outcome.output)
        apply_effects(rt, effects)
        bound.info("step_succeeded")
    else:
        bound.info("step_waiting", job_id=outcome.job_id)


def may_retry(rt: Runtime, kind: str, attempts: int, deadline: datetime | None) -> bool:
    """A copy is retried until its link expires; any other step up to its attempt budget."""
    if kind == StepKind.STORE and deadline is not None:
        return utcnow() < deadline
    return attempts < rt.settings.step_max_attempts


def _after_error(rt: Runtime, ctx: StepContext, code: str, message: str, *, retryable: bool, refund: bool) -> None:
    bound = log.bind(step_id=ctx.step_id, pipeline_id=ctx.pipeline_id, kind=ctx.kind, attempt=ctx.attempt)
    if retryable and (refund or may_retry(rt, ctx.kind, ctx.attempt, ctx.deadline_at)):
        _requeue(rt, ctx.step_id, code, message, refund=refund)
        bound.warning("step_will_retry", code=code, message=message)
        return
    bound.warning("step_failed", code=code, message=message)
    _fail(rt, ctx.step_id, code, message)


def _fail(rt: Runtime, step_id: str, code: str, message: str) -> None:
    with rt.db.transaction() as s:
        effects = fail_step(s, s.get_one(Step, step_id), code, message)
    apply_effects(rt, effects)


def _requeue(rt: Runtime, step_id: str, code: str, message: str, *, refund: bool = False) -> None:
    """Back to QUEUED; the sweeper sends it again once ``sweep_after_s`` has passed, so a retry
    never waits in a worker slot or in a broker countdown. A try that genline refused before
    anything reached the provider (an open breaker, a pause) does not count as an attempt."""
    with rt.db.transaction() as s:
        step = s.get_one(Step, step_id)
        if step.status == StepStatus.RUNNING:
            step.status = StepStatus.QUEUED
            step.error_code, step.error_message = code, message
            if refund:
                step.attempts = max(0, step.attempts - 1)


def notify_callback(rt: Runtime, pipeline_id: str) -> None:
    """Tell the application, if it asked, that a pipeline reached its end. Best effort: the
    status stays readable with ``genline status``; a failed callback is logged, never retried forever."""
    with rt.db.transaction() as s:
        pipeline = s.get(Pipeline, pipeline_id)
        if pipeline is None or not pipeline.callback_url:
            return
        url, body = (
            pipeline.callback_url,
            {"pipeline_id": pipeline.id, "status": pipeline.status, "error_code": pipeline.error_code},
        )
    try:
        rt.downloads.post(url, json=body, timeout=5.0)
    except httpx.HTTPError as exc:
        log.warning("callback_failed", pipeline_id=pipeline_id, error=type(exc).__name__)
