"""Spend caps that hold under concurrency: reserve at acceptance, accrue as costs are booked,
release what was not spent when the pipeline ends.

A cap in the catalog (``config/catalog.py`` ``Cap``) becomes one ledger row per subject and period
(``spend_caps``: the user, the feature, or ``*`` for global; the day or month it applies to, UTC).
Every reservation is ONE conditional UPDATE of that row::

    UPDATE spend_caps SET reserved_micros = reserved_micros + :amount
     WHERE id = :id AND reserved_micros + spent_micros + :amount <= :limit

so two submits can never both see headroom that only one of them fits in: the row lock the UPDATE
takes (PostgreSQL) or the write transaction (SQLite's ``BEGIN IMMEDIATE``) orders them, and the
second re-checks the condition against the first's result. A check followed by a later increment
is the race that lets a budget be overshot; there is none here. The rows of one acceptance are
updated in the order of their ids, so two acceptances never wait on each other in a cycle. Ledger
amounts are whole micro-dollars: exact on SQLite too, whose numerics are floats (50 reservations
of $0.171234 must fit a $8.5617 cap exactly). A reservation is rounded up to the micro-dollar.

What a pipeline reserved is kept per ledger row in ``spend_holds``. As each call's cost is booked
(``accrue``, called by the audit writer, in the transaction that writes the audit row) it moves from
reserved to spent on every row the pipeline holds; the pipeline's ``cost_usd`` grows with it. When
the pipeline ends (succeeded, failed, cancelled), ``release`` gives back what it still holds. A cost
booked after that (a job the provider could not stop) is added to spent: spent is what was billed.

The gateway's ``SpendGuard`` stage refuses a paid call that the pipeline's reservation cannot cover
(what it has spent, plus jobs still rendering, plus this call's most) unless the caps have headroom
for a top-up: a costlier fallback model may go on; a runaway retry loop stops at the cap.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import Any, cast

from sqlalchemy import Connection, Exists, Table, bindparam, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from genline.config.catalog import Cap, Catalog
from genline.config.clock import utcnow
from genline.config.constants import JobStatus
from genline.config.errors import GenlineError, SpendCapExceeded
from genline.config.logging import get_logger
from genline.provider.gateway import CallContext, CallRecord
from genline.provider.metrics import observe_cap_alert
from genline.storage.db import Database
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, SpendCap, SpendHold, Step

log = get_logger("genline.spend")
CAPS = cast(Table, SpendCap.__table__)
HOLDS = cast(Table, SpendHold.__table__)
PIPELINES = cast(Table, Pipeline.__table__)
CALLS = cast(Table, ProviderCall.__table__)
JOBS = cast(Table, ProviderJob.__table__)
STEPS = cast(Table, Step.__table__)
ALERT_AT = (50, 80, 100)  # per cent of a cap: a log event (alert=True) the first time each is crossed
PAID = ("chat", "submit")
_CENT = Decimal("0.01")
_MICRO = Decimal("0.000001")


def micros(usd: Decimal, rounding: str = ROUND_CEILING) -> int:
    """Dollars as whole micro-dollars (a reservation rounds up: never less than the estimate)."""
    return int((usd / _MICRO).to_integral_value(rounding=rounding))


def dollars(value: Any) -> Decimal:
    return Decimal(int(value or 0)) * _MICRO


@dataclass(frozen=True)
class Ledger:
    """One cap as it applies to one request: the ledger row it reserves against."""

    cap: Cap
    subject: str
    period_start: str

    @property
    def id(self) -> str:
        return f"{self.cap.scope}|{self.subject}|{self.cap.period}|{self.period_start}"


def period_start(period: str, now: datetime) -> str:
    """The first day (UTC, ISO) of the day or month ``now`` falls in."""
    day = now.date()
    return (day if period == "day" else day.replace(day=1)).isoformat()


def ledgers_for(catalog: Catalog, user_id: str, feature: str, now: datetime | None = None) -> list[Ledger]:
    """Every cap that applies to a request of ``user_id`` for ``feature``, in ledger-id order."""
    if not catalog.caps:
        return []  # the shipped catalog has none: a submit then writes no ledger at all
    now = now or utcnow()
    found = {
        ledger.id: ledger
        for ledger in (
            Ledger(cap, cap.subject(user_id, feature), period_start(cap.period, now))
            for cap in catalog.caps
            if cap.applies(user_id, feature)
        )
    }
    return [found[key] for key in sorted(found)]


def _money(value: Any) -> Decimal:
    return Decimal(str(value or 0))


def _usd(value: Decimal) -> str:
    return f"${value.quantize(_CENT) if value >= _CENT or value == 0 else value:,}"


_RESERVE = (
    update(CAPS)
    .where(
        CAPS.c.id == bindparam("b_id"),
        CAPS.c.reserved_micros + CAPS.c.spent_micros + bindparam("b_amount") <= bindparam("b_limit"),
    )
    .values(
        reserved_micros=CAPS.c.reserved_micros + bindparam("b_amount"),
        limit_micros=bindparam("b_limit"),  # the catalog's limit now, should the operator have changed it
        updated_at=bindparam("b_now"),
    )
)


def _ensure_rows(conn: Connection, ledgers: Sequence[Ledger], now: datetime) -> None:
    rows = [
        {
            "id": ledger.id,
            "scope": ledger.cap.scope,
            "subject": ledger.subject,
            "period": ledger.cap.period,
            "period_start": ledger.period_start,
            "limit_micros": micros(ledger.cap.limit_usd),
            "reserved_micros": 0,
            "spent_micros": 0,
            "alerted_pct": 0,
            "updated_at": now,
        }
        for ledger in ledgers
    ]
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(CAPS)
    for row in rows:  # one at a time, in id order: the same order every acceptance locks them in
        conn.execute(insert.on_conflict_do_nothing(index_elements=[CAPS.c.id]), row)


def refusal(ledger: Ledger, row: Any, amount: Decimal) -> SpendCapExceeded:
    """The sentence a refused reservation answers with: which cap, and its headroom."""
    used = dollars(row.reserved_micros + row.spent_micros) if row is not None else Decimal(0)
    headroom = max(Decimal(0), ledger.cap.limit_usd - used)
    period = "today" if ledger.cap.period == "day" else "this month"
    field = {"user": "user_id", "feature": "feature"}.get(ledger.cap.scope)
    return SpendCapExceeded(
        f"This pipeline would cross {ledger.cap.describe()}: it is estimated at {_usd(amount)}, and "
        f"{_usd(headroom)} of the cap is left {period} ({_usd(used)} spent or reserved).",
        field=field,
    )


def check_headroom(conn: Connection, ledgers: Sequence[Ledger], amount: Decimal) -> None:
    """A read, not a reservation: refuse now what ``reserve`` would refuse (before a submit stores
    the photo). Concurrent submits may still be refused by ``reserve``; none gets past it."""
    rows = {row.id: row for row in conn.execute(select(CAPS).where(CAPS.c.id.in_([x.id for x in ledgers])))}
    for ledger in ledgers:
        row = rows.get(ledger.id)
        used = row.reserved_micros + row.spent_micros if row is not None else 0
        if used + micros(amount) > micros(ledger.cap.limit_usd):
            raise refusal(ledger, row, amount)


def reserve(conn: Connection, ledgers: Sequence[Ledger], pipeline_id: str, amount: Decimal) -> list[str]:
    """Reserve ``amount`` against every ledger, in the caller's transaction, or raise
    ``SpendCapExceeded`` naming the first cap it would cross (the caller rolls back, so nothing
    is reserved). Returns the alerts to log once the transaction has committed."""
    if not ledgers:
        return []
    now = utcnow()
    _ensure_rows(conn, ledgers, now)
    for ledger in ledgers:
        done = conn.execute(
            _RESERVE,
            {"b_id": ledger.id, "b_amount": micros(amount), "b_limit": micros(ledger.cap.limit_usd), "b_now": now},
        )
        if done.rowcount != 1:
            row = conn.execute(select(CAPS).where(CAPS.c.id == ledger.id)).first()
            raise refusal(ledger, row, amount)
    conn.execute(
        HOLDS.insert(),
        [{"pipeline_id": pipeline_id, "cap_id": ledger.id, "held_micros": micros(amount)} for ledger in ledgers],
    )
    return _crossed(conn, [ledger.id for ledger in ledgers])


def _crossed(conn: Connection, cap_ids: Sequence[str]) -> list[str]:
    """Mark and return the alert thresholds the caps just crossed (each is announced once a period)."""
    alerts: list[str] = []
    for row in conn.execute(select(CAPS).where(CAPS.c.id.in_(list(cap_ids)))):
        if row.limit_micros <= 0:
            continue
        pct = (row.reserved_micros + row.spent_micros) * 100 / row.limit_micros
        reached = [level for level in ALERT_AT if pct >= level and level > row.alerted_pct]
        if reached:
            conn.execute(update(CAPS).where(CAPS.c.id == row.id).values(alerted_pct=max(reached)))
            alerts.append(f"{row.id}|{max(reached)}")
    return alerts


def announce(alerts: Iterable[str]) -> None:
    """Log each crossed threshold (after the commit that crossed it)."""
    for alert in alerts:
        scope, subject, period, start, pct = alert.split("|")
        log.warning(
            "spend_cap_alert",
            alert=True,
            scope=scope,
            subject=subject if scope != "user" else None,  # a user id is not for operators' logs
            period=period,
            period_start=start,
            percent=int(pct),
        )
        observe_cap_alert(scope, period, int(pct))  # genline_spend_cap_alerts_total (provider/metrics.py)


_ACCRUE = (
    update(PIPELINES)
    .where(PIPELINES.c.id == bindparam("b_id"))
    .values(cost_usd=PIPELINES.c.cost_usd + bindparam("b_cost"), updated_at=bindparam("b_now"))
)


def holds_any(pipeline_param: str) -> Exists:
    """Whether the pipeline bound to ``pipeline_param`` holds anything on a cap, for a RETURNING
    clause: its holds are written in the transaction that creates it (a submit) or that locks
    its row while it is failed and nothing of it is in flight (a retry), so an UPDATE of that
    row's snapshot sees every hold the pipeline has when a call of it is booked or it ends."""
    return exists().where(HOLDS.c.pipeline_id == bindparam(pipeline_param))


