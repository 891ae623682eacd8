"""``genline report``: after the demo's requests, every figure of ``report --json`` for the demo's
feature matches a count done directly in the database (SQLite, and PostgreSQL as integration).

The demo's sample requests (cli/demo.py: feature listing-video, its descriptions and profiles) run
in drain mode against the simulator over real HTTP, with a 429 scripted on the first copy call, a
400 on one image submit (that pipeline fails), one request repeated (a copy-cache hit) and one
pipeline stopped before its store step (a copy at risk under a wide margin)."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from genline.cli.demo import SAMPLES, sample_image
from genline.config.clock import utcnow
from genline.pipelines.api import Genline
from genline.pipelines.report import bucket_width, build_report, percentile, period_of
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from genline.storage.models import Pipeline, ProviderJob, Step
from genline.workers.drain import drain
from tests.conftest import TEST_KEY
from tests.support.cli import invoke
from tests.support.drive import faults, run_until

FEATURE = "listing-video"
WIDE_MARGIN_S = 10 * 86400.0  # every copy still to do counts as at risk


def demo_request(upload_dir: Path, i: int, key: str) -> dict[str, Any]:
    description, profile = SAMPLES[i % len(SAMPLES)]
    return {
        "user_id": f"demo-seller-{i % 3 + 1}",
        "feature": FEATURE,
        "description": description,
        "image": str(sample_image(upload_dir / "samples", i % len(SAMPLES))),
        "profile": profile,
        "idempotency_key": key,
    }


def run_demo(rt: Runtime, sim: SimulatorHandle, upload_dir: Path) -> dict[str, str]:
    """The demo's requests in drain mode, with a rate limit, a failure, a cache hit and a copy left to do."""
    api = Genline(runtime=rt)
    ids: dict[str, str] = {}
    faults(sim, {"method": "POST", "path": "/v1/chat/completions", "status": 429, "times": 1, "retry_after": 0})
    ids["rate_limited"] = api.submit(demo_request(upload_dir, 0, "demo-0")).pipeline_id
    drain(rt)
    faults(sim, {"method": "POST", "path": "/v1/images/generations", "status": 400, "times": 1})
    ids["failed"] = api.submit(demo_request(upload_dir, 1, "demo-1")).pipeline_id
    drain(rt)
    ids["draft"] = api.submit(demo_request(upload_dir, 2, "demo-2")).pipeline_id
    drain(rt)
    ids["cached"] = api.submit(demo_request(upload_dir, 0, "demo-0-again")).pipeline_id  # same copy request
    drain(rt)
    ids["copy_left"] = api.submit(demo_request(upload_dir, 3, "demo-3")).pipeline_id
    run_until(rt, "store")  # its store step is queued, not run: a copy still to do
    return ids


def cli_env(rt: Runtime, sim: SimulatorHandle) -> dict[str, str]:
    """The environment of a ``genline`` command run on the test's var folder (and database)."""
    return {
        "GENLINE_VAR_DIR": str(rt.settings.var_dir),
        "APIMART_BASE_URL": sim.base_url,
        "APIMART_API_KEY": TEST_KEY,
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",
    }


