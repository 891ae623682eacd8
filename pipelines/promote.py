"""Promoting a draft: the same listing rendered again on a costlier profile, paying only for the video.

The guide's rule is low-cost models while drafting and premium only for the final render. A
finished draft is rendered again (``genline promote PIPELINE --profile premium``) as a NEW pipeline
linked to it (``promoted_from``), whose copy and image steps are written already succeeded with the
draft's outputs: no chat call, no image job, no cost. Only its video step (the new profile's video
model and seconds) and its store step run.

- The copy: the draft's copy output, as it is (marked ``reused_from``).
- The image: the draft's stored copy of its image (``<draft id>/image.png``) is copied in our object
  store to ``<new id>/image.png`` and recorded for the new image step (a ``stored_objects`` row), so
  the video is rendered from our own copy (``store.image_for_video`` reads ``stored_key``) and the
  store step finds the image stored already. A draft whose image was never stored (its link ran out
  before the copy) cannot be promoted: there is nothing to render from without paying for a new image.
- Money: the estimate counts the video and the store steps only (copy and image at $0, marked
  ``reused``); it is reserved against the spend caps in the transaction that writes the pipeline, so
  a cap that cannot fit the video refuses the promotion and nothing is created.
- Idempotency: the default key ``promote:<draft id>:<profile>`` (under the draft's user) makes a
  second promotion return the first one (``created=False``).

Order: checks (draft, profile, entitlement, state, headroom) → the image copied in the store → one
transaction (pipeline, steps, stored image row, reservation) → the video step nudged after commit.
If the transaction writes nothing (a refusal, or the key taken meanwhile) the copied image is deleted.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Connection, Table, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from genline.config.clock import utcnow
from genline.config.constants import PipelineStatus, StepKind, StepStatus
from genline.config.errors import IdempotencyConflict, InvalidState, NotFound, StorageError, ValidationError
from genline.config.logging import get_logger
from genline.pipelines.dispatch import nudge
from genline.pipelines.engine import Effects, apply_effects
from genline.pipelines.estimate import Estimate, StepEstimate, estimate_pipeline, profile_of
from genline.pipelines.request import check_profile_allowed
from genline.pipelines.retry import HISTORY_FROM
from genline.pipelines.runtime import Runtime
from genline.pipelines.spend import announce, check_headroom, ledgers_for, reserve
from genline.pipelines.steps import PIPELINE
from genline.pipelines.submit import Accepted
from genline.storage.models import Pipeline, Step, StoredObject, new_id
from genline.storage.objects import StoredObjectInfo

log = get_logger("genline.promote")
PIPELINES = cast(Table, Pipeline.__table__)
STEPS = cast(Table, Step.__table__)
STORED = cast(Table, StoredObject.__table__)
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:+-]*$")  # as a request's idempotency_key (pipelines/request.py)
REUSED = (StepKind.COPY.value, StepKind.IMAGE.value)  # the draft's steps a promotion takes as they are
_INSERT_PIPELINE = {
    "postgresql": postgresql.insert(PIPELINES).on_conflict_do_nothing(
        index_elements=[PIPELINES.c.user_id, PIPELINES.c.idempotency_key]
    ),
    "sqlite": sqlite.insert(PIPELINES).on_conflict_do_nothing(
        index_elements=[PIPELINES.c.user_id, PIPELINES.c.idempotency_key]
    ),
}


def default_key(draft_id: str, profile: str) -> str:
    """The idempotency key of a promotion when the caller gives none: one per draft and profile."""
    return f"promote:{draft_id}:{profile}"


def fingerprint(draft_id: str, profile: str) -> str:
    """A promotion's request hash: the same draft on the same profile is the same request."""
    canonical = {"promote": draft_id, "profile": profile}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def promote_pipeline(
    rt: Runtime, draft_id: str, profile: str = "premium", *, idempotency_key: str | None = None
) -> Accepted:
    """Render a finished draft again on ``profile``, reusing its copy and image; returns at once
    with the new pipeline's id (``created=False`` when this promotion was accepted before)."""
    draft, steps, image_row = _read_draft(rt, draft_id)
    _check(rt, draft, profile)
    key = default_key(draft.id, profile) if idempotency_key is None else _checked_key(idempotency_key)
    request_hash = fingerprint(draft.id, profile)
    with rt.db.engine.connect() as conn:
        found = _same_key(conn, draft.user_id, key, request_hash)
    if found is not None:
        return found
    _check_finished(draft)
    if image_row is None:
        raise _image_missing(draft.id)
    estimate = promotion_estimate(rt, draft, steps, profile)
    ledgers = ledgers_for(rt.catalog, draft.user_id, draft.feature)
    if ledgers:  # refuse early, before the image is copied; the reservation below is what counts
        with rt.db.engine.connect() as conn:
            check_headroom(conn, ledgers, estimate.total_usd)

    pipeline_id = new_id("pl")
    step_ids = {kind.value: new_id("st") for kind, _fn in PIPELINE}
    image_key = f"{pipeline_id}/image.png"
    info = _copy_image(rt, draft.id, image_row, image_key)
    now = utcnow()
    row = _pipeline_row(draft, pipeline_id, profile, key, request_hash, estimate, now)
    row["models"] = _reused_models(draft, steps)  # what made the copy and image; the profile picks the video's
    written = False
    alerts: list[str] = []
    try:
        with rt.db.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE (storage/db.py)
            if not conn.execute(_INSERT_PIPELINE[conn.dialect.name], row).rowcount:
                found = _same_key(conn, draft.user_id, key, request_hash)
                if found is None:
                    raise RuntimeError(f"idempotency key of user {draft.user_id!r} was taken, but no pipeline holds it")
                return found
            conn.execute(insert(STEPS), _step_rows(pipeline_id, step_ids, steps, image_key, now))
            conn.execute(insert(STORED), [_stored_row(pipeline_id, step_ids[StepKind.IMAGE.value], info)])
            alerts = reserve(conn, ledgers, pipeline_id, estimate.total_usd)
            written = True
    finally:
        if not written:  # refused, or another promotion holds the key: our copy of the image is no one's
            _forget_image(rt, image_key)
    announce(alerts)
    log.info(
        "pipeline_promoted",
        pipeline_id=pipeline_id,
        promoted_from=draft.id,
        user_id=draft.user_id,
        feature=draft.feature,
        profile=profile,
        estimated_cost_usd=str(estimate.total_usd),
    )
    video = step_ids[StepKind.VIDEO.value]
    apply_effects(rt, Effects(nudges=[nudge(video, StepKind.VIDEO.value, draft.priority, pipeline_id)]))
    return Accepted(pipeline_id, True, PipelineStatus.PENDING.value, estimate.total_usd)