_ACCRUE_PG = _ACCRUE.returning(holds_any("b_id"))


def accrue(conn: Connection, records: Iterable[CallRecord]) -> None:
    """Book the records' costs: each pipeline's ``cost_usd`` grows, and what it holds moves from
    reserved to spent on every cap row it holds (in the audit writer's transaction). On
    PostgreSQL the pipeline's UPDATE also says whether it holds anything, so a pipeline no cap
    applies to costs one statement here, not two."""
    costs: dict[str, Decimal] = defaultdict(Decimal)
    for record in records:
        if record.cost_usd and record.ctx.pipeline_id:
            costs[record.ctx.pipeline_id] += record.cost_usd
    # (the pipeline's cost_usd in dollars; the ledger's share in micro-dollars, rounded to nearest)
    if not costs:
        return
    now = utcnow()
    postgres = conn.dialect.name == "postgresql"
    for pipeline_id in sorted(costs):
        cost = costs[pipeline_id]
        params = {"b_id": pipeline_id, "b_cost": cost, "b_now": now}
        if postgres:  # with the pipeline's row, whether it holds anything: most hold nothing (no cap applies)
            if not conn.execute(_ACCRUE_PG, params).scalar():
                continue
        else:
            conn.execute(_ACCRUE, params)
        held = select(HOLDS).where(HOLDS.c.pipeline_id == pipeline_id).order_by(HOLDS.c.cap_id)
        if postgres:
            held = held.with_for_update()
        rows = conn.execute(held).all()
        spent = micros(cost, ROUND_HALF_EVEN)
        for hold in rows:
            take = min(spent, hold.held_micros)
            if take:
                conn.execute(
                    update(HOLDS)
                    .where(HOLDS.c.pipeline_id == pipeline_id, HOLDS.c.cap_id == hold.cap_id)
                    .values(held_micros=HOLDS.c.held_micros - take)
                )
            conn.execute(
                update(CAPS)
                .where(CAPS.c.id == hold.cap_id)
                .values(
                    reserved_micros=CAPS.c.reserved_micros - take,
                    spent_micros=CAPS.c.spent_micros + spent,
                    updated_at=now,
                )
            )
        if rows:
            announce(_crossed(conn, [hold.cap_id for hold in rows]))


