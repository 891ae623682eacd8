"""``genline report``: the health of each feature and model over a period, beside the guide's targets.

Every figure comes from genline's own rows (``storage/models.py``), bounded by the period:

- the audit log (``provider_calls``, ``ts`` in the period): requests by operation, latency
  percentiles by operation, errors by class (the error code), cache hits (chat calls answered from
  the copy cache), rate-limit hits (HTTP 429 or ``provider_rate_limited``) and spend;
- the daily totals retention leaves of the audit rows it deletes (``audit_daily_totals``, read by
  ``report_totals.py``), added to the same figures. A rolled-up call counts as made at the start
  (00:00 UTC) of its day: a day counts when its start lies in the period (``rolled_up_days``).
  Sums cannot give percentiles, so latency percentiles cover the stored audit rows only
  (``from_daily_totals`` says how many calls they leave out); the mean latency covers both;
- pipelines created in the period, by status;
- steps that finished in the period: how long each kind took, started to finished, and how many failed;
- image renders (``provider_jobs`` of kind image completed in the period): submitted to completed
  (the provider's completion time; at least zero);
- copies at risk, as of now: store steps queued or running whose link expires within
  ``GENLINE_COPY_RISK_MARGIN_S``.

Counts and sums are SQL aggregates (the same statements on SQLite and PostgreSQL). Percentiles are
computed here over the latencies the period selects (nearest rank: the value at rank ceil(p/100 * n)
of the sorted values, so every percentile is a latency that was observed); one code path on both
databases. Each figure the guide sets a target for is checked against it (``checks``): ``ok`` is
True inside the target, False outside it (flagged), None when there was nothing to measure.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, and_, case, func, or_, select

from genline.config.clock import utcnow
from genline.config.constants import JobStatus, StepKind, StepStatus
from genline.config.errors import ValidationError
from genline.config.settings import Settings
from genline.pipelines import report_totals
from genline.storage.db import Database
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, Step

CALLS = cast(Table, ProviderCall.__table__)
PIPELINES = cast(Table, Pipeline.__table__)
STEPS = cast(Table, Step.__table__)
JOBS = cast(Table, ProviderJob.__table__)
RATE_LIMITED_CODE = "provider_rate_limited"
PERCENTILES = (50, 95, 99)
_MICRO = Decimal("0.000001")


@dataclass(frozen=True)
class Target:
    """One of the guide's health targets (APIMART.md, "Guide's health targets per feature")."""

    name: str
    op: str  # "<" or ">"
    limit: float
    unit: str
    describe: str

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value < self.limit if self.op == "<" else value > self.limit


TARGETS = (
    Target("text_p95_s", "<", 3.0, "s", "p95 latency of text (chat) calls under 3 s"),
    Target("error_rate", "<", 0.001, "ratio", "errors under 0.1% of requests"),
    Target("cache_hit_rate", ">", 0.40, "ratio", "cache hits over 40% of text (chat) calls"),
    Target("rate_limit_rate", "<", 0.01, "ratio", "rate-limit hits under 1% of requests"),
    Target("image_render_p95_s", "<", 20.0, "s", "a completed image render under 20 s (p95 of renders)"),
)
_TARGETS = {t.name: t for t in TARGETS}


# --- the period --------------------------------------------------------------------------------
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: datetime, *, name: str) -> datetime:
    """A point in time as an operator writes it: ISO 8601 (a date, or a date and time; UTC when it
    names no zone), ``now``, or a span before now (``90m``, ``24h``, ``7d``, ``2w``)."""
    value = text.strip()
    if value == "now":
        return now
    relative = _RELATIVE.match(value)
    if relative:
        return now - timedelta(seconds=float(relative.group(1)) * _UNIT_S[relative.group(2)])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"--{name} must be an ISO 8601 date or time (2025-06-01, 2025-06-01T08:00Z), 'now', or a span "
            f"before now such as 90m, 24h or 7d (got {value[:40]!r}).",
            code=f"{name}_invalid",
            field=name,
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def period_of(since: str | None, until: str | None, now: datetime | None = None) -> tuple[datetime, datetime]:
    """``[since, until)``; by default the last 24 hours."""
    now = now or utcnow()
    end = parse_when(until, now, name="until") if until else now
    start = parse_when(since, now, name="since") if since else end - timedelta(hours=24)
    if start >= end:
        raise ValidationError("--since must come before --until.", code="period_invalid", field="since")
    return start, end