# --- checks ----------------------------------------------------------------------------------------
def _read_draft(rt: Runtime, draft_id: str) -> tuple[Any, dict[str, Any], Any]:
    """The draft's row, its steps by kind, and the stored-object row of its image (or None)."""
    with rt.db.engine.connect() as conn:
        draft = conn.execute(select(PIPELINES).where(PIPELINES.c.id == draft_id)).first()
        if draft is None:
            raise NotFound(f"No pipeline has the id {draft_id!r}.", code="pipeline_not_found", field="id")
        live = (STEPS.c.pipeline_id == draft_id) & (STEPS.c.position < HISTORY_FROM)  # not a retried try's history
        steps = {s.kind: s for s in conn.execute(select(STEPS).where(live))}
        image = conn.execute(
            select(STORED)
            .where(STORED.c.pipeline_id == draft_id, STORED.c.kind == StepKind.IMAGE.value)
            .order_by(STORED.c.created_at)
            .limit(1)
        ).first()
    return draft, steps, image


def _check(rt: Runtime, draft: Any, profile: str) -> None:
    """The profile exists, differs from the draft's and is one the draft's feature may use."""
    profile_of(rt.catalog, profile)
    if profile == draft.profile:
        raise ValidationError(
            f"Pipeline {draft.id} was already rendered on profile {profile!r}; promote it to another profile.",
            code="profile_unchanged",
            field="profile",
        )
    check_profile_allowed(draft.feature, profile, rt.catalog.feature_policy(draft.feature))


