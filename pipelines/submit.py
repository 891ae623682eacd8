"""Accepting a pipeline: validate, then one transaction; the same idempotency key returns the
same pipeline. The first step is nudged only after the commit; if that nudge is lost, the sweeper
sends it again, so an accepted pipeline never waits forever.

A submit is on the caller's path, so its rows are written by plain statements, not ORM objects:
the unit of work (a look-up, a flush, then the steps) was most of a submit (docs/PERFORMANCE.md).
They are the rows the ORM wrote: each column with a Python-side default in ``storage/models.py``
is filled here too (``_PIPELINE_COLUMNS``, ``_STEP_ROWS``).

- PostgreSQL: ONE statement, run on its own (autocommit), so it is one transaction and one round
  trip: ``WITH accepted AS (INSERT INTO pipelines ... ON CONFLICT (user_id, idempotency_key) DO
  NOTHING RETURNING id) INSERT INTO steps ... SELECT ... FROM accepted CROSS JOIN (VALUES ...)``;
  the steps are written only if the pipeline was. It runs on the pooled psycopg connection, which
  prepares it on the server: the same statement through SQLAlchemy's execution cost more a submit,
  and SQLAlchemy does not cache a multi-row VALUES, so compiled it each time.
- SQLite: ``BEGIN IMMEDIATE`` (the engine's ``begin`` hook), the same conditional pipeline insert,
  the steps in one ``executemany``, ``COMMIT``.

If the key is taken, the pipeline holding it answers: the same request gets it back with
``created=False``, a different one is refused. Two submits with one key at once: the second
insert waits for the first's transaction, then inserts nothing, and both answer with one pipeline
(SQLite: ``BEGIN IMMEDIATE`` runs them one after the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NoReturn

import psycopg
from psycopg.types.json import Json
from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError

from genline.config.clock import utcnow
from genline.config.constants import PipelineStatus, StepStatus
from genline.config.errors import IdempotencyConflict, SpendCapExceeded
from genline.config.logging import get_logger
from genline.pipelines.dispatch import nudge
from genline.pipelines.engine import Effects, apply_effects
from genline.pipelines.estimate import estimate_pipeline
from genline.pipelines.request import PipelineRequest
from genline.pipelines.runtime import Runtime
from genline.pipelines.spend import Ledger, announce, check_headroom, ledgers_for, reserve
from genline.pipelines.steps import PIPELINE
from genline.storage.models import Pipeline, Step, UTCDateTime, new_id

log = get_logger("genline.submit")

_PIPELINES = Pipeline.metadata.tables[Pipeline.__tablename__]
_STEPS = Step.metadata.tables[Step.__tablename__]
_KEY = (_PIPELINES.c.user_id, _PIPELINES.c.idempotency_key)  # unique constraint uq_pipelines_user_id
# Every column the ORM wrote for a new pipeline; the others are NULL. Defaults filled here:
# priority and models (the request always has them), cost_usd 0, created_at = updated_at = now.
_PIPELINE_COLUMNS = (
    "id",
    "user_id",
    "feature",
    "profile",
    "description",
    "image_ref",
    "image_url",
    "callback_url",
    "priority",
    "models",
    "flags",
    "idempotency_key",
    "request_hash",
    "status",
    "estimated_cost_usd",
    "estimate",
    "reserved_usd",
    "no_cache",
    "promoted_from",
    "batch_window",
    "cost_usd",
    "created_at",
    "updated_at",
)
# A new step: place, kind and first status come from PIPELINE; attempts 0 (the model default),
# created_at = updated_at = now; model, output, errors and times are NULL.
_STEP_ROWS = tuple(
    (position, kind.value, (StepStatus.QUEUED if position == 0 else StepStatus.PENDING).value)
    for position, (kind, _fn) in enumerate(PIPELINE)
)
_STEP_COLUMNS = ("id", "pipeline_id", "position", "kind", "status", "attempts", "created_at", "updated_at")


def _postgres_sql() -> str:
    """The PostgreSQL statement, in psycopg's ``%(name)s`` style; its rowcount is the steps written."""
    values = ", ".join(
        "%(now)s" if name in ("created_at", "updated_at") else f"%({name})s" for name in _PIPELINE_COLUMNS
    )
    steps = ", ".join(
        f"(%(step_{position})s, {position}, '{kind}', '{status}')" for position, kind, status in _STEP_ROWS
    )
    return (
        f"WITH accepted AS (INSERT INTO {_PIPELINES.name} ({', '.join(_PIPELINE_COLUMNS)}) VALUES ({values}) "
        f"ON CONFLICT ({', '.join(c.name for c in _KEY)}) DO NOTHING RETURNING id) "
        f"INSERT INTO {_STEPS.name} ({', '.join(_STEP_COLUMNS)}) "
        "SELECT s.id, accepted.id, s.position, s.kind, s.status, 0, %(now)s, %(now)s "
        f"FROM accepted CROSS JOIN (VALUES {steps}) AS s (id, position, kind, status)"
    )


