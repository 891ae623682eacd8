"""The pipeline's steps: plain functions with one signature, ``(runtime, StepContext) -> Outcome``.

    copy  → image → video → store

Adding a step is writing one function and adding it to ``PIPELINE``. A step either finishes
(``Done`` with its output) or hands a provider job to the poller (``Waiting``); it never sleeps
while the provider renders. Steps that start paid jobs go through ``start_provider_job``, which
keeps invariant 2: the intent row and its idempotency key exist before the submit, and the
provider's task_id is committed before anything else happens with it.

A step may also have a ``prepare`` hook (``PREPARE``): it runs inside the engine's claiming
transaction, so what it reads or writes costs no transaction of its own — the media steps record
their first intent there (committed before the submit, as invariant 2 asks), the store step reads
what is stored already. The video step copies the image once the video is submitted
(``store_image_early``): the image's link was made first and runs out first. A ``Done`` may
carry ``write``: rows committed in the same transaction as the step's completion.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from genline.config.catalog import Profile
from genline.config.clock import utcnow
from genline.config.constants import JobStatus, StepKind, StepStatus
from genline.config.errors import (
    CircuitOpen,
    GenlineError,
    InvalidState,
    ProviderConnectionError,
    ProviderError,
    ProviderNotFound,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
)
from genline.config.logging import get_logger
from genline.pipelines.audit import current_hold, write_audit
from genline.pipelines.request import sniff_image_type
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext
from genline.provider.wire import SubmitResult
from genline.storage.db import wake_poller
from genline.storage.models import ProviderJob, Step, StoredObject, new_id
from genline.storage.objects import StoredObjectInfo
from genline.storage.transfer import copy_url_to_store

log = get_logger("genline.steps")
JOBS = cast(Table, ProviderJob.__table__)
STEPS = cast(Table, Step.__table__)
STORED = cast(Table, StoredObject.__table__)


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

    def call(self, model: str | None) -> CallContext:
        return CallContext(self.user_id, self.feature, self.pipeline_id, self.step_id, model)

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


# --- copy ------------------------------------------------------------------------------------------
def write_copy(rt: Runtime, ctx: StepContext) -> Outcome:
    messages = [
        {"role": "system", "content": "You write short, vivid marketing copy for an online shop's product video."},
        {"role": "user", "content": f"Product: {ctx.description}\nWrite a headline and two sentences."},
    ]
    last: ProviderError | None = None
    for model in ctx.candidates("copy", ctx.profile.copy_models):
        try:
            result = rt.gateway.chat(ctx.call(model), messages, max_tokens=ctx.profile.copy_max_tokens)
        except (
            ProviderNotFound,
            ProviderUnavailable,
            RateLimited,
            CircuitOpen,
            ProviderTimeout,
            ProviderConnectionError,
        ) as err:
            last = err  # this model is out of reach now: the next one may not be
            continue
        return Done({"model": model, "text": result.text, "tokens": result.prompt_tokens + result.completion_tokens})
    assert last is not None
    if last.retryable and ctx.attempt >= 2:
        # Every copy model has been down through a retry: the pipeline goes on with plain copy
        # built from the seller's own words, marked degraded, rather than waiting or failing.
        log.warning("copy_degraded", step_id=ctx.step_id, code=last.code)
        return Done({"model": None, "text": template_copy(ctx.description), "degraded": True, "tokens": 0})
    raise last


def template_copy(description: str) -> str:
    first = description.strip().split(". ")[0].rstrip(".")
    return f"{first}.\n{description.strip()} Made to be used every day. Order yours today."


# --- provider jobs (image, video) -----------------------------------------------------------------
def _headline(ctx: StepContext) -> str:
    text = str(ctx.outputs.get("copy", {}).get("text", ""))
    return (text.splitlines()[0] if text else ctx.description)[:300]


def photo_for_provider(rt: Runtime, ctx: StepContext) -> str:
    """The product photo as the provider takes it: an http(s) URL when there is one (the caller's,
    or a presigned link to our S3 copy); on local storage, which no provider can reach, the
    photo's bytes inline as a ``data:`` URL (at most 10 MB, checked at submit)."""
    if ctx.image_url.startswith(("http://", "https://")):
        return ctx.image_url
    data = rt.store.read_bytes(ctx.image_ref)
    return f"data:{sniff_image_type(data[:16]) or 'image/png'};base64,{base64.b64encode(data).decode()}"


