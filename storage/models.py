"""The rows that are genline's truth: pipelines, their steps, provider jobs, stored objects and
the audit log of every provider call. Messages on the broker carry only these rows' ids.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from genline.config.clock import utcnow

MONEY = Numeric(14, 6)


def new_id(prefix: str) -> str:
    """Row ids: a readable prefix and 128 random bits (``pl_``, ``st_``, ``job_``, ``obj_``)."""
    return f"{prefix}_{uuid.uuid4().hex}"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database (same on SQLite and PostgreSQL)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Pipeline(Base):
    __tablename__ = "pipelines"
    __table_args__ = (UniqueConstraint("user_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128))
    feature: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text)
    image_ref: Mapped[str] = mapped_column(Text)  # as given: a URL, or the stored input's key
    image_url: Mapped[str] = mapped_column(Text)  # what the provider is sent
    callback_url: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[str] = mapped_column(String(16), default="interactive")
    models: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # step kind -> model asked for
    # What screening found in the description (pipelines/screening.py): {"injection_suspected":
    # [signals], "pii_masked": [kinds]}; NULL when nothing. Names only, never the text.
    flags: Mapped[dict[str, list[str]] | None] = mapped_column(JSON(none_as_null=True))
    idempotency_key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    estimated_cost_usd: Mapped[Decimal] = mapped_column(MONEY, default=Decimal(0))
    cost_usd: Mapped[Decimal] = mapped_column(MONEY, default=Decimal(0))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Money (pipelines/spend.py): the estimate by step as accepted, and what the pipeline has
    # reserved against the spend caps (the estimate, plus any top-up a costlier fallback needed).
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    reserved_usd: Mapped[Decimal] = mapped_column(MONEY, default=Decimal(0), server_default="0")
    no_cache: Mapped[bool] = mapped_column(default=False, server_default=false())  # the request's no_cache
    promoted_from: Mapped[str | None] = mapped_column(String(40))  # the draft this pipeline renders again
    batch_window: Mapped[str | None] = mapped_column(String(16))  # "HH:MM-HH:MM" (UTC): runs only inside it

    steps: Mapped[list[Step]] = relationship(back_populates="pipeline", order_by="Step.position", lazy="select")


class Step(Base):
    __tablename__ = "steps"
    __table_args__ = (
        UniqueConstraint("pipeline_id", "position"),
        Index("ix_steps_status_updated", "status", "updated_at"),
        Index("ix_steps_kind_status_deadline", "kind", "status", "deadline_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    pipeline_id: Mapped[str] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str | None] = mapped_column(String(64))
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # A copy step's deadline: when the provider's result link expires. Copies run earliest first.
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A running step's lease: the worker that runs it renews ``lease_until`` while it works; once it
    # lapses (the worker died) the sweeper queues the step again.
    lease_owner: Mapped[str | None] = mapped_column(String(120))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A step queued for a retry waits until then (backoff with jitter); no worker runs it sooner.
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)

    pipeline: Mapped[Pipeline] = relationship(back_populates="steps", lazy="joined", innerjoin=True)


class ProviderJob(Base):
    """One paid job at the provider. The row exists (status ``intent``) before the submit call;
    its ``task_id`` is committed as soon as the provider answers, before anything else."""

    __tablename__ = "provider_jobs"
    # The status only: an index holding next_poll_at would make every poll answer's update write
    # all five indexes again (no HOT update); see migration 0004.
    __table_args__ = (Index("ix_provider_jobs_status", "status"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    step_id: Mapped[str] = mapped_column(ForeignKey("steps.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(120), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    progress: Mapped[int] = mapped_column(Integer, default=0)
    estimated_time_s: Mapped[int | None] = mapped_column(Integer)
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    polls: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    units: Mapped[float] = mapped_column(default=0.0)
    cost_usd: Mapped[Decimal] = mapped_column(MONEY, default=Decimal(0))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class StoredObject(Base):
    __tablename__ = "stored_objects"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    pipeline_id: Mapped[str] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"), index=True)
    step_id: Mapped[str] = mapped_column(ForeignKey("steps.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # video | image
    key: Mapped[str] = mapped_column(String(512), unique=True)
    location: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(100))
    source_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ProviderCall(Base):
    """The audit log: one row per call to the provider, whatever its outcome."""

    __tablename__ = "provider_calls"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    user_id: Mapped[str | None] = mapped_column(String(128))
    feature: Mapped[str | None] = mapped_column(String(64))
    pipeline_id: Mapped[str | None] = mapped_column(String(40), index=True)
    step_id: Mapped[str | None] = mapped_column(String(40))
    operation: Mapped[str] = mapped_column(String(16))  # chat | submit | poll
    model: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column(default=0.0)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    units: Mapped[float | None] = mapped_column()
    cost_usd: Mapped[Decimal] = mapped_column(MONEY, default=Decimal(0))
    # The call's outcome is unknown (it timed out after it was sent): ``cost_usd`` is an estimate.
    cost_estimated: Mapped[bool] = mapped_column(default=False, server_default=false())
    cache_hit: Mapped[bool] = mapped_column(default=False, server_default=false())  # answered from the cache


class SpendCap(Base):
    """One cap's ledger for one subject and one period: what is reserved and what is spent against
    the limit, in whole micro-dollars (exact sums on SQLite too, whose numerics are floats).
    ``reserved + spent`` never passes the limit by a reservation (every reservation is one
    conditional UPDATE of this row); see ``pipelines/spend.py``."""

    __tablename__ = "spend_caps"

    id: Mapped[str] = mapped_column(String(300), primary_key=True)  # scope|subject|period|period_start
    scope: Mapped[str] = mapped_column(String(16))  # global | user | feature
    subject: Mapped[str] = mapped_column(String(128))  # the user id or feature; "*" for global
    period: Mapped[str] = mapped_column(String(8))  # day | month
    period_start: Mapped[str] = mapped_column(String(10))  # ISO date (UTC) the period began
    limit_micros: Mapped[int] = mapped_column(BigInteger)
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    spent_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    alerted_pct: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # highest alert sent
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SpendHold(Base):
    """What one pipeline still holds reserved against one cap's ledger row."""

    __tablename__ = "spend_holds"

    pipeline_id: Mapped[str] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"), primary_key=True)
    cap_id: Mapped[str] = mapped_column(ForeignKey("spend_caps.id"), primary_key=True)
    held_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class CopyCacheEntry(Base):
    """A copy-step answer kept for reuse (the database backend of ``pipelines/cache.py``)."""

    __tablename__ = "copy_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of model, messages, parameters
    model: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SharedEntry(Base):
    """Shared state (pause, alerts, rate limit, breakers) where Redis is not the broker: every process
    that uses this database sees the same values (``provider/shared_state.py``)."""

    __tablename__ = "shared_state"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[float] = mapped_column(Float)  # epoch seconds


