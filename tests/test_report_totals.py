"""``genline report`` over days whose audit rows retention rolled up into ``audit_daily_totals``:
requests, errors by class, rate-limit and cache hits and spend (per feature and per model) are the
same before and after the roll-up, and equal a count done directly in the database (the stored
rows plus the daily totals). Latency percentiles cover only the stored rows, and the report says so.

The demo's requests (tests/test_report.py ``run_demo``: a 429, a failed image, a copy-cache hit)
run in drain mode; their audit rows are then moved into the past, two pipelines' onto one day and
one pipeline's onto the next, past the feature's ``audit_days``, and the retention pass rolls them up.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from genline.config.catalog import parse_features
from genline.config.clock import utcnow
from genline.pipelines.report import build_report
from genline.pipelines.report_totals import rolled_up_days
from genline.pipelines.retention import run_retention
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from genline.storage.models import AuditDailyTotal, ProviderCall
from tests.support.cli import invoke
from tests.test_report import FEATURE, cli_env, run_demo

pytestmark = pytest.mark.timeout(120)
AUDIT_DAYS = 5


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def move_calls(rt: Runtime, pipeline_id: str, when: datetime) -> None:
    with rt.db.transaction() as s:
        s.execute(update(ProviderCall).where(ProviderCall.pipeline_id == pipeline_id).values(ts=when))


def roll_up(rt: Runtime) -> int:
    """The retention pass with the feature's audit kept ``AUDIT_DAYS``; the audit rows it removed."""
    default, listed = parse_features({FEATURE: {"audit_days": AUDIT_DAYS}}, profiles=rt.catalog.profiles)
    rt.catalog = replace(rt.catalog, features=listed, default_feature=default)
    return run_retention(rt).features[FEATURE].audit_rows


def stored_calls(rt: Runtime) -> int:
    with rt.db.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(ProviderCall)) or 0)


# --- the count done directly in the database ----------------------------------------------------------
_RAW = """
SELECT COALESCE({col}, '') AS k, operation, COALESCE(error_code, '') AS code, COUNT(*) AS n,
       SUM(CASE WHEN status_code = 429 OR error_code = 'provider_rate_limited' THEN 1 ELSE 0 END) AS limited,
       SUM(CASE WHEN cache_hit = :t THEN 1 ELSE 0 END) AS hits,
       COALESCE(SUM(ROUND(cost_usd * 1000000)), 0) AS micros,
       COALESCE(SUM(CASE WHEN cost_estimated = :t THEN ROUND(cost_usd * 1000000) ELSE 0 END), 0) AS estimated
FROM provider_calls
GROUP BY COALESCE({col}, ''), operation, COALESCE(error_code, '')
"""
_TOTALS = """
SELECT {col} AS k, operation, error_code AS code, SUM(requests) AS n, SUM(rate_limited) AS limited,
       SUM(cache_hits) AS hits, SUM(cost_micros) AS micros, SUM(estimated_cost_micros) AS estimated
FROM audit_daily_totals
GROUP BY {col}, operation, error_code
"""


def empty() -> dict[str, Any]:
    return {
        "requests": 0,
        "by_operation": {},
        "errors": 0,
        "by_class": {},
        "rate_limited": 0,
        "chat_calls": 0,
        "cache_hits": 0,
        "spend_micros": 0,
        "estimated_micros": 0,
    }


def db_counts(rt: Runtime) -> dict[str, dict[str, dict[str, Any]]]:
    """Per feature and per model: the stored audit rows and the daily totals, counted with SQL (every
    row of this test's database lies in the period it reports on)."""
    out: dict[str, dict[str, dict[str, Any]]] = {"feature": {}, "model": {}}
    with rt.db.engine.connect() as conn:
        for col in ("feature", "model"):
            raw = conn.execute(text(_RAW.format(col=col)), {"t": True}).all()
            rolled = conn.execute(text(_TOTALS.format(col=col))).all()
            for row in [*raw, *rolled]:
                slot = out[col].setdefault(row.k or "(none)", empty())
                n = int(row.n)
                slot["requests"] += n
                slot["by_operation"][row.operation] = slot["by_operation"].get(row.operation, 0) + n
                if row.code:
                    slot["errors"] += n
                    slot["by_class"][row.code] = slot["by_class"].get(row.code, 0) + n
                slot["rate_limited"] += int(row.limited)
                if row.operation == "chat":
                    slot["chat_calls"] += n
                    slot["cache_hits"] += int(row.hits)
                slot["spend_micros"] += int(row.micros)
                slot["estimated_micros"] += int(row.estimated)
    for slices in out.values():
        for slot in slices.values():
            slot["by_operation"] = dict(sorted(slot["by_operation"].items()))
            slot["by_class"] = dict(sorted(slot["by_class"].items()))
    return out


