"""After the real ``genline demo`` (as ``make demo`` runs it: the simulator, a Celery worker and the
poller as processes on SQLite, local files and the embedded broker; only the var folder is the
test's own), ``genline report --json``, run as a command on the same var folder, gives the demo's
feature the requests, spend, cache hits, errors and pipelines by status that a count done directly
in the demo's SQLite database gives.

Two sample pipelines with distinct descriptions: their copy is never a cache hit, so cache hits
compare as zero here (tests/test_report.py repeats a request in-process to count one); a second
demo run for a hit would double the test's time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from genline.config.clock import utcnow
from genline.config.settings import load_settings

FEATURE = "listing-video"  # the demo's feature (cli/demo.py)
pytestmark = pytest.mark.timeout(240)


def genline(*args: str, env: dict[str, str], timeout: float) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "genline", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return json.loads(done.stdout)


def counted_in_the_database(database_url: str) -> dict[str, Any]:
    """The demo's feature, counted with SQL (every row of this database is the demo's)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:

            def one(sql: str) -> Any:
                return conn.execute(text(sql), {"f": FEATURE, "t": True}).scalar()

            def pairs(sql: str) -> dict[str, int]:
                return {k: int(v) for k, v in conn.execute(text(sql), {"f": FEATURE}).all()}

            calls = "FROM provider_calls WHERE feature = :f"
            return {
                "requests": one(f"SELECT COUNT(*) {calls}"),
                "by_operation": pairs(f"SELECT operation, COUNT(*) {calls} GROUP BY operation"),
                "errors": one(f"SELECT COUNT(*) {calls} AND error_code IS NOT NULL"),
                "chat_calls": one(f"SELECT COUNT(*) {calls} AND operation = 'chat'"),
                "cache_hits": one(f"SELECT COUNT(*) {calls} AND operation = 'chat' AND cache_hit = :t"),
                "spend_micros": int(one(f"SELECT COALESCE(SUM(ROUND(cost_usd * 1000000)), 0) {calls}")),
                "pipelines": pairs("SELECT status, COUNT(*) FROM pipelines WHERE feature = :f GROUP BY status"),
                "pipeline_cost_micros": int(
                    one("SELECT COALESCE(SUM(ROUND(cost_usd * 1000000)), 0) FROM pipelines WHERE feature = :f")
                ),
            }
    finally:
        engine.dispose()


def test_report_json_after_the_real_demo_matches_a_count_in_the_demos_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENLINE_", "APIMART_"))}
    env["GENLINE_VAR_DIR"] = str(tmp_path / "var")
    since = (utcnow() - timedelta(seconds=1)).isoformat()
    demo = genline("demo", "--count", "2", "--video-seconds", "0.5", "--json", "--timeout", "120", env=env, timeout=180)
    assert demo["succeeded"] == demo["total"] == 2

    report = genline("report", "--since", since, "--feature", FEATURE, "--json", env=env, timeout=60)
    settings = load_settings({"GENLINE_VAR_DIR": env["GENLINE_VAR_DIR"]})
    assert settings.database_url.startswith("sqlite")
    want = counted_in_the_database(settings.database_url)

    [feature] = report["features"]
    assert feature["feature"] == FEATURE
    assert feature["requests"]["total"] == want["requests"] > 0
    assert feature["requests"]["by_operation"] == want["by_operation"]
    assert set(want["by_operation"]) >= {"chat", "submit", "poll"}  # copy, image and video really ran
    assert feature["requests"]["from_daily_totals"] == 0  # nothing rolled up yet
    assert feature["errors"]["total"] == want["errors"]
    assert feature["cache"]["chat_calls"] == want["chat_calls"] > 0
    assert feature["cache"]["hits"] == want["cache_hits"]
    assert int(Decimal(feature["spend"]["usd"]) * 1_000_000) == want["spend_micros"] > 0
    # the audit log's spend is what the pipelines say they cost, and what the demo printed
    assert want["spend_micros"] == want["pipeline_cost_micros"]
    assert sum(Decimal(p["cost_usd"]) for p in demo["pipelines"]) * 1_000_000 == want["spend_micros"]
    assert feature["pipelines"]["by_status"] == want["pipelines"] == {"succeeded": 2}
    assert feature["pipelines"]["total"] == 2
