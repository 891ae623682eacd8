"""The quick chaos run, for real: 40 pipelines on Redis, PostgreSQL, moto's S3 server, the simulator
over HTTP (faults on), two worker processes and a poller, while a worker is SIGKILLed every ~5 s,
the poller is killed once, Redis is restarted once (empty) and PostgreSQL connections are dropped
once, and a worker is killed in the middle of a copy, all on genline's shipped settings. Every
invariant of ``make chaos`` is asserted. The full run (300 pipelines) is ``make chaos``; this is the
one CI runs every time (about four minutes here)."""

from __future__ import annotations

import json
from pathlib import Path

from lab.chaos_run import ChaosPlan, run_chaos
from tests.conftest import PG_HOST, PG_PORT, require_program, require_service


def test_forty_pipelines_survive_kills_restarts_and_provider_faults(tmp_path: Path) -> None:
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    require_program("redis-server", "the chaos run starts (and restarts) its own")

    out = tmp_path / "chaos.json"
    result, failures = run_chaos(ChaosPlan.quick(), out)
    summary = {k: v for k, v in result.items() if k not in ("timeline", "plan", "faults", "settings")}

    # A per-user daily cap fits 5 of each seller's (up to) 6 pipelines: the rest are refused at submit.
    assert result["refused_at_cap"] > 0 and result["pipelines"] + result["refused_at_cap"] == 40, summary
    assert json.loads(out.read_text())["pipelines"] == result["pipelines"]
    assert result["pipelines_in_db"] == result["pipelines"], summary  # a resubmit made no second pipeline
    assert result["users_over_cap"] == 0 and result["cap_reserved_left_usd"] == 0, summary
    assert result["terminal"] == result["pipelines"], summary
    assert result["failed_without_reason"] == 0, summary
    assert result["duplicate_paid_jobs"] == 0, summary
    assert result["stored_objects_verified"] == result["succeeded"], summary
    assert result["lost_outputs"] == 0, summary
    assert abs(result["spend_recorded_usd"] - result["spend_billed_by_provider_usd"]) < 0.001, summary
    assert result["secrets_found_in_logs"] == 0, summary
    assert result["secret_search"]["log_lines"] > 0 and result["secret_search"]["db_rows"] > 0
    assert "wall_time_s" in result
    # The chaos really happened, while work was in flight: one of each kind at least.
    kills = result["kills"]
    assert kills["worker_sigkill"] >= 1 and kills["poller_kill"] >= 1, kills
    assert kills["redis_restart"] == 1 and kills["pg_connections_dropped"] == 1, kills
    assert kills["worker_sigkill_mid_copy"] == 1, kills
    # Shipped settings: a step a killed worker was running ran again within 90 s, and none was left.
    assert result["settings"] == {}
    assert result["max_recovery_wait_s"] is not None and result["max_recovery_wait_s"] <= 90, summary
    assert result["steps_of_killed_workers_never_run_again"] == 0, summary
    assert result["redis_data_kept"] is False
    assert all(event["terminal_then"] < result["pipelines"] for event in result["timeline"]), result["timeline"]
    assert not result["disruptions_missed"]
    assert result["faults_injected"]["requests_by_status"].get("429", 0) > 0
    assert not failures, failures