# --- small arithmetic ----------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest rank: the value at rank ceil(p/100 * n) of the sorted values (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float], digits: int = 1) -> dict[str, Any]:
    """Count and the report's percentiles of ``values``."""
    out: dict[str, Any] = {"count": len(values)}
    for p in PERCENTILES:
        found = percentile(values, p)
        out[f"p{p}"] = None if found is None else round(found, digits)
    return out


def ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole, 6)


def usd(value: Any) -> Decimal:
    """A sum of money from either database as exact dollars to the micro-dollar."""
    return Decimal(str(value or 0)).quantize(_MICRO)


def usd_of_micros(micros: Any) -> Decimal:
    return (Decimal(int(micros or 0)) * _MICRO).quantize(_MICRO)


# --- the rows ----------------------------------------------------------------------------------
_is_error = case((CALLS.c.error_code.is_not(None), 1), else_=0)
_is_limited = case(
    (or_(CALLS.c.status_code == 429, CALLS.c.error_code == RATE_LIMITED_CODE), 1),
    else_=0,
)
_is_hit = case((CALLS.c.cache_hit.is_(True), 1), else_=0)
_estimated_cost = case((CALLS.c.cost_estimated.is_(True), CALLS.c.cost_usd), else_=0)


@dataclass
class Tally:
    """The audit log's sums for one slice (a feature, a model): added up from SQL's groups."""

    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    chat_calls: int = 0
    cache_hits: int = 0
    spend: Decimal = Decimal(0)
    spend_estimated: Decimal = Decimal(0)
    rolled_up: int = 0  # of ``requests``, those counted from audit_daily_totals

    def __post_init__(self) -> None:
        self.by_operation: dict[str, int] = defaultdict(int)
        self.error_classes: dict[str, int] = defaultdict(int)
        self.latencies: dict[str, list[float]] = defaultdict(list)  # stored audit rows only
        self.rolled_up_by_operation: dict[str, int] = defaultdict(int)
        self.rolled_up_latency_ms: dict[str, float] = defaultdict(float)  # a sum: no percentiles

    def add_rolled_up(self, row: Any) -> None:
        """One ``audit_daily_totals`` row: a day's calls of one feature, model, operation and error."""
        n, op = int(row.requests or 0), row.operation
        self.requests += n
        self.by_operation[op] += n
        self.rolled_up += n
        self.rolled_up_by_operation[op] += n
        self.rolled_up_latency_ms[op] += float(row.latency_ms_sum or 0.0)
        if row.error_code:
            self.errors += n
            self.error_classes[row.error_code] += n
        self.rate_limited += int(row.rate_limited or 0)
        if op == "chat":
            self.chat_calls += n
            self.cache_hits += int(row.cache_hits or 0)
        self.spend += usd_of_micros(row.cost_micros)
        self.spend_estimated += usd_of_micros(row.estimated_cost_micros)


def _in_period(column: Any, start: datetime, end: datetime) -> Any:
    return and_(column >= start, column < end)