def nearest_rank(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def sql_counts(rt: Runtime, margin_s: float) -> dict[str, Any]:
    """The same figures, counted directly with SQL (every row of this test's database is in the period)."""
    with rt.db.engine.connect() as conn:

        def one(sql: str, **params: Any) -> Any:
            return conn.execute(text(sql), {"f": FEATURE, **params}).scalar()

        def pairs(sql: str) -> dict[str, Any]:
            return {k: v for k, v in conn.execute(text(sql), {"f": FEATURE}).all()}

        calls = "FROM provider_calls WHERE feature = :f"
        out: dict[str, Any] = {
            "requests": one(f"SELECT COUNT(*) {calls}"),
            "by_operation": pairs(f"SELECT operation, COUNT(*) {calls} GROUP BY operation"),
            "errors": one(f"SELECT COUNT(*) {calls} AND error_code IS NOT NULL"),
            "by_class": pairs(f"SELECT error_code, COUNT(*) {calls} AND error_code IS NOT NULL GROUP BY error_code"),
            "rate_limited": one(
                f"SELECT COUNT(*) {calls} AND (status_code = 429 OR error_code = 'provider_rate_limited')"
            ),
            "chat_calls": one(f"SELECT COUNT(*) {calls} AND operation = 'chat'"),
            "cache_hits": one(f"SELECT COUNT(*) {calls} AND operation = 'chat' AND cache_hit = :t", t=True),
            "spend_micros": one(f"SELECT COALESCE(SUM(ROUND(cost_usd * 1000000)), 0) {calls}"),
            "pipelines": pairs("SELECT status, COUNT(*) FROM pipelines WHERE feature = :f GROUP BY status"),
            "latencies": {},
        }
        for op, ms in conn.execute(text(f"SELECT operation, latency_ms {calls}"), {"f": FEATURE}).all():
            out["latencies"].setdefault(op, []).append(float(ms))
        steps = conn.execute(
            select(Step.kind, Step.status, Step.started_at, Step.finished_at)
            .join(Pipeline)
            .where(Pipeline.feature == FEATURE, Step.finished_at.is_not(None))
        ).all()
        out["steps"] = {}
        for kind, status, started, finished in steps:
            slot = out["steps"].setdefault(kind, {"succeeded": 0, "failed": 0, "seconds": []})
            if status == "succeeded":
                slot["succeeded"] += 1
                assert started is not None and finished is not None
                slot["seconds"].append((finished - started).total_seconds())
            elif status == "failed":
                slot["failed"] += 1
        renders = conn.execute(
            select(ProviderJob.submitted_at, ProviderJob.completed_at)
            .join(Step)
            .join(Pipeline)
            .where(Pipeline.feature == FEATURE, ProviderJob.kind == "image", ProviderJob.status == "completed")
        ).all()
        out["renders"] = [max(0.0, (done - sent).total_seconds()) for sent, done in renders if sent and done]
        out["at_risk"] = conn.execute(
            select(Step.id)
            .join(Pipeline)
            .where(
                Pipeline.feature == FEATURE,
                Step.kind == "store",
                Step.status.in_(["queued", "running"]),
                Step.deadline_at < utcnow() + timedelta(seconds=margin_s),
            )
        ).all()
    return out


def test_report_json_after_the_demo_matches_counts_done_in_the_database(
    either_rt: Runtime, sim: SimulatorHandle, upload_dir: Path
) -> None:
    rt = either_rt
    started = utcnow() - timedelta(seconds=1)
    ids = run_demo(rt, sim, upload_dir)
    settings = rt.settings.with_overrides(copy_risk_margin_s=WIDE_MARGIN_S)
    got = build_report(rt.db, settings, since=started, until=utcnow() + timedelta(seconds=1))
    want = sql_counts(rt, WIDE_MARGIN_S)
    [feature] = [f for f in got["features"] if f["feature"] == FEATURE]

    # requests, by operation
    assert feature["requests"]["total"] == want["requests"] > 0
    assert feature["requests"]["by_operation"] == want["by_operation"]
    # latency percentiles by operation (over the latencies the SQL selected)
    assert set(feature["latency_ms"]) == set(want["latencies"])
    for op, values in want["latencies"].items():
        for p in (50, 95, 99):
            assert feature["latency_ms"][op][f"p{p}"] == round(nearest_rank(values, p) or 0, 1), (op, p)
        assert feature["latency_ms"][op]["count"] == len(values)
    # errors by class, the 429 and the 400 among them
    assert feature["errors"]["total"] == want["errors"]
    assert feature["errors"]["by_class"] == want["by_class"]
    assert want["by_class"].get("provider_rate_limited", 0) >= 1 and len(want["by_class"]) >= 2
    assert feature["errors"]["rate"] == round(want["errors"] / want["requests"], 6)
    # cache and rate-limit hit rates
    assert feature["cache"] == {
        "chat_calls": want["chat_calls"],
        "hits": want["cache_hits"],
        "hit_rate": round(want["cache_hits"] / want["chat_calls"], 6),
    }
    assert want["cache_hits"] == 1  # the repeated request's copy
    assert feature["rate_limit"] == {
        "hits": want["rate_limited"],
        "rate": round(want["rate_limited"] / want["requests"], 6),
    }
    assert want["rate_limited"] >= 1
    # spend, to the micro-dollar
    assert round(float(feature["spend"]["usd"]) * 1_000_000) == int(want["spend_micros"]) > 0
    # pipelines by status: three succeeded, one failed, one still running
    assert feature["pipelines"]["by_status"] == want["pipelines"] == {"succeeded": 3, "failed": 1, "running": 1}
    # step latency breakdown
    assert set(feature["steps"]) == set(want["steps"])
    for kind, slot in want["steps"].items():
        mine = feature["steps"][kind]
        assert (mine["succeeded"], mine["failed"]) == (slot["succeeded"], slot["failed"]), kind
        assert mine["seconds"]["p95"] == (round(p95, 3) if (p95 := nearest_rank(slot["seconds"], 95)) else p95), kind
    assert want["steps"]["image"]["failed"] == 1
    # image renders and copies at risk
    assert feature["image_renders"]["count"] == len(want["renders"]) == 4
    assert feature["image_renders"]["p95"] == round(nearest_rank(want["renders"], 95) or 0, 3)
    assert feature["copies_at_risk"] == len(want["at_risk"]) == 1
    # each figure beside its target, flagged when outside it
    checks = {c["figure"]: c for c in feature["checks"]}
    assert checks["error_rate"]["ok"] is False  # 2+ errors in a few dozen calls: far over 0.1%
    assert checks["rate_limit_rate"]["ok"] is False
    assert checks["cache_hit_rate"]["ok"] is (want["cache_hits"] / want["chat_calls"] > 0.4)
    assert checks["text_p95_s"]["value"] == round((nearest_rank(want["latencies"]["chat"], 95) or 0) / 1000, 4)
    assert checks["image_render_p95_s"]["ok"] is True  # the fast simulator renders at the first poll
    assert f"{FEATURE}:error_rate" in [*map(str, _flagged(got))]
    # per model: the copy model's calls add up to the feature's chat calls
    chat_models = [m for m in got["models"] if m["requests"]["by_operation"].get("chat")]
    assert sum(m["requests"]["by_operation"]["chat"] for m in chat_models) == want["chat_calls"]
    assert ids["failed"] in {p.id for p in _failed(rt)}


def _flagged(report: dict[str, Any]) -> list[str]:
    from genline.pipelines.report import flagged

    return flagged(report)


def _failed(rt: Runtime) -> list[Pipeline]:
    with rt.db.transaction() as s:
        return list(s.scalars(select(Pipeline).where(Pipeline.status == "failed")))


def test_the_period_bounds_every_figure(rt: Runtime, sim: SimulatorHandle, upload_dir: Path) -> None:
    api = Genline(runtime=rt)
    api.submit(demo_request(upload_dir, 0, "p-0"))
    drain(rt)
    before = build_report(rt.db, rt.settings, since=utcnow() - timedelta(days=2), until=utcnow() - timedelta(days=1))
    assert before["features"] == [] and before["models"] == []
    now = build_report(rt.db, rt.settings, since=utcnow() - timedelta(hours=1), until=utcnow() + timedelta(seconds=1))
    assert now["features"][0]["pipelines"]["by_status"] == {"succeeded": 1}


def test_percentiles_are_nearest_rank_and_periods_parse() -> None:
    assert percentile([], 95) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(x) for x in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50.0, 95.0, 99.0)
    start, end = period_of("24h", None)
    assert (end - start) == timedelta(hours=24)
    start, end = period_of("2025-01-01", "2025-01-02T00:00:00+02:00")
    assert start.isoformat() == "2025-01-01T00:00:00+00:00" and end.hour == 22
    assert (bucket_width(10), bucket_width(600), bucket_width(86400)) == (1, 30, 3600)