def _checked_key(key: str) -> str:
    """A caller's idempotency key, held to a request's rule (``pipelines/request.py``)."""
    if not isinstance(key, str) or not _KEY.match(key) or len(key) > 200:
        raise ValidationError(
            "idempotency_key must be 1 to 200 letters, digits and . _ @ : + - (starting with a letter or digit).",
            code="idempotency_key_invalid",
            field="idempotency_key",
        )
    return key


def _check_finished(draft: Any) -> None:
    if draft.status == PipelineStatus.SUCCEEDED:
        return
    if draft.status in (PipelineStatus.FAILED, PipelineStatus.CANCELLED):
        raise InvalidState(
            f"Pipeline {draft.id} {'failed' if draft.status == PipelineStatus.FAILED else 'was cancelled'}; "
            "only a draft that succeeded can be promoted (submit it again instead).",
            code="pipeline_failed",
            field="id",
        )
    raise InvalidState(
        f"Pipeline {draft.id} is still {draft.status}; promote it once it has succeeded.",
        code="pipeline_not_finished",
        field="id",
    )


def _image_missing(draft_id: str) -> InvalidState:
    return InvalidState(
        f"Pipeline {draft_id} has no stored image to render from (its image was never copied into our "
        "storage, or has been removed); submit the listing again on the new profile instead.",
        code="draft_image_missing",
        field="id",
    )


def _same_key(conn: Connection, user_id: str, key: str, request_hash: str) -> Accepted | None:
    """The pipeline this user's key already names, if any; refused if it was another request."""
    row = conn.execute(
        select(PIPELINES.c.id, PIPELINES.c.status, PIPELINES.c.request_hash, PIPELINES.c.estimated_cost_usd).where(
            PIPELINES.c.user_id == user_id, PIPELINES.c.idempotency_key == key
        )
    ).first()
    if row is None:
        return None
    if row.request_hash != request_hash:
        raise IdempotencyConflict(
            f"idempotency_key {key!r} was already used by user {user_id!r} for a different request "
            f"(pipeline {row.id}); use a new key for new work.",
            field="idempotency_key",
        )
    return Accepted(row.id, False, row.status, Decimal(str(row.estimated_cost_usd)))


# --- what the new pipeline is --------------------------------------------------------------------
def promotion_estimate(rt: Runtime, draft: Any, steps: dict[str, Any], profile: str) -> Estimate:
    """The new profile's estimate with the copy and image steps at $0 (the draft's, reused): the
    video (the profile's first video model, its seconds) and the store step."""
    full = estimate_pipeline(rt.catalog, profile, batch=draft.priority == "batch")
    reused = _reused_models(draft, steps)
    kept = tuple(
        StepEstimate(s.kind, reused.get(s.kind, ""), 0.0, s.unit, Decimal(0)) if s.kind in REUSED else s
        for s in full.steps
    )
    return replace(full, steps=kept, total_usd=sum((s.cost_usd for s in kept), Decimal(0)))


def _estimate_json(estimate: Estimate, draft_id: str) -> dict[str, Any]:
    out = estimate.as_json()
    out["promoted_from"] = draft_id
    for step in out["steps"]:
        if step["kind"] in REUSED:
            step["reused"] = True
    return out


def _reused_models(draft: Any, steps: dict[str, Any]) -> dict[str, str]:
    """The models that made the draft's copy and image (what the new pipeline's ``models`` names)."""
    models: dict[str, str] = {}
    for kind in REUSED:
        step = steps.get(kind)
        model = (step.output or {}).get("model") if step is not None else None
        model = model or (step.model if step is not None else None) or (draft.models or {}).get(kind)
        if model:
            models[kind] = str(model)
    return models


def _pipeline_row(
    draft: Any, pipeline_id: str, profile: str, key: str, request_hash: str, estimate: Estimate, now: Any
) -> dict[str, Any]:
    return {
        "id": pipeline_id,
        "user_id": draft.user_id,
        "feature": draft.feature,
        "profile": profile,
        "description": draft.description,
        "image_ref": draft.image_ref,
        "image_url": draft.image_url,
        "callback_url": draft.callback_url,
        "priority": draft.priority,
        "models": {},
        "flags": draft.flags,
        "idempotency_key": key,
        "request_hash": request_hash,
        "status": PipelineStatus.PENDING.value,
        "estimated_cost_usd": estimate.total_usd,
        "estimate": _estimate_json(estimate, draft.id),
        "reserved_usd": estimate.total_usd,
        "no_cache": draft.no_cache,
        "promoted_from": draft.id,
        "batch_window": draft.batch_window,
        "cost_usd": Decimal(0),
        "created_at": now,
        "updated_at": now,
    }