def _tallies(
    conn: Any, start: datetime, end: datetime, feature: str | None, model: str | None, rolled: Iterable[Any]
) -> tuple[dict[str, Tally], dict[str, Tally]]:
    """The audit log's figures per feature and per model, from GROUP BY statements, and the
    latencies (one column) for the percentiles; plus the daily totals of rolled-up days."""
    where = [_in_period(CALLS.c.ts, start, end)]
    if feature is not None:
        where.append(CALLS.c.feature == feature)
    by_feature: dict[str, Tally] = defaultdict(Tally)
    by_model: dict[str, Tally] = defaultdict(Tally)

    def slices(f: str | None, m: str | None) -> list[Tally]:
        out = [by_feature[f or "(none)"]]
        if model is None or m == model:
            out.append(by_model[m or "(none)"])
        return out

    grouped = conn.execute(
        select(
            CALLS.c.feature,
            CALLS.c.model,
            CALLS.c.operation,
            func.count().label("n"),
            func.sum(_is_error).label("errors"),
            func.sum(_is_limited).label("limited"),
            func.sum(_is_hit).label("hits"),
            func.coalesce(func.sum(CALLS.c.cost_usd), 0).label("cost"),
            func.coalesce(func.sum(_estimated_cost), 0).label("estimated"),
        )
        .where(*where)
        .group_by(CALLS.c.feature, CALLS.c.model, CALLS.c.operation)
    ).all()
    for row in grouped:
        for t in slices(row.feature, row.model):
            t.requests += row.n
            t.by_operation[row.operation] += row.n
            t.errors += int(row.errors or 0)
            t.rate_limited += int(row.limited or 0)
            if row.operation == "chat":
                t.chat_calls += row.n
                t.cache_hits += int(row.hits or 0)
            t.spend += usd(row.cost)
            t.spend_estimated += usd(row.estimated)
    classes = conn.execute(
        select(CALLS.c.feature, CALLS.c.model, CALLS.c.error_code, func.count().label("n"))
        .where(*where, CALLS.c.error_code.is_not(None))
        .group_by(CALLS.c.feature, CALLS.c.model, CALLS.c.error_code)
    ).all()
    for row in classes:
        for t in slices(row.feature, row.model):
            t.error_classes[row.error_code] += row.n
    latencies = conn.execute(
        select(CALLS.c.feature, CALLS.c.model, CALLS.c.operation, CALLS.c.latency_ms).where(*where)
    )
    for row in latencies:
        for t in slices(row.feature, row.model):
            t.latencies[row.operation].append(float(row.latency_ms or 0.0))
    for row in rolled:
        for t in slices(row.feature or None, row.model or None):
            t.add_rolled_up(row)
    return by_feature, by_model


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def _steps(conn: Any, start: datetime, end: datetime, feature: str | None) -> dict[str, dict[str, Any]]:
    """Per feature, per step kind: the steps that finished in the period, and how long they ran."""
    query = (
        select(PIPELINES.c.feature, STEPS.c.kind, STEPS.c.status, STEPS.c.started_at, STEPS.c.finished_at)
        .join_from(STEPS, PIPELINES, PIPELINES.c.id == STEPS.c.pipeline_id)
        .where(_in_period(STEPS.c.finished_at, start, end))
    )
    if feature is not None:
        query = query.where(PIPELINES.c.feature == feature)
    found: dict[str, dict[str, dict[str, Any]]] = defaultdict(
        lambda: defaultdict(lambda: {"succeeded": 0, "failed": 0, "durations": []})
    )
    for row in conn.execute(query):
        slot = found[row.feature][row.kind]
        if row.status == StepStatus.SUCCEEDED:
            slot["succeeded"] += 1
            took = _seconds(_aware(row.started_at), _aware(row.finished_at))
            if took is not None:
                slot["durations"].append(took)
        elif row.status == StepStatus.FAILED:
            slot["failed"] += 1
    out: dict[str, dict[str, Any]] = {}
    for name, kinds in found.items():
        out[name] = {}
        for kind in [k.value for k in StepKind if k.value in kinds]:
            slot = kinds[kind]
            out[name][kind] = {
                "succeeded": slot["succeeded"],
                "failed": slot["failed"],
                "seconds": spread(slot["durations"], 3),
            }
    return out