def test_a_period_that_ends_before_it_starts_or_a_bad_time_is_refused() -> None:
    from genline.config.errors import ValidationError

    with pytest.raises(ValidationError) as caught:
        period_of("now", "1h")
    assert caught.value.code == "period_invalid"
    with pytest.raises(ValidationError) as caught:
        period_of("yesterday", None)
    assert caught.value.code == "since_invalid" and "ISO 8601" in caught.value.message


def test_cli_report_json_holds_every_figure_and_the_text_form_flags_what_is_outside(
    rt: Runtime, sim: SimulatorHandle, upload_dir: Path
) -> None:
    faults(sim, {"method": "POST", "path": "/v1/images/generations", "status": 400, "times": 10})
    api = Genline(runtime=rt)
    api.submit(demo_request(upload_dir, 1, "c-1"))
    drain(rt)
    env = cli_env(rt, sim)
    result = invoke(["report", "--since", "1h", "--feature", FEATURE, "--json"], env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    [feature] = data["features"]
    for figure in (
        "requests",
        "latency_ms",
        "errors",
        "cache",
        "rate_limit",
        "spend",
        "pipelines",
        "steps",
        "copies_at_risk",
        "checks",
    ):
        assert figure in feature, figure
    assert feature["pipelines"]["by_status"] == {"failed": 1}
    assert f"{FEATURE}:error_rate" in data["flagged"]
    shown = invoke(["report", "--since", "1h", "--feature", FEATURE], env)
    assert shown.exit_code == 0, shown.output
    assert "OUTSIDE TARGET" in shown.output and "errors under 0.1% of requests" in shown.output