_POSTGRES_ACCEPT = _postgres_sql()  # psycopg prepares it on the server after a few runs
_UTC_DATETIME = UTCDateTime()
_SQLITE_PIPELINE = sqlite.insert(_PIPELINES).on_conflict_do_nothing(index_elements=_KEY)
_SQLITE_STEPS = insert(_STEPS)
_SAME_KEY = select(
    _PIPELINES.c.id, _PIPELINES.c.status, _PIPELINES.c.request_hash, _PIPELINES.c.estimated_cost_usd
).where(_PIPELINES.c.user_id == bindparam("user_id"), _PIPELINES.c.idempotency_key == bindparam("idempotency_key"))


@dataclass(frozen=True)
class Accepted:
    pipeline_id: str
    created: bool  # False when the idempotency key named an existing pipeline
    status: str
    estimated_cost_usd: Decimal | None = None  # the whole pipeline's estimate, reserved against the caps


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


def _same_key(conn: Connection, request: PipelineRequest, fingerprint: str) -> Accepted | None:
    """The pipeline already accepted under this user's key, if any; refused if it was another request."""
    row = conn.execute(_SAME_KEY, {"user_id": request.user_id, "idempotency_key": request.idempotency_key}).first()
    if row is None:
        return None
    if row.request_hash != fingerprint:
        raise IdempotencyConflict(
            f"idempotency_key {request.idempotency_key!r} was already used by user {request.user_id!r} "
            f"for a different request (pipeline {row.id}); use a new key for new work.",
            field="idempotency_key",
        )
    return Accepted(row.id, False, row.status, Decimal(str(row.estimated_cost_usd)))


def _taken_and_gone(request: PipelineRequest) -> NoReturn:
    # The insert found the key taken, yet no row holds it. Pipelines are never deleted, so this is
    # not expected; say so rather than accept nothing.
    raise RuntimeError(
        f"idempotency_key {request.idempotency_key!r} of user {request.user_id!r} was taken, but no pipeline holds it"
    )


def _write_postgres(
    conn: Connection, row: dict[str, Any], step_ids: list[str], *, own_transaction: bool = True
) -> bool:
    """The one statement, on its own (autocommit) unless the caller's transaction holds more (the
    caps' reservations); True if the pipeline and its steps were written."""
    params = dict(row)
    # Bound as SQLAlchemy binds these columns: JSON through psycopg's Json, times as naive UTC.
    params["models"] = Json(row["models"])
    params["flags"] = None if row["flags"] is None else Json(row["flags"])
    params["estimate"] = None if row["estimate"] is None else Json(row["estimate"])
    params["now"] = _UTC_DATETIME.process_bind_param(row["created_at"], conn.dialect)
    for position, step_id in enumerate(step_ids):
        params[f"step_{position}"] = step_id
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    # Autocommit set on the driver and undone here, not through SQLAlchemy's isolation-level
    # option: that one costs a measurable part of a submit to set and reset, this a plain attribute.
    if own_transaction:
        driver.autocommit = True
    try:
        return bool(driver.execute(_POSTGRES_ACCEPT, params).rowcount)
    except psycopg.Error as exc:
        # As SQLAlchemy does for its own statements: a dead connection leaves the pool, and the
        # error is raised as SQLAlchemy's (IntegrityError, OperationalError, ...).
        if driver.broken:
            conn.invalidate(exc)
        raise DBAPIError.instance(_POSTGRES_ACCEPT, params, exc, psycopg.Error, dialect=conn.dialect) from exc
    finally:
        if own_transaction and not driver.closed:
            driver.autocommit = False


def _write_sqlite(conn: Connection, row: dict[str, Any], step_ids: list[str]) -> bool:
    """Inside BEGIN IMMEDIATE; True if the pipeline and its steps were written."""
    if not conn.execute(_SQLITE_PIPELINE, row).rowcount:
        return False
    now = row["created_at"]
    conn.execute(
        _SQLITE_STEPS,
        [
            dict(zip(_STEP_COLUMNS, (step_id, row["id"], position, kind, status, 0, now, now), strict=True))
            for step_id, (position, kind, status) in zip(step_ids, _STEP_ROWS, strict=True)
        ],
    )
    return True


