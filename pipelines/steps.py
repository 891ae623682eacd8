"""The pipeline's steps: plain functions with one signature, ``(runtime, StepContext) -> Outcome``.

    copy  → image → video → store

Adding a step is writing one function and adding it to ``PIPELINE``. A step either finishes
(``Done`` with its output) or hands a provider job to the poller (``Waiting``); it never sleeps
while the provider renders. Steps that start paid jobs go through ``start_provider_job``, which
keeps invariant 2: the intent row and its idempotency key exist before the submit, and the
provider's task_id is committed before anything else happens with it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from config.catalog import Profile
from config.clock import utcnow
from config.constants import JobStatus, StepKind, StepStatus
from config.errors import (
    CircuitOpen,
    InvalidState,
    ProviderConnectionError,
    ProviderError,
    ProviderNotFound,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from config.logging import get_logger
from pipelines.copy import copy_url_to_store
from pipelines.request import sniff_image_type
from pipelines.runtime import Runtime
from provider.gateway import CallContext
from storage.db import wake_poller
from storage.models import ProviderJob, Step, StoredObject, new_id

log = get_logger("genline.steps")


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

    def call(self, model: str | None) -> CallContext:
        return CallContext(self.user_id, self.feature, self.pipeline_id, self.step_id, model)

    def candidates(self, step: str, listed: tuple[str, ...]) -> list[str]:
        """Models to try, in order: the one asked for, then the profile's list."""
        first = [self.models[step]] if step in self.models else []
        return list(dict.fromkeys(first + list(listed)))


@dataclass(frozen=True)
class Done:
    output: dict[str, Any]


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
    photo = photo_for_provider(rt, ctx)

    def payload(model: str) -> dict[str, Any]:
        return {"model": model, "prompt": prompt, "n": 1, "size": ctx.profile.image_size, "image_urls": [photo]}

    return start_provider_job(rt, ctx, "image", ctx.candidates("image", ctx.profile.image_models), payload, 1.0)


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

    units = float(ctx.profile.video_duration_s)
    return start_provider_job(rt, ctx, "video", ctx.candidates("video", ctx.profile.video_models), payload, units)


def _falls_back(err: ProviderError) -> bool:
    """Only errors that prove the provider made no job may move on to another model."""
    answered_no = err.status_code is not None or err.nothing_sent
    return answered_no and isinstance(err, (ProviderNotFound, ProviderUnavailable, RateLimited, CircuitOpen))


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
    call; the provider's task_id is committed right after it. A retry, a redelivery or a crash
    anywhere in between submits with the same key, so the provider answers with the same job.
    """
    last: ProviderError | None = None
    for model in models:
        key = f"genline:{ctx.step_id}:{model}"
        with rt.db.transaction() as s:
            if s.get_one(Step, ctx.step_id).status != StepStatus.RUNNING:
                # Cancelled (or taken over) while this worker was on it: start no paid job now.
                raise InvalidState("The pipeline was cancelled; no job was started.", code="pipeline_cancelled")
            jobs = s.scalars(select(ProviderJob).where(ProviderJob.step_id == ctx.step_id)).all()
            live = next(
                (j for j in jobs if j.task_id is not None and j.status not in (JobStatus.FAILED, JobStatus.CANCELLED)),
                None,
            )
            if live is not None:  # this step has its job already: resume it, never submit again
                _wait_on(s, ctx.step_id, live, live.model, rt.settings.poll_interval_s)
                return Waiting(live.id)
            job = next((j for j in jobs if j.idempotency_key == key), None)
            if job is not None and job.status == JobStatus.FAILED:
                continue  # this model refused this request for good; try the next
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
        try:
            result = rt.gateway.submit(ctx.call(model), kind, payload(model), key)
        except ProviderError as err:
            _record_refusal(rt, job.id, err)
            if _falls_back(err):
                log.warning("model_fallback", step_id=ctx.step_id, model=model, code=err.code)
                last = err
                continue
            raise
        with rt.db.transaction() as s:
            row = s.get_one(ProviderJob, job.id)
            row.task_id = result.task_id
            row.status = JobStatus.PENDING
            row.submitted_at = utcnow()
            row.estimated_time_s = result.estimated_time_s
            _wait_on(s, ctx.step_id, row, model, rt.settings.poll_interval_s)
        log.info("provider_job_submitted", step_id=ctx.step_id, kind=kind, model=model, task_id=result.task_id)
        return Waiting(job.id)
    assert last is not None
    raise last


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


def _wait_on(s: Any, step_id: str, job: ProviderJob, model: str, interval: float) -> None:
    if job.next_poll_at is None and job.status not in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
        job.next_poll_at = utcnow() + timedelta(seconds=interval)
        wake_poller(s)
    step = s.get_one(Step, step_id)
    step.model = model
    if step.status == StepStatus.RUNNING:
        step.status = StepStatus.WAITING


# --- store -----------------------------------------------------------------------------------------
def store_outputs(rt: Runtime, ctx: StepContext) -> Outcome:
    """Copy the video (and the image) into our storage before the provider's links expire."""
    wanted = {kind: f"outputs/{ctx.pipeline_id}/{kind}.{ext}" for kind, ext in (("video", "mp4"), ("image", "png"))}
    with rt.db.transaction() as s:  # copied already by an earlier run of this step?
        done = {
            row.kind: _stored(row)
            for row in s.scalars(select(StoredObject).where(StoredObject.key.in_(list(wanted.values()))))
        }
    rows = []
    for kind, key in wanted.items():
        if kind in done:
            continue
        asset = ctx.outputs[kind]["assets"][0]
        expires = _parse_time(asset.get("expires_at"))
        info = copy_url_to_store(rt.downloads, rt.store, asset["url"], key, expires_at=expires, expect_type=kind)
        rows.append(
            StoredObject(
                id=new_id("obj"),
                pipeline_id=ctx.pipeline_id,
                step_id=ctx.step_id,
                kind=kind,
                key=info.key,
                location=info.location,
                size=info.size,
                sha256=info.sha256,
                content_type=info.content_type,
                source_expires_at=expires,
            )
        )
    if rows:
        with rt.db.transaction() as s:
            s.add_all(rows)
        done.update({row.kind: _stored(row) for row in rows})
    return Done(done)


def _stored(row: StoredObject) -> dict[str, Any]:
    return {
        "key": row.key,
        "location": row.location,
        "size": row.size,
        "sha256": row.sha256,
        "content_type": row.content_type,
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
