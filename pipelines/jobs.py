"""Provider-job bookkeeping for the media steps: one paid job per step, whatever happens (invariant 2).

Steps that start paid jobs go through ``start_provider_job``: the intent row and its idempotency
key (``genline:<step>:<model>``) exist before the submit, and the provider's task_id is committed
before anything else happens with it. ``prepare_job`` runs inside the engine's claiming
transaction, so the first intent costs no transaction of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, delete, insert, select, update
from sqlalchemy.orm import Session

from genline.config.clock import utcnow
from genline.config.constants import JobStatus, StepKind, StepStatus
from genline.config.errors import (
    CircuitOpen,
    InvalidState,
    ProviderError,
    ProviderNotFound,
    ProviderUnavailable,
    RateLimited,
)
from genline.config.logging import get_logger, scrub_text
from genline.pipelines.audit import current_hold, write_audit
from genline.pipelines.context import Outcome, StepContext, Waiting
from genline.pipelines.runtime import Runtime
from genline.provider.wire import SubmitResult
from genline.storage.db import wake_poller
from genline.storage.models import ProviderJob, Step, new_id

log = get_logger("genline.steps")
JOBS = cast(Table, ProviderJob.__table__)
STEPS = cast(Table, Step.__table__)


def media_plan(ctx: StepContext) -> tuple[list[str], float]:
    """The models a media step tries, in order, and the units its job is billed in."""
    if ctx.kind == StepKind.IMAGE:
        return ctx.candidates("image", ctx.profile.image_models), 1.0
    return ctx.candidates("video", ctx.profile.video_models), float(ctx.profile.video_duration_s)


def _falls_back(err: ProviderError) -> bool:
    """Only errors that prove the provider made no job may move on to another model."""
    answered_no = err.status_code is not None or err.nothing_sent
    return answered_no and isinstance(err, (ProviderNotFound, ProviderUnavailable, RateLimited, CircuitOpen))


_GONE = (JobStatus.FAILED, JobStatus.CANCELLED)  # a job with a task_id in these is not the step's live job
_ENDED = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class JobPlan:
    """What ``prepare_job`` found in the claiming transaction: the job the step already has
    (``live_id``), or the intent it committed for the first model to try (``intent_id``/``key``),
    and the keys of models that refused this request for good (``refused``)."""

    live_id: str | None = None
    intent_id: str | None = None
    key: str | None = None
    refused: frozenset[str] = frozenset()
    created: bool = False  # the intent is this run's own (not an earlier try's, whose submit may have gone out)


def _job_key(step_id: str, model: str) -> str:
    return f"genline:{step_id}:{model}"


_STEP_JOBS = select(JOBS.c.id, JOBS.c.idempotency_key, JOBS.c.task_id, JOBS.c.status).where(
    JOBS.c.step_id == bindparam("step_id")
)
_INSERT_JOB = insert(JOBS)


def prepare_job(s: Session, rt: Runtime, ctx: StepContext) -> JobPlan:
    """In the claiming transaction: the step's jobs, and the intent for the first model to try.

    The intent row and its key are committed with the claim, so before the submit (invariant 2);
    a step that already has a job with a task_id gets no intent, it resumes that job."""
    conn = s.connection()
    jobs = [] if ctx.first_run else conn.execute(_STEP_JOBS, {"step_id": ctx.step_id}).all()
    live = next((j for j in jobs if j.task_id is not None and j.status not in _GONE), None)
    if live is not None:  # resumed by ``start_provider_job``, never submitted again
        return JobPlan(live_id=live.id)
    by_key = {j.idempotency_key: j for j in jobs}
    refused = frozenset(k for k, j in by_key.items() if j.status == JobStatus.FAILED)
    models, units = media_plan(ctx)
    for model in models:
        key = _job_key(ctx.step_id, model)
        if key in refused:
            continue  # this model refused this request for good; try the next
        found = by_key.get(key)
        if found is not None:  # an earlier try's intent: the same key, so the provider answers with one job
            return JobPlan(intent_id=found.id, key=key, refused=refused)
        job_id = new_id("job")
        conn.execute(
            _INSERT_JOB,
            {
                "id": job_id,
                "step_id": ctx.step_id,
                "attempt": ctx.attempt,
                "idempotency_key": key,
                "kind": ctx.kind,
                "model": model,
                "status": JobStatus.INTENT.value,
                "units": units,
            },
        )
        return JobPlan(intent_id=job_id, key=key, refused=refused, created=True)
    return JobPlan(refused=refused)


_FORGET_INTENT = delete(JOBS).where(
    JOBS.c.id == bindparam("b_id"), JOBS.c.status == JobStatus.INTENT.value, JOBS.c.task_id.is_(None)
)


def forget_new_intent(rt: Runtime, ctx: StepContext) -> None:
    """Remove the intent ``prepare_job`` created for this run when the step gives up before
    anything was sent under its key (an earlier try's intent is kept: its submit may have gone out)."""
    plan = ctx.prepared
    if isinstance(plan, JobPlan) and plan.created and plan.intent_id is not None:
        with rt.db.transaction() as s:
            s.connection().execute(_FORGET_INTENT, {"b_id": plan.intent_id})


def start_provider_job(
    rt: Runtime,
    ctx: StepContext,
    kind: str,
    models: list[str],
    payload: Callable[[str], dict[str, Any]],
    units: float,
) -> Outcome:
    """Submit one paid job for this step, or resume the one it already has (invariant 2).

    The job row and its idempotency key (``genline:<step>:<model>``) are committed before the
    call — for the first model by ``prepare_job`` in the claiming transaction, for a fallback
    model in a transaction of its own; the provider's task_id is committed right after it, with
    the submit's audit row. A retry, a redelivery or a crash anywhere in between submits with the
    same key, so the provider answers with the same job.
    """
    plan = ctx.prepared if isinstance(ctx.prepared, JobPlan) and ctx.prepared.live_id is None else None
    last: ProviderError | None = None
    for model in models:
        key = _job_key(ctx.step_id, model)
        if plan is not None and key in plan.refused:
            continue  # this model refused this request for good; try the next
        if plan is not None and plan.key == key and plan.intent_id is not None:
            job_id = plan.intent_id  # committed with the claim
            plan = None
        else:
            plan = None
            found = _record_intent(rt, ctx, kind, model, key, units)
            if isinstance(found, Waiting):
                return found
            if found is None:
                continue  # this model refused this request for good; try the next
            job_id = found
        try:
            result = rt.gateway.submit(ctx.call(model), kind, payload(model), key)
        except ProviderError as err:
            _record_refusal(rt, job_id, err)
            if _falls_back(err):
                log.warning("model_fallback", step_id=ctx.step_id, model=model, code=err.code)
                last = err
                continue
            raise
        # The task_id first, in one transaction with the submit's audit row (held by the gateway's
        # sink until now) and the poller's wake-up; nothing else happens with the job before.
        with current_hold(rt.gateway.audit).committed_with() as records, rt.db.transaction() as s:
            write_audit(s, records)
            _wait_on(s, ctx.step_id, job_id, model, rt.settings.poll_interval_s, pollable=True, submitted=result)
        log.info("provider_job_submitted", step_id=ctx.step_id, kind=kind, model=model, task_id=result.task_id)
        return Waiting(job_id)
    assert last is not None
    raise last


def _record_intent(
    rt: Runtime, ctx: StepContext, kind: str, model: str, key: str, units: float
) -> str | Waiting | None:
    """The intent for ``model`` in a transaction of its own (fallback models, re-runs): its job id,
    ``Waiting`` when the step has its job already (resumed, never submitted again), or None when
    this model refused this request for good."""
    with rt.db.transaction() as s:
        if s.get_one(Step, ctx.step_id).status != StepStatus.RUNNING:
            # Cancelled (or taken over) while this worker was on it: start no paid job now.
            raise InvalidState("The pipeline was cancelled; no job was started.", code="pipeline_cancelled")
        jobs = s.scalars(select(ProviderJob).where(ProviderJob.step_id == ctx.step_id)).all()
        live = next((j for j in jobs if j.task_id is not None and j.status not in _GONE), None)
        if live is not None:  # this step has its job already: resume it, never submit again
            pollable = live.next_poll_at is None and live.status not in _ENDED
            _wait_on(s, ctx.step_id, live.id, live.model, rt.settings.poll_interval_s, pollable=pollable)
            return Waiting(live.id)
        job = next((j for j in jobs if j.idempotency_key == key), None)
        if job is not None and job.status == JobStatus.FAILED:
            return None
        if job is None:
            job = ProviderJob(
                id=new_id("job"),
                step_id=ctx.step_id,
                attempt=ctx.attempt,
                idempotency_key=key,
                kind=kind,
                model=model,
                status=JobStatus.INTENT,
                units=units,
            )
            s.add(job)
        return job.id


def _record_refusal(rt: Runtime, job_id: str, err: ProviderError) -> None:
    """What a failed submit leaves behind. A refusal that proves no job exists removes the
    intent (a later run may try again) or, if final, marks it failed; an ambiguous failure (a
    timeout, a reset) keeps the intent, so the next try reuses its key."""
    if err.status_code is None and not err.nothing_sent:
        return
    with rt.db.transaction() as s:
        job = s.get_one(ProviderJob, job_id)
        if err.retryable:
            s.delete(job)
        else:
            job.status = JobStatus.FAILED
            job.error_code, job.error_message = err.code, scrub_text(err.message)


def _wait_on(
    s: Session,
    step_id: str,
    job_id: str,
    model: str,
    interval: float,
    *,
    pollable: bool,
    submitted: SubmitResult | None = None,
) -> None:
    """Hand the step to the poller, in the caller's transaction: a just-submitted job gets its
    task_id; a job that is ``pollable`` (no poll time yet, not ended; a just-submitted one always
    is) gets its first poll time and wakes a sleeping poller at commit; the step waits (unless it
    was cancelled meanwhile)."""
    now = utcnow()
    conn = s.connection()
    if submitted is not None or pollable:
        due = now + timedelta(seconds=interval)
        if submitted is not None:
            conn.execute(
                _JOB_SUBMITTED,
                {
                    "b_id": job_id,
                    "b_task": submitted.task_id,
                    "b_now": now,
                    "b_estimate": submitted.estimated_time_s,
                    "b_due": due,
                },
            )
        else:
            conn.execute(_JOB_DUE, {"b_id": job_id, "b_due": due})
        wake_poller(s, due)
    conn.execute(_STEP_WAITING, {"b_id": step_id, "b_model": model, "b_now": now})


_JOB_SUBMITTED = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_id"))
    .values(
        task_id=bindparam("b_task"),
        status=JobStatus.PENDING.value,
        submitted_at=bindparam("b_now"),
        estimated_time_s=bindparam("b_estimate"),
        next_poll_at=bindparam("b_due"),
    )
)
_JOB_DUE = update(JOBS).where(JOBS.c.id == bindparam("b_id")).values(next_poll_at=bindparam("b_due"))
_STEP_WAITING = (
    update(STEPS)
    .where(STEPS.c.id == bindparam("b_id"))
    .values(
        model=bindparam("b_model"),
        status=case((STEPS.c.status == StepStatus.RUNNING.value, StepStatus.WAITING.value), else_=STEPS.c.status),
        updated_at=bindparam("b_now"),
    )
)