def _step_rows(
    pipeline_id: str, step_ids: dict[str, str], draft_steps: dict[str, Any], image_key: str, now: Any
) -> list[dict[str, Any]]:
    """Copy and image succeeded with the draft's outputs; the video queued; the store pending."""
    copy, image = draft_steps[StepKind.COPY.value], draft_steps[StepKind.IMAGE.value]
    image_model = (image.output or {}).get("model") or image.model
    outputs = {
        StepKind.COPY.value: {**(copy.output or {}), "reused_from": copy.id},
        StepKind.IMAGE.value: {"model": image_model, "assets": [], "stored_key": image_key, "reused_from": image.id},
    }
    models = {StepKind.COPY.value: (copy.output or {}).get("model") or copy.model, StepKind.IMAGE.value: image_model}
    rows: list[dict[str, Any]] = []
    for position, (kind, _fn) in enumerate(PIPELINE):
        done = kind.value in outputs
        status = StepStatus.SUCCEEDED if done else StepStatus.QUEUED if kind == StepKind.VIDEO else StepStatus.PENDING
        rows.append(
            {
                "id": step_ids[kind.value],
                "pipeline_id": pipeline_id,
                "position": position,
                "kind": kind.value,
                "status": status.value,
                "attempts": 0,
                "model": models.get(kind.value),
                "output": outputs.get(kind.value),
                "started_at": now if done else None,
                "finished_at": now if done else None,
                "created_at": now,
                "updated_at": now,
            }
        )
    return rows


# --- the image -----------------------------------------------------------------------------------
def _copy_image(rt: Runtime, draft_id: str, stored: Any, key: str) -> StoredObjectInfo:
    """The draft's stored image copied to ``key`` in our store (streamed; size and checksum checked)."""
    try:
        chunks = rt.store.open_stream(stored.key)
    except StorageError as err:
        if err.code == "object_not_found":
            raise _image_missing(draft_id) from err
        raise
    info = rt.store.put_stream(key, chunks, content_type=stored.content_type, expected_size=int(stored.size))
    if stored.sha256 and info.sha256 and info.sha256 != stored.sha256:
        _forget_image(rt, key)
        raise StorageError(
            f"The stored image of pipeline {draft_id} does not match its recorded checksum; it was not reused.",
            code="checksum_mismatch",
        )
    return info


def _stored_row(pipeline_id: str, step_id: str, info: StoredObjectInfo) -> dict[str, Any]:
    return {
        "id": new_id("obj"),
        "pipeline_id": pipeline_id,
        "step_id": step_id,
        "kind": StepKind.IMAGE.value,
        "key": info.key,
        "location": info.location,
        "size": info.size,
        "sha256": info.sha256,
        "content_type": info.content_type,
        "source_expires_at": None,
        "created_at": utcnow(),
    }


def _forget_image(rt: Runtime, key: str) -> None:
    try:
        rt.store.delete(key)
    except Exception as exc:  # noqa: BLE001  # the refusal is what the caller must see, not this
        log.warning("promote_image_left", key=key, error=type(exc).__name__)


# --- what a promotion shows ----------------------------------------------------------------------
def promotion_of(rt: Runtime, pipeline_id: str) -> dict[str, Any]:
    """A promoted pipeline's link and estimate as accepted (for the CLI): ``promoted_from``,
    ``profile`` and ``estimate`` (by step; the reused steps marked ``reused``)."""
    with rt.db.engine.connect() as conn:
        row = conn.execute(
            select(PIPELINES.c.promoted_from, PIPELINES.c.profile, PIPELINES.c.estimate).where(
                PIPELINES.c.id == pipeline_id
            )
        ).first()
    if row is None:
        raise NotFound(f"No pipeline has the id {pipeline_id!r}.", code="pipeline_not_found", field="id")
    return {"promoted_from": row.promoted_from, "profile": row.profile, "estimate": row.estimate or {}}