def render_image(rt: Runtime, ctx: StepContext) -> Outcome:
    prompt = f"{ctx.description[:500]} — studio product photo, clean background. {_headline(ctx)}"
    try:
        photo = photo_for_provider(rt, ctx)
    except Exception:
        _forget_new_intent(rt, ctx)  # nothing was sent under it: no job of unknown outcome to report
        raise

    def payload(model: str) -> dict[str, Any]:
        return {"model": model, "prompt": prompt, "n": 1, "size": ctx.profile.image_size, "image_urls": [photo]}

    models, units = media_plan(ctx)
    return start_provider_job(rt, ctx, "image", models, payload, units)


def render_video(rt: Runtime, ctx: StepContext) -> Outcome:
    image = ctx.outputs.get("image", {}).get("assets", [{}])[0].get("url")
    prompt = f"Slow cinematic reveal of the product. {_headline(ctx)}"

    def payload(model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "duration": ctx.profile.video_duration_s,
            "aspect_ratio": ctx.profile.video_aspect_ratio,
            "resolution": ctx.profile.video_resolution,
        }
        if image:
            body["image_urls"] = [image]
        return body

    models, units = media_plan(ctx)
    outcome = start_provider_job(rt, ctx, "video", models, payload, units)
    if isinstance(outcome, Waiting):  # the video is with the provider: copy the image meanwhile
        store_image_early(rt, ctx)
    return outcome


def store_image_early(rt: Runtime, ctx: StepContext) -> None:
    """Copy the image into our storage while the video renders: the render may take minutes, and
    the image's link, made first, runs out first. Best effort, and it never raises: the video's
    job is the poller's by now. If the copy fails, the store step copies the image (or reports
    its link expired); if the store step gets there first (a video done at once), the copy here
    is harmless (same key, same bytes) and its row is skipped. The row is committed on its own;
    a run after a crash finds it and copies nothing again."""
    try:
        _store_image(rt, ctx)
    except Exception as exc:  # noqa: BLE001  # the step has handed its job on: nothing here may undo that
        code = exc.code if isinstance(exc, GenlineError) else type(exc).__name__
        log.warning("image_copy_deferred", step_id=ctx.step_id, pipeline_id=ctx.pipeline_id, code=code)


def _store_image(rt: Runtime, ctx: StepContext) -> None:
    asset = (ctx.outputs.get(StepKind.IMAGE) or {}).get("assets", [{}])[0]
    if not asset.get("url"):
        return
    key = _wanted(ctx)[StepKind.IMAGE]
    if not ctx.first_run:  # an earlier run may have stored it already
        with rt.db.transaction() as s:
            if s.connection().execute(_STORED_BY_KEY, {"keys": [key]}).first() is not None:
                return
    expires = _parse_time(asset.get("expires_at"))
    info = copy_url_to_store(rt.downloads, rt.store, asset["url"], key, expires_at=expires, expect_type="image")
    with rt.db.transaction() as s:
        _insert_stored(s, [_stored_row(ctx, StepKind.IMAGE, info, expires)])


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


def _forget_new_intent(rt: Runtime, ctx: StepContext) -> None:
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
            job.error_code, job.error_message = err.code, err.message


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


# --- store -----------------------------------------------------------------------------------------
def _wanted(ctx: StepContext) -> dict[str, str]:
    return {kind: f"outputs/{ctx.pipeline_id}/{kind}.{ext}" for kind, ext in (("video", "mp4"), ("image", "png"))}