def _aware(value: datetime | None) -> datetime | None:
    """Core rows (not the ORM's) come back naive from the UTC columns."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _renders(
    conn: Any, start: datetime, end: datetime, feature: str | None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Image renders completed in the period: seconds from submit to completion, per feature and model."""
    query = (
        select(PIPELINES.c.feature, JOBS.c.model, JOBS.c.submitted_at, JOBS.c.completed_at)
        .join_from(JOBS, STEPS, STEPS.c.id == JOBS.c.step_id)
        .join(PIPELINES, PIPELINES.c.id == STEPS.c.pipeline_id)
        .where(
            JOBS.c.kind == StepKind.IMAGE.value,
            JOBS.c.status == JobStatus.COMPLETED.value,
            JOBS.c.submitted_at.is_not(None),
            _in_period(JOBS.c.completed_at, start, end),
        )
    )
    if feature is not None:
        query = query.where(PIPELINES.c.feature == feature)
    by_feature: dict[str, list[float]] = defaultdict(list)
    by_model: dict[str, list[float]] = defaultdict(list)
    for row in conn.execute(query):
        took = _seconds(_aware(row.submitted_at), _aware(row.completed_at))
        if took is not None:
            # The completion time is the provider's (its clock, whole seconds): never below zero,
            # as the poller's own medians count it (workers/poller.py ``refresh_medians``).
            took = max(0.0, took)
            by_feature[row.feature].append(took)
            by_model[row.model].append(took)
    return by_feature, by_model


def _pipelines(conn: Any, start: datetime, end: datetime, feature: str | None) -> dict[str, dict[str, int]]:
    query = (
        select(PIPELINES.c.feature, PIPELINES.c.status, func.count().label("n"))
        .where(_in_period(PIPELINES.c.created_at, start, end))
        .group_by(PIPELINES.c.feature, PIPELINES.c.status)
    )
    if feature is not None:
        query = query.where(PIPELINES.c.feature == feature)
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for row in conn.execute(query):
        out[row.feature][row.status] = row.n
    return out


def copies_at_risk(conn: Any, now: datetime, margin_s: float, feature: str | None = None) -> dict[str, int]:
    """Store steps queued or running whose link expires within the margin, per feature (as of now)."""
    query = (
        select(PIPELINES.c.feature, func.count().label("n"))
        .join_from(STEPS, PIPELINES, PIPELINES.c.id == STEPS.c.pipeline_id)
        .where(
            STEPS.c.kind == StepKind.STORE.value,
            STEPS.c.status.in_([StepStatus.QUEUED.value, StepStatus.RUNNING.value]),
            STEPS.c.deadline_at < now + timedelta(seconds=margin_s),
        )
        .group_by(PIPELINES.c.feature)
    )
    if feature is not None:
        query = query.where(PIPELINES.c.feature == feature)
    return {row.feature: row.n for row in conn.execute(query)}


# --- the figures ---------------------------------------------------------------------------------
def _check(name: str, value: float | None) -> dict[str, Any]:
    target = _TARGETS[name]
    return {
        "figure": name,
        "value": value,
        "target": f"{target.op} {target.limit:g}{' s' if target.unit == 's' else ''}",
        "describe": target.describe,
        "ok": target.check(value),
    }


def _latency(t: Tally, op: str) -> dict[str, Any]:
    """Percentiles of the stored rows (``count``); the mean also over the calls of rolled-up days
    (``from_daily_totals``), from their latency sum."""
    stored = t.latencies.get(op, [])
    rolled = t.rolled_up_by_operation.get(op, 0)
    n = len(stored) + rolled
    mean = None if n == 0 else round((sum(stored) + t.rolled_up_latency_ms.get(op, 0.0)) / n, 1)
    return {**spread(stored), "from_daily_totals": rolled, "mean": mean}