class CallbackDelivery(Base):
    """One webhook genline owes someone: a pipeline's end to its ``callback_url``, or an alert to the
    operators' URL (``GENLINE_ALERT_WEBHOOK_URL``), with its tries so far (``pipelines/callbacks.py``).
    ``webhook_id`` is the ``webhook-id`` header, the same on every try; ``payload`` is the JSON body,
    sent as compact, key-sorted JSON so every try signs the same bytes. Neither the secret nor a
    signature is ever stored."""

    __tablename__ = "callback_deliveries"
    __table_args__ = (Index("ix_callback_deliveries_due", "state", "next_try_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # whd_...
    webhook_id: Mapped[str] = mapped_column(String(80), unique=True)  # msg_...: the receiver's idempotency key
    kind: Mapped[str] = mapped_column(String(16))  # pipeline_ended | alert
    pipeline_id: Mapped[str | None] = mapped_column(
        ForeignKey("pipelines.id", ondelete="CASCADE"), index=True
    )  # None for an alert
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(64))  # pipeline.ended, alert.provider_paused, ...
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # None once delivered or failed
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(300))  # a plain sentence, never the URL or a secret
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# Spend caps that reached their limit lately: what the alert deliveries look for (migration 0008).
Index(
    "ix_spend_caps_reached",
    SpendCap.updated_at,
    postgresql_where=SpendCap.alerted_pct >= 100,
    sqlite_where=SpendCap.alerted_pct >= 100,
)


class AuditDailyTotal(Base):
    """What audit rows (``provider_calls``) deleted by retention added up to, one row per UTC day,
    feature, model, operation and error code (``""`` where the call had none), so ``genline report``
    keeps the spend and counts of periods whose rows are gone (``pipelines/retention.py``). Money in
    whole micro-dollars (exact on SQLite too); latency as a sum, with ``requests`` its count."""

    __tablename__ = "audit_daily_totals"

    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # ISO date (UTC) of the calls
    feature: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    operation: Mapped[str] = mapped_column(String(16), primary_key=True)
    error_code: Mapped[str] = mapped_column(String(64), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_limited: Mapped[int] = mapped_column(BigInteger, default=0)  # HTTP 429 or provider_rate_limited
    cache_hits: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    estimated_cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)  # of it, from cost_estimated calls
    latency_ms_sum: Mapped[float] = mapped_column(Float, default=0.0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    units: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