def _accept(
    rt: Runtime, row: dict[str, Any], step_ids: list[str], request: PipelineRequest, ledgers: list[Ledger]
) -> tuple[Accepted | None, list[str]]:
    """Write the pipeline and its steps in one transaction (``None``), unless the key is taken:
    then the pipeline that holds it. With caps that apply, the same transaction reserves the
    estimate against each (``spend.reserve``): a refusal rolls back the pipeline with it. Returns
    the cap alerts to log after the commit too."""
    if rt.db.is_postgres and not ledgers:
        with rt.db.engine.connect() as conn:
            if _write_postgres(conn, row, step_ids):
                return None, []
            return _same_key(conn, request, row["request_hash"]) or _taken_and_gone(request), []
    with rt.db.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE (storage/db.py)
        written = _write_postgres(conn, row, step_ids, own_transaction=False) if rt.db.is_postgres else None
        if written is None:
            written = _write_sqlite(conn, row, step_ids)
        if not written:
            return _same_key(conn, request, row["request_hash"]) or _taken_and_gone(request), []
        return None, reserve(conn, ledgers, row["id"], row["reserved_usd"])


def submit_pipeline(rt: Runtime, request: PipelineRequest, *, promoted_from: str | None = None) -> Accepted:
    """Accept one validated request in one transaction. Returns at once; the pipeline runs on the
    workers. The same idempotency key returns the same pipeline; a different request under it is
    refused. The pipeline's estimate is reserved against every spend cap that applies, in the same
    transaction; one it would cross refuses it (``SpendCapExceeded``) and nothing is created."""
    estimate = estimate_pipeline(
        rt.catalog,
        request.profile,
        description=request.description,
        models=request.models,
        batch=request.priority == "batch",
    )
    ledgers = ledgers_for(rt.catalog, request.user_id, request.feature)
    if ledgers:  # refuse early, before the photo is stored; the reservation below is what counts
        with rt.db.engine.connect() as conn:
            try:
                check_headroom(conn, ledgers, estimate.total_usd)
            except SpendCapExceeded:
                found = _same_key(conn, request, request.fingerprint())  # a resubmission reserves nothing new
                if found is None:
                    raise
                return found
    image_url = _input_image_url(rt, request)
    image = request.image
    now = utcnow()
    row: dict[str, Any] = {
        "id": new_id("pl"),
        "user_id": request.user_id,
        "feature": request.feature,
        "profile": request.profile,
        "description": request.description,
        "image_ref": request.image_ref if image.url else f"inputs/{image.sha256}.{image.extension}",
        "image_url": image_url,
        "callback_url": request.callback_url,
        "priority": request.priority,
        "models": request.models,
        "flags": request.flags,  # what screening found (names only); NULL when nothing
        "idempotency_key": request.idempotency_key,
        "request_hash": request.fingerprint(),
        "status": PipelineStatus.PENDING.value,
        "estimated_cost_usd": estimate.total_usd,
        "estimate": estimate.as_json(),
        "reserved_usd": estimate.total_usd,
        "no_cache": request.no_cache,
        "promoted_from": promoted_from,
        "batch_window": request.batch_window,
        "cost_usd": Decimal(0),
        "created_at": now,
        "updated_at": now,
    }
    step_ids = [new_id("st") for _ in _STEP_ROWS]
    found, alerts = _accept(rt, row, step_ids, request, ledgers)
    if found is not None:
        return found
    announce(alerts)
    log.info(
        "pipeline_accepted",
        pipeline_id=row["id"],
        user_id=request.user_id,
        feature=request.feature,
        profile=request.profile,
        estimated_cost_usd=str(estimate.total_usd),
    )
    if request.flags and "injection_suspected" in request.flags:
        # The audit mark of a suspected prompt injection: the signals, never the text.
        log.warning(
            "injection_suspected",
            pipeline_id=row["id"],
            user_id=request.user_id,
            feature=request.feature,
            signals=request.flags["injection_suspected"],
            audit=True,
        )
    apply_effects(rt, Effects(nudges=[nudge(step_ids[0], PIPELINE[0][0], request.priority, row["id"])]))
    return Accepted(row["id"], True, PipelineStatus.PENDING.value, estimate.total_usd)