def _call_figures(t: Tally, renders: Sequence[float]) -> dict[str, Any]:
    """What the audit log, its daily totals and the image renders say about one feature or model."""
    chat_p95 = percentile(t.latencies.get("chat", []), 95)
    render_p95 = percentile(renders, 95)
    return {
        "requests": {
            "total": t.requests,
            "by_operation": dict(sorted(t.by_operation.items())),
            "from_daily_totals": t.rolled_up,
        },
        "latency_ms": {op: _latency(t, op) for op in sorted(set(t.latencies) | set(t.rolled_up_by_operation))},
        "errors": {
            "total": t.errors,
            "rate": ratio(t.errors, t.requests),
            "by_class": dict(sorted(t.error_classes.items())),
        },
        "cache": {"chat_calls": t.chat_calls, "hits": t.cache_hits, "hit_rate": ratio(t.cache_hits, t.chat_calls)},
        "rate_limit": {"hits": t.rate_limited, "rate": ratio(t.rate_limited, t.requests)},
        "spend": {"usd": str(t.spend), "estimated_usd": str(t.spend_estimated)},
        "image_renders": {**spread(renders, 3), "over_20s": sum(1 for x in renders if x >= 20.0)},
        "checks": [
            _check("text_p95_s", None if chat_p95 is None else round(chat_p95 / 1000, 4)),
            _check("error_rate", ratio(t.errors, t.requests)),
            _check("cache_hit_rate", ratio(t.cache_hits, t.chat_calls)),
            _check("rate_limit_rate", ratio(t.rate_limited, t.requests)),
            _check("image_render_p95_s", None if render_p95 is None else round(render_p95, 3)),
        ],
    }


def bucket_width(span_s: float) -> int:
    """Seconds per bucket of the charts over time: the smallest of a few round widths that keeps
    the period within 48 buckets."""
    for width in (1, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400):
        if span_s / width <= 48:
            return width
    return 30 * 86400