_STORED_BY_KEY = select(
    STORED.c.kind, STORED.c.key, STORED.c.location, STORED.c.size, STORED.c.sha256, STORED.c.content_type
).where(STORED.c.key.in_(bindparam("keys", expanding=True)))
# A stored object's key is unique. The video step's early image copy and the store step may both
# copy the image (a video done at once); the same key holds the same bytes, so the second row is
# skipped, not an error.
_INSERT_STORED = {
    "postgresql": postgresql.insert(STORED).on_conflict_do_nothing(index_elements=[STORED.c.key]),
    "sqlite": sqlite.insert(STORED).on_conflict_do_nothing(index_elements=[STORED.c.key]),
}


def _insert_stored(s: Session, rows: list[dict[str, Any]]) -> None:
    conn = s.connection()
    conn.execute(_INSERT_STORED[conn.dialect.name], rows)


def prepare_store(s: Session, rt: Runtime, ctx: StepContext) -> dict[str, dict[str, Any]]:
    """In the claiming transaction: what is stored already (the image, by the video step, and
    whatever an earlier run of this step stored)."""
    rows = s.connection().execute(_STORED_BY_KEY, {"keys": list(_wanted(ctx).values())}).all()
    return {row.kind: _stored(row._mapping) for row in rows}


def store_outputs(rt: Runtime, ctx: StepContext) -> Outcome:
    """Copy the video (and the image, unless the video step stored it already) into our storage
    before the provider's links expire. The rows recording the copies are committed with the
    step's completion: the pipeline completes only once they are, and a run that fails before
    then copies again (to the same keys)."""
    wanted = _wanted(ctx)
    if isinstance(ctx.prepared, dict):
        done = dict(ctx.prepared)
    else:  # run outside the engine's claim: read it here
        with rt.db.transaction() as s:
            done = prepare_store(s, rt, ctx)
    rows: list[dict[str, Any]] = []
    for kind, key in wanted.items():
        if kind in done:
            continue
        asset = ctx.outputs[kind]["assets"][0]
        expires = _parse_time(asset.get("expires_at"))
        try:
            info = copy_url_to_store(rt.downloads, rt.store, asset["url"], key, expires_at=expires, expect_type=kind)
        except ResultExpired as err:
            if kind == StepKind.VIDEO:
                raise
            # The video (copied first) is what the pipeline delivers; an image whose link ran out
            # while the video rendered is reported, loudly, not made to cost the seller the video.
            log.error("image_link_expired", alert=True, step_id=ctx.step_id, pipeline_id=ctx.pipeline_id)
            done[kind] = {"expired": True, "error_code": err.code, "message": err.message}
            continue
        rows.append(_stored_row(ctx, kind, info, expires))
    done.update({row["kind"]: _stored(row) for row in rows})
    if not rows:
        return Done(done)

    def write(s: Session) -> None:
        _insert_stored(s, rows)

    return Done(done, write=write)


def _stored_row(ctx: StepContext, kind: str, info: StoredObjectInfo, expires: datetime | None) -> dict[str, Any]:
    return {
        "id": new_id("obj"),
        "pipeline_id": ctx.pipeline_id,
        "step_id": ctx.step_id,
        "kind": kind,
        "key": info.key,
        "location": info.location,
        "size": info.size,
        "sha256": info.sha256,
        "content_type": info.content_type,
        "source_expires_at": expires,
    }


def _stored(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "key": row["key"],
        "location": row["location"],
        "size": row["size"],
        "sha256": row["sha256"],
        "content_type": row["content_type"],
    }


def _parse_time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


PIPELINE: tuple[tuple[StepKind, StepFn], ...] = (
    (StepKind.COPY, write_copy),
    (StepKind.IMAGE, render_image),
    (StepKind.VIDEO, render_video),
    (StepKind.STORE, store_outputs),
)
STEP_FUNCTIONS: dict[str, StepFn] = {kind.value: fn for kind, fn in PIPELINE}
PrepareFn = Callable[[Session, Runtime, StepContext], Any]
PREPARE: dict[str, PrepareFn] = {
    StepKind.IMAGE.value: prepare_job,
    StepKind.VIDEO.value: prepare_job,
    StepKind.STORE.value: prepare_store,
}