def reconcile(conn: Connection, records: Iterable[CallRecord]) -> None:
    """A chat whose answer was lost was booked at its most, marked estimated (``Gateway.chat``).
    When the same request (the same step and model: a step's messages are fixed) is answered, that
    answer's usage is the truth for the lost one too: the estimated rows take its tokens and cost,
    and the pipeline's cost and its caps' spent move by the difference (once: a second answer
    changes nothing). Rows stay marked estimated: the provider never answered them.
    Only an answer marked ``retried`` (a step's later attempt, or a try after a lost one) can
    have one to correct: a first try's answer costs no lookup."""
    for record in records:
        if not record.ctx.retried:
            continue
        if (
            record.operation != "chat"
            or record.error_code is not None
            or record.cache_hit
            or record.ctx.step_id is None
            or record.prompt_tokens is None
        ):
            continue
        lost = conn.execute(
            select(CALLS.c.id, CALLS.c.cost_usd).where(
                CALLS.c.pipeline_id == record.ctx.pipeline_id,  # indexed
                CALLS.c.step_id == record.ctx.step_id,
                CALLS.c.model == record.ctx.model,
                CALLS.c.operation == "chat",
                CALLS.c.cost_estimated.is_(True),
            )
        ).all()
        for row in lost:
            delta = record.cost_usd - _money(row.cost_usd)
            conn.execute(
                update(CALLS)
                .where(CALLS.c.id == row.id)
                .values(
                    prompt_tokens=record.prompt_tokens,
                    completion_tokens=record.completion_tokens,
                    cost_usd=record.cost_usd,
                )
            )
            if delta and record.ctx.pipeline_id:
                _adjust(conn, record.ctx.pipeline_id, delta)