def report_figures(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The same figures as ``report --json`` gives them, per feature and per model."""

    def micros(amount: str) -> int:
        return int(Decimal(amount) * 1_000_000)

    out: dict[str, dict[str, dict[str, Any]]] = {"feature": {}, "model": {}}
    for section, key in (("features", "feature"), ("models", "model")):
        for item in report[section]:
            out[key][item[key]] = {
                "requests": item["requests"]["total"],
                "by_operation": item["requests"]["by_operation"],
                "errors": item["errors"]["total"],
                "by_class": item["errors"]["by_class"],
                "rate_limited": item["rate_limit"]["hits"],
                "chat_calls": item["cache"]["chat_calls"],
                "cache_hits": item["cache"]["hits"],
                "spend_micros": micros(item["spend"]["usd"]),
                "estimated_micros": micros(item["spend"]["estimated_usd"]),
            }
    return out


def report_json(rt: Runtime, sim: SimulatorHandle, since: datetime, until: datetime) -> dict[str, Any]:
    env = {**cli_env(rt, sim), "GENLINE_DATABASE_URL": rt.settings.database_url}
    result = invoke(["report", "--since", since.isoformat(), "--until", until.isoformat(), "--json"], env)
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    return data


def test_report_counts_rolled_up_days_as_before_the_roll_up_and_as_the_database_does(
    either_rt: Runtime, sim: SimulatorHandle, upload_dir: Path
) -> None:
    rt = either_rt
    ids = run_demo(rt, sim, upload_dir)
    day_one = (utcnow() - timedelta(days=AUDIT_DAYS + 5)).date()
    move_calls(rt, ids["rate_limited"], midnight(day_one) + timedelta(hours=10))  # the 429
    move_calls(rt, ids["failed"], midnight(day_one) + timedelta(hours=11))  # the 400
    move_calls(rt, ids["draft"], midnight(day_one) + timedelta(days=1, hours=9))
    since, until = midnight(day_one), utcnow() + timedelta(minutes=1)
    # the cached and copy-left pipelines' rows stay recent: stored rows and totals in one period
    before = report_json(rt, sim, since, until)
    counted_before = db_counts(rt)
    assert report_figures(before) == counted_before
    figures_before = counted_before["feature"][FEATURE]
    assert figures_before["rate_limited"] >= 1 and figures_before["cache_hits"] == 1
    assert len(figures_before["by_class"]) >= 2 and figures_before["spend_micros"] > 0
    assert before["daily_totals"]["requests"] == 0

    stored = stored_calls(rt)
    rolled = roll_up(rt)
    assert 0 < rolled < stored and stored_calls(rt) == stored - rolled
    with rt.db.transaction() as s:
        assert {t.day for t in s.scalars(select(AuditDailyTotal))} == {
            day_one.isoformat(),
            (day_one + timedelta(days=1)).isoformat(),
        }

    after = report_json(rt, sim, since, until)
    counted_after = db_counts(rt)
    # every figure per feature and per model: unchanged by the roll-up, and what the database holds
    assert report_figures(after) == report_figures(before) == counted_after
    assert counted_after == counted_before
    # the 429 and the failed image are now only in the totals: still counted
    [feature] = [f for f in after["features"] if f["feature"] == FEATURE]
    [feature_before] = [f for f in before["features"] if f["feature"] == FEATURE]
    assert feature["requests"]["from_daily_totals"] == rolled == after["daily_totals"]["requests"]
    assert feature["rate_limit"]["hits"] == figures_before["rate_limited"] >= 1
    # percentiles cover the stored rows only; the mean covers the rolled-up calls too
    for op, spread in feature["latency_ms"].items():
        was = feature_before["latency_ms"][op]
        assert spread["count"] + spread["from_daily_totals"] == was["count"], op
        assert spread["mean"] == pytest.approx(was["mean"], abs=0.11), op
    assert sum(s["from_daily_totals"] for s in feature["latency_ms"].values()) == rolled
    assert "percentiles" in after["daily_totals"]["note"]
    # the charts' buckets add up to the same requests and spend (rolled-up days at 00:00 UTC)
    buckets = build_report(rt.db, rt.settings, since=since, until=until)["series"]["features"][FEATURE]
    assert sum(b["requests"] for b in buckets) == feature["requests"]["total"]
    assert sum(Decimal(b["spend_usd"]) for b in buckets) == Decimal(feature["spend"]["usd"])


def test_a_rolled_up_day_counts_when_it_begins_inside_the_period(
    rt: Runtime, sim: SimulatorHandle, upload_dir: Path
) -> None:
    ids = run_demo(rt, sim, upload_dir)
    day = (utcnow() - timedelta(days=AUDIT_DAYS + 5)).date()
    for pipeline_id in ids.values():
        move_calls(rt, pipeline_id, midnight(day) + timedelta(hours=12))
    roll_up(rt)
    with rt.db.transaction() as s:
        on_that_day = int(s.scalar(select(func.sum(AuditDailyTotal.requests))) or 0)
    assert on_that_day > 0

    def requests(since: datetime, until: datetime) -> int:
        report = build_report(rt.db, rt.settings, since=since, until=until, feature=FEATURE)
        return int(report["features"][0]["requests"]["total"])

    start = midnight(day)
    assert requests(start, start + timedelta(days=1)) == on_that_day
    # the calls were made at noon, yet a period ending at 01:00 takes the day whole ...
    assert requests(start - timedelta(days=1), start + timedelta(hours=1)) == on_that_day
    # ... and one starting a second after midnight leaves it out (the day began before it)
    assert requests(start + timedelta(seconds=1), start + timedelta(days=3)) == 0
    assert requests(start - timedelta(days=1), start) == 0
    assert rolled_up_days(start + timedelta(seconds=1), start + timedelta(hours=1)) == (
        (day + timedelta(days=1)).isoformat(),
        (day + timedelta(days=1)).isoformat(),
    )
