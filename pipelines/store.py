"""The store step: the provider's results copied into our object storage before their links expire.

The video step copies the image once the video is submitted (``store_image_early``): the image's
link was made first and runs out first. The store step copies the video (and the image, unless it
is stored already); the rows recording the copies are committed with the step's completion.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from genline.config.clock import utcnow
from genline.config.constants import StepKind
from genline.config.errors import GenlineError, ResultExpired, StorageError
from genline.config.logging import get_logger
from genline.pipelines.context import Done, Outcome, StepContext
from genline.pipelines.request import sniff_image_type
from genline.pipelines.runtime import Runtime
from genline.provider.safe_http import UnsafeURL, check_url
from genline.storage.models import StoredObject, new_id
from genline.storage.objects import StoredObjectInfo
from genline.storage.transfer import copy_url_to_store

log = get_logger("genline.steps")
STORED = cast(Table, StoredObject.__table__)


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


def image_for_video(rt: Runtime, ctx: StepContext) -> tuple[str | None, bool]:
    """The image the video is rendered from, and whether it is our own copy.

    A fresh provider link (more than ``GENLINE_COPY_RISK_MARGIN_S`` left, or no expiry given) is
    handed on as it is: the provider fetches it in moments, and our copy is made meanwhile. A link
    close to its end is copied into our storage first and the video rendered from our copy, so the
    provider is never handed a link that runs out before it reads it; a link already gone is a
    ``ResultExpired``, never handed on.

    A promoted pipeline's image (``pipelines/promote.py``) is ours already: its output names the
    ``stored_key`` of our copy and holds no provider link."""
    stored_key = (ctx.outputs.get(StepKind.IMAGE) or {}).get("stored_key")
    if stored_key:
        return provider_url(rt, str(stored_key)), True
    asset = (ctx.outputs.get(StepKind.IMAGE) or {}).get("assets", [{}])[0]
    if not asset.get("url"):
        return None, False
    expires = _parse_time(asset.get("expires_at"))
    if expires is None or (expires - utcnow()).total_seconds() > rt.settings.copy_risk_margin_s:
        try:  # handed on for the provider to fetch: the same checks as a user's URL
            check_url(str(asset["url"]), rt.url_policy)
        except UnsafeURL as err:
            raise StorageError(
                f"The provider's image link cannot be handed on ({err}).", code="result_link_blocked"
            ) from err
        return str(asset["url"]), False
    _store_image(rt, ctx)
    return provider_url(rt, _wanted(ctx)[StepKind.IMAGE]), True


def provider_url(rt: Runtime, key: str) -> str:
    """One of our stored images as the provider can fetch it: a presigned http(s) URL (S3), or on
    local storage, which no provider can reach, its bytes inline as a ``data:`` URL."""
    url = rt.store.presigned_url(key, expires_s=24 * 3600)
    if url.startswith(("http://", "https://")):
        return url
    data = rt.store.read_bytes(key)
    return f"data:{sniff_image_type(data[:16]) or 'image/png'};base64,{base64.b64encode(data).decode()}"


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
    rt.budget.before(ctx.call(None), "download")  # the provider's hosts count against its key's budget
    info = copy_url_to_store(rt.downloads, rt.store, asset["url"], key, expires_at=expires, expect_type="image")
    with rt.db.transaction() as s:
        _insert_stored(s, [_stored_row(ctx, StepKind.IMAGE, info, expires)])


def _wanted(ctx: StepContext) -> dict[str, str]:
    """The keys of a pipeline's outputs: ``<pipeline id>/video.mp4`` and ``<pipeline id>/image.png``,
    under the store's own prefix (``s3://bucket/outputs`` holds ``outputs/pl_…/video.mp4``).
    Uploaded photos live beside them under ``inputs/``."""
    return {kind: f"{ctx.pipeline_id}/{kind}.{ext}" for kind, ext in (("video", "mp4"), ("image", "png"))}


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
            rt.budget.before(ctx.call(None), "download")  # the provider's hosts count against its key's budget
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