def _adjust(conn: Connection, pipeline_id: str, delta: Decimal) -> None:
    """A booked cost corrected by ``delta`` (either sign): the pipeline's cost and its caps' spent."""
    conn.execute(update(PIPELINES).where(PIPELINES.c.id == pipeline_id).values(cost_usd=PIPELINES.c.cost_usd + delta))
    cap_ids = select(HOLDS.c.cap_id).where(HOLDS.c.pipeline_id == pipeline_id).scalar_subquery()
    conn.execute(
        update(CAPS)
        .where(CAPS.c.id.in_(cap_ids))
        .values(spent_micros=CAPS.c.spent_micros + micros(delta, ROUND_HALF_EVEN))
    )


def release(conn: Connection, pipeline_id: str) -> None:
    """The pipeline has ended: give back what it still holds on every cap row."""
    held = select(HOLDS).where(HOLDS.c.pipeline_id == pipeline_id, HOLDS.c.held_micros > 0).order_by(HOLDS.c.cap_id)
    if conn.dialect.name == "postgresql":
        held = held.with_for_update()
    now = utcnow()
    for hold in conn.execute(held).all():
        conn.execute(
            update(CAPS)
            .where(CAPS.c.id == hold.cap_id)
            .values(reserved_micros=CAPS.c.reserved_micros - hold.held_micros, updated_at=now)
        )
        conn.execute(
            update(HOLDS).where(HOLDS.c.pipeline_id == pipeline_id, HOLDS.c.cap_id == hold.cap_id).values(held_micros=0)
        )


# --- the gateway's budget stage -----------------------------------------------------------------
# Jobs that may still cost: rendering, or submitted with an outcome never learned (maybe billed).
_LIVE_JOBS = (JobStatus.INTENT, JobStatus.PENDING, JobStatus.PROCESSING, JobStatus.UNKNOWN)


