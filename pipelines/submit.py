"""Accepting a pipeline: validate, then one transaction; the same idempotency key returns the
same pipeline. The first step is nudged only after the commit; if that nudge is lost, the sweeper
sends it again, so an accepted pipeline never waits forever."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config.constants import PipelineStatus, StepStatus
from config.errors import IdempotencyConflict
from config.logging import get_logger
from pipelines.dispatch import queue_for
from pipelines.engine import Effects, apply_effects
from pipelines.request import PipelineRequest
from pipelines.runtime import Runtime
from pipelines.steps import PIPELINE
from storage.models import Pipeline, Step, new_id

log = get_logger("genline.submit")


@dataclass(frozen=True)
class Accepted:
    pipeline_id: str
    created: bool  # False when the idempotency key named an existing pipeline
    status: str


def _input_image_url(rt: Runtime, request: PipelineRequest) -> str:
    """A URL the provider can fetch: the caller's own URL, or our copy of the uploaded file."""
    image = request.image
    if image.url:
        return image.url
    assert image.data is not None and image.sha256 is not None and image.content_type is not None
    key = f"inputs/{image.sha256}.{image.extension}"  # content-addressed: storing twice is harmless
    if rt.store.head(key) is None:
        rt.store.put_stream(key, [image.data], content_type=image.content_type, expected_size=len(image.data))
    return rt.store.presigned_url(key, expires_s=7 * 24 * 3600)


def _same_key(s: Session, request: PipelineRequest) -> Accepted | None:
    row = s.scalars(
        select(Pipeline).where(Pipeline.user_id == request.user_id, Pipeline.idempotency_key == request.idempotency_key)
    ).first()
    if row is None:
        return None
    if row.request_hash != request.fingerprint():
        raise IdempotencyConflict(
            f"idempotency_key {request.idempotency_key!r} was already used by user {request.user_id!r} "
            f"for a different request (pipeline {row.id}); use a new key for new work.",
            field="idempotency_key",
        )
    return Accepted(row.id, False, row.status)


def submit_pipeline(rt: Runtime, request: PipelineRequest) -> Accepted:
    """Accept one validated request in one transaction. Returns at once; the pipeline runs on the
    workers. The same idempotency key returns the same pipeline; a different request under it is
    refused."""
    image_url = _input_image_url(rt, request)
    profile = rt.catalog.profiles[request.profile]
    pipeline_id = new_id("pl")
    step_ids = [new_id("st") for _ in PIPELINE]
    try:
        with rt.db.transaction() as s:
            found = _same_key(s, request)
            if found is not None:
                return found
            s.add(
                Pipeline(
                    id=pipeline_id,
                    user_id=request.user_id,
                    feature=request.feature,
                    profile=request.profile,
                    description=request.description,
                    image_ref=request.image_ref
                    if request.image.url
                    else f"inputs/{request.image.sha256}.{request.image.extension}",
                    image_url=image_url,
                    callback_url=request.callback_url,
                    priority=request.priority,
                    models=request.models,
                    idempotency_key=request.idempotency_key,
                    request_hash=request.fingerprint(),
                    status=PipelineStatus.PENDING,
                    estimated_cost_usd=rt.catalog.estimate(profile),
                )
            )
            s.flush()
            s.add_all(
                [
                    Step(
                        id=step_id,
                        pipeline_id=pipeline_id,
                        position=position,
                        kind=kind.value,
                        status=StepStatus.QUEUED if position == 0 else StepStatus.PENDING,
                    )
                    for position, (step_id, (kind, _fn)) in enumerate(zip(step_ids, PIPELINE, strict=True))
                ]
            )
    except IntegrityError:
        # Another submit with the same key won the race: answer with its pipeline.
        with rt.db.transaction() as s:
            again = _same_key(s, request)
        if again is None:
            raise
        return again
    log.info(
        "pipeline_accepted",
        pipeline_id=pipeline_id,
        user_id=request.user_id,
        feature=request.feature,
        profile=request.profile,
    )
    apply_effects(rt, Effects(nudges=[(step_ids[0], queue_for(PIPELINE[0][0], request.priority))]))
    return Accepted(pipeline_id, True, PipelineStatus.PENDING.value)