def _series(
    conn: Any, start: datetime, end: datetime, feature: str | None, features: Iterable[str], rolled: Iterable[Any]
) -> dict[str, Any]:
    """Per feature, per bucket of the period: requests, errors, rate-limit hits, spend and the p95
    latency of text calls (what the HTML report draws). A rolled-up day's totals go in the bucket of
    its start (00:00 UTC); its latencies are in no p95."""
    width = bucket_width((end - start).total_seconds())
    count = max(1, math.ceil((end - start).total_seconds() / width))
    wanted = set(features)
    empty = {
        "requests": 0,
        "errors": 0,
        "rate_limited": 0,
        "cache_hits": 0,
        "spend_usd": Decimal(0),
        "chat_ms": [],
        "pipelines": 0,
    }
    found: dict[str, list[dict[str, Any]]] = {
        f: [{**empty, "chat_ms": []} for _ in range(count)] for f in sorted(wanted)
    }
    where = [_in_period(CALLS.c.ts, start, end)]
    if feature is not None:
        where.append(CALLS.c.feature == feature)
    rows = conn.execute(
        select(
            CALLS.c.ts,
            CALLS.c.feature,
            CALLS.c.operation,
            CALLS.c.latency_ms,
            _is_error.label("error"),
            _is_limited.label("limited"),
            _is_hit.label("hit"),
            CALLS.c.cost_usd,
        ).where(*where)
    )
    for row in rows:
        name = row.feature or "(none)"
        if name not in found:
            continue
        ts = _aware(row.ts)
        assert ts is not None
        slot = found[name][min(count - 1, int((ts - start).total_seconds() // width))]
        slot["requests"] += 1
        slot["errors"] += int(row.error)
        slot["rate_limited"] += int(row.limited)
        slot["cache_hits"] += int(row.hit)
        slot["spend_usd"] += usd(row.cost_usd)
        if row.operation == "chat":
            slot["chat_ms"].append(float(row.latency_ms or 0.0))
    for row in rolled:
        name = row.feature or "(none)"
        if name not in found:
            continue
        day_start = datetime.combine(date.fromisoformat(row.day), time(), UTC)
        slot = found[name][min(count - 1, int((day_start - start).total_seconds() // width))]
        slot["requests"] += int(row.requests or 0)
        slot["errors"] += int(row.requests or 0) if row.error_code else 0
        slot["rate_limited"] += int(row.rate_limited or 0)
        slot["cache_hits"] += int(row.cache_hits or 0)
        slot["spend_usd"] += usd_of_micros(row.cost_micros)
    created = select(PIPELINES.c.feature, PIPELINES.c.created_at).where(_in_period(PIPELINES.c.created_at, start, end))
    if feature is not None:
        created = created.where(PIPELINES.c.feature == feature)
    for row in conn.execute(created):
        if row.feature in found:
            at = _aware(row.created_at)
            assert at is not None
            found[row.feature][min(count - 1, int((at - start).total_seconds() // width))]["pipelines"] += 1
    out: dict[str, Any] = {}
    for name, slots in found.items():
        out[name] = [
            {
                "start": (start + timedelta(seconds=i * width)).isoformat(),
                "requests": slot["requests"],
                "errors": slot["errors"],
                "rate_limited": slot["rate_limited"],
                "cache_hits": slot["cache_hits"],
                "spend_usd": str(slot["spend_usd"]),
                "text_p95_ms": percentile(slot["chat_ms"], 95),
                "pipelines": slot["pipelines"],
            }
            for i, slot in enumerate(slots)
        ]
    return {"bucket_s": width, "features": out}


def build_report(
    db: Database,
    settings: Settings,
    *,
    since: datetime,
    until: datetime,
    feature: str | None = None,
    model: str | None = None,
    now: datetime | None = None,
    series: bool = True,
) -> dict[str, Any]:
    """Every figure of ``genline report`` for ``[since, until)``: per feature and per model, each
    beside the guide's target (``checks``). ``feature`` keeps one feature (everywhere); ``model``
    keeps one model in the per-model part."""
    now = now or utcnow()
    with db.engine.connect() as conn:
        rolled = report_totals.daily_totals(conn, since, until, feature)
        by_feature, by_model = _tallies(conn, since, until, feature, model, rolled)
        steps = _steps(conn, since, until, feature)
        renders_by_feature, renders_by_model = _renders(conn, since, until, feature)
        pipelines = _pipelines(conn, since, until, feature)
        at_risk = copies_at_risk(conn, now, settings.copy_risk_margin_s, feature)
        names = sorted(set(by_feature) | set(pipelines) | set(steps) | set(at_risk))
        if feature is not None:
            names = [feature]
        features = []
        for name in names:
            states = pipelines.get(name, {})
            features.append(
                {
                    "feature": name,
                    **_call_figures(by_feature.get(name, Tally()), renders_by_feature.get(name, [])),
                    "pipelines": {"total": sum(states.values()), "by_status": dict(sorted(states.items()))},
                    "steps": steps.get(name, {}),
                    "copies_at_risk": at_risk.get(name, 0),
                }
            )
        model_names = sorted(by_model) if model is None else [model]
        models = [
            {"model": name, **_call_figures(by_model.get(name, Tally()), renders_by_model.get(name, []))}
            for name in model_names
        ]
        over_time = _series(conn, since, until, feature, names, rolled) if series else None
    report: dict[str, Any] = {
        "period": {"since": since.isoformat(), "until": until.isoformat()},
        "as_of": now.isoformat(),
        "copy_risk_margin_s": settings.copy_risk_margin_s,
        "targets": [
            {"figure": t.name, "target": f"{t.op} {t.limit:g}", "unit": t.unit, "describe": t.describe} for t in TARGETS
        ],
        "daily_totals": report_totals.section(since, until, sum(t.rolled_up for t in by_feature.values())),
        "features": features,
        "models": models,
    }
    if over_time is not None:
        report["series"] = over_time
    return report


def flagged(report: dict[str, Any]) -> list[str]:
    """``feature:figure`` for every check outside its target (what the CLI's exit code reflects)."""
    out: list[str] = []
    for section, key in (("features", "feature"), ("models", "model")):
        for item in report[section]:
            out.extend(f"{item[key]}:{c['figure']}" for c in item["checks"] if c["ok"] is False)
    return out