class SpendGuard:
    """The budget stage: first in the gateway's order. A paid call goes on only if the pipeline's
    reservation covers what it has spent, what its jobs still rendering will cost, and the most this
    call can cost; if not, the difference is reserved against the pipeline's caps (the same
    conditional UPDATE as at acceptance), or the call is refused with ``spend_cap_exceeded``.
    With no caps in the catalog it does nothing (one short transaction per paid call otherwise)."""

    def __init__(self, db: Database, catalog: Catalog, held: Any = None) -> None:
        self.db = db
        self.catalog = catalog
        self._held = held  # () -> records held by the running step, not yet in the database

    def before(self, ctx: CallContext, operation: str) -> None:
        if operation not in PAID or ctx.pipeline_id is None or not ctx.cost_bound_usd or not self.catalog.caps:
            return  # with no cap there is nothing to cross: no transaction of its own on the step's path
        pending = sum(
            (r.cost_usd for r in (self._held() if self._held else []) if r.ctx.pipeline_id == ctx.pipeline_id),
            Decimal(0),
        )
        alerts: list[str] = []
        with self.db.engine.begin() as conn:
            query = select(PIPELINES.c.reserved_usd).where(PIPELINES.c.id == ctx.pipeline_id)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            reserved = conn.execute(query).scalar()
            if reserved is None:
                return  # not a pipeline of this database (a test's bare call): nothing to guard
            committed = self._committed(conn, ctx.pipeline_id, ctx.step_id, batch=ctx.batch)
            need = committed + pending + ctx.cost_bound_usd - _money(reserved)
            if micros(need, ROUND_HALF_EVEN) <= 0:  # covered (to the micro-dollar: SQLite sums are floats)
                return
            alerts = self._top_up(conn, ctx.pipeline_id, need)
        announce(alerts)

    def _committed(self, conn: Connection, pipeline_id: str, step_id: str | None, *, batch: bool) -> Decimal:
        """Spent (audit rows) plus the most the pipeline's unfinished provider jobs can still cost;
        the calling step's own intent is the submit being checked, so it is not counted twice."""
        spent = _money(
            conn.execute(
                select(func.coalesce(func.sum(CALLS.c.cost_usd), 0)).where(CALLS.c.pipeline_id == pipeline_id)
            ).scalar()
        )
        live = conn.execute(
            select(JOBS.c.model, JOBS.c.units)
            .join(STEPS, STEPS.c.id == JOBS.c.step_id)
            .where(
                STEPS.c.pipeline_id == pipeline_id,
                JOBS.c.status.in_([str(s) for s in _LIVE_JOBS]),
                ~((JOBS.c.step_id == (step_id or "")) & (JOBS.c.status == JobStatus.INTENT.value)),
            )
        ).all()
        rendering = Decimal(0)
        for job in live:
            if job.model in self.catalog.models and job.units:
                rendering += self.catalog.model(job.model).media_cost(job.units, batch=batch)
        return spent + rendering

    def _top_up(self, conn: Connection, pipeline_id: str, need: Decimal) -> list[str]:
        holds = conn.execute(select(HOLDS).where(HOLDS.c.pipeline_id == pipeline_id).order_by(HOLDS.c.cap_id)).all()
        now = utcnow()
        for hold in holds:
            ledger = _ledger_of(self.catalog, hold.cap_id)
            limit = ledger.cap.limit_usd if ledger is not None else None
            row = conn.execute(select(CAPS).where(CAPS.c.id == hold.cap_id)).first()
            if row is None:
                continue
            done = conn.execute(
                _RESERVE,
                {
                    "b_id": hold.cap_id,
                    "b_amount": micros(need),
                    "b_limit": micros(limit) if limit is not None else row.limit_micros,
                    "b_now": now,
                },
            )
            if done.rowcount != 1:
                log.warning("spend_cap_stopped_call", pipeline_id=pipeline_id, cap=hold.cap_id.split("|")[0])
                stand_in = ledger or Ledger(
                    Cap(row.scope, row.subject, row.period, dollars(row.limit_micros)), row.subject, row.period_start
                )
                raise refusal(stand_in, row, need)
            conn.execute(
                update(HOLDS)
                .where(HOLDS.c.pipeline_id == pipeline_id, HOLDS.c.cap_id == hold.cap_id)
                .values(held_micros=HOLDS.c.held_micros + micros(need))
            )
        conn.execute(
            update(PIPELINES).where(PIPELINES.c.id == pipeline_id).values(reserved_usd=PIPELINES.c.reserved_usd + need)
        )
        return _crossed(conn, [hold.cap_id for hold in holds]) if holds else []

    def after(self, record: CallRecord, error: GenlineError | None) -> None:
        return None


def _ledger_of(catalog: Catalog, cap_id: str) -> Ledger | None:
    """The catalog's cap a ledger row belongs to now (None if the cap has been removed)."""
    scope, subject, period, start = cap_id.split("|", 3)
    for cap in catalog.caps:
        if cap.scope == scope and cap.period == period and cap.match in ("*", subject):
            return Ledger(cap, subject, start)
    return None


# --- what ``genline caps`` shows ---------------------------------------------------------------
def cap_report(db: Database, catalog: Catalog, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each cap of the catalog, and each ledger row of the current period: limit, spent, reserved
    and headroom. A cap no request has touched this period is shown once, with nothing used."""
    now = now or utcnow()
    out: list[dict[str, Any]] = []
    with db.engine.connect() as conn:
        for cap in catalog.caps:
            start = period_start(cap.period, now)
            query = select(CAPS).where(
                CAPS.c.scope == cap.scope, CAPS.c.period == cap.period, CAPS.c.period_start == start
            )
            if cap.match != "*":
                query = query.where(CAPS.c.subject == cap.match)
            rows = conn.execute(query.order_by(CAPS.c.subject)).all()
            if not rows:
                subject = "*" if cap.match == "*" else cap.match
                out.append(_cap_line(cap, subject, start, Decimal(0), Decimal(0), untouched=True))
            for row in rows:
                out.append(_cap_line(cap, row.subject, start, dollars(row.spent_micros), dollars(row.reserved_micros)))
    return out


def _cap_line(
    cap: Cap, subject: str, start: str, spent: Decimal, reserved: Decimal, *, untouched: bool = False
) -> dict[str, Any]:
    headroom = max(Decimal(0), cap.limit_usd - spent - reserved)
    return {
        "scope": cap.scope,
        "match": cap.match,
        "subject": subject,
        "period": cap.period,
        "period_start": start,
        "limit_usd": str(cap.limit_usd),
        "spent_usd": str(spent),
        "reserved_usd": str(reserved),
        "headroom_usd": str(headroom),
        "used_pct": round(float((spent + reserved) * 100 / cap.limit_usd), 1) if cap.limit_usd else 0.0,
        "untouched": untouched,
        "describe": cap.describe(),
    }
