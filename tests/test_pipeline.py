"""The whole pipeline in drain mode: SQLite, local files, the simulator over real HTTP.

Drain mode runs the same step and poller code as the workers, in this process, with the
in-memory broker, so nothing here sleeps and hopes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from config.constants import StepStatus
from pipelines.api import Genline
from pipelines.drain import drain
from pipelines.engine import run_step
from pipelines.runtime import Runtime
from provider.simulator import SimulatorHandle
from storage.models import ProviderCall, ProviderJob, Step
from tests.conftest import TEST_KEY

RequestFn = Callable[..., dict[str, Any]]


def sim_stats(sim: SimulatorHandle) -> dict[str, Any]:
    return httpx.get(f"{sim.base_url}/_sim/stats").json()


def sim_task(sim: SimulatorHandle, task_id: str) -> dict[str, Any]:
    return httpx.get(f"{sim.base_url}/_sim/tasks/{task_id}").json()


def sim_post(sim: SimulatorHandle, path: str, body: dict[str, Any]) -> None:
    httpx.post(f"{sim.base_url}{path}", json=body).raise_for_status()


def run_one(rt: Runtime, fields: dict[str, Any]) -> dict[str, Any]:
    api = Genline(runtime=rt)
    accepted = api.submit(fields)
    drain(rt)
    return api.status(accepted.pipeline_id)


def test_a_pipeline_writes_copy_renders_image_and_video_and_keeps_the_video(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    status = run_one(rt, request_fields())
    assert status["status"] == "succeeded", status
    assert [s["status"] for s in status["steps"]] == ["succeeded"] * 4
    assert status["copy"]
    video = status["video"]
    data = Path(video["location"]).read_bytes()
    assert data[4:8] == b"ftyp" and video["content_type"] == "video/mp4"
    with rt.db.transaction() as s:
        task_id = s.scalars(select(ProviderJob.task_id).where(ProviderJob.kind == "video")).one()
    expected = sim_task(sim, task_id)
    produced = expected["result"][0] if "result" in expected else expected
    assert hashlib.sha256(data).hexdigest() == video["sha256"]
    assert video["sha256"] in str(produced)  # byte-identical to what the provider made


def test_cost_is_the_catalog_price_of_what_was_used_and_matches_the_provider_bill(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    status = run_one(rt, request_fields())
    with rt.db.transaction() as s:
        chat = s.scalars(select(ProviderCall).where(ProviderCall.operation == "chat")).one()
    chat_cost = (Decimal("0.15") * chat.prompt_tokens + Decimal("0.60") * chat.completion_tokens) / 1_000_000
    expected = chat_cost + Decimal("0.0216") + Decimal("0.025") * 6  # standard: 1 image, 6 s of hailuo video
    assert Decimal(status["cost_usd"]) == expected.quantize(Decimal("0.000001"))
    assert abs(Decimal(str(sim_stats(sim)["billed_usd"])) - Decimal(status["cost_usd"])) < Decimal("0.000002")


def test_every_provider_call_leaves_an_audit_row(rt: Runtime, request_fields: RequestFn) -> None:
    status = run_one(rt, request_fields(user_id="seller-9", feature="launch"))
    with rt.db.transaction() as s:
        rows = s.scalars(select(ProviderCall).where(ProviderCall.pipeline_id == status["id"])).all()
    ops = sorted(r.operation for r in rows)
    assert ops.count("chat") == 1 and ops.count("submit") == 2 and ops.count("poll") >= 2
    for row in rows:
        assert (row.user_id, row.feature) == ("seller-9", "launch")
        assert row.model and row.status_code == 200 and row.latency_ms > 0 and row.request_id
    assert any(r.units == 6.0 and r.cost_usd == Decimal("0.15") for r in rows)


def test_a_redelivered_or_retried_step_never_starts_a_second_paid_job(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    run_step(rt, rt.dispatcher.pop())  # type: ignore[attr-defined, arg-type]  # copy
    image_step = rt.dispatcher.pop()  # type: ignore[attr-defined]
    assert image_step
    run_step(rt, image_step)
    # The same message delivered again (a second worker, a redelivery): nothing happens.
    run_step(rt, image_step)
    # A worker died after submitting; the sweeper queued the step again. It resumes, never resubmits.
    with rt.db.transaction() as s:
        s.get_one(Step, image_step).status = StepStatus.QUEUED
    run_step(rt, image_step)
    drain(rt)
    assert api.status(pid)["status"] == "succeeded"
    stats = sim_stats(sim)
    assert stats["duplicate_jobs"] == 0 and stats["jobs_total"] == 2


def test_a_crash_between_submit_and_commit_is_answered_with_the_same_job(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    """The provider accepted the job but our task_id never got committed (the worker died in the
    window). The intent row's idempotency key makes the provider hand back the same job."""
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    run_step(rt, rt.dispatcher.pop())  # type: ignore[attr-defined, arg-type]
    image_step = rt.dispatcher.pop()  # type: ignore[attr-defined]
    key = f"genline:{image_step}:wan-2.7-image"
    # What the dead worker did: its submit reached the provider...
    first = httpx.post(
        f"{sim.base_url}/v1/images/generations",
        headers={"Authorization": f"Bearer {TEST_KEY}", "Idempotency-Key": key},
        json={"model": "wan-2.7-image", "prompt": "x", "n": 1, "size": "1:1"},
    ).json()
    # ...after it had committed its intent, and before it could commit the task id.
    with rt.db.transaction() as s:
        s.add(
            ProviderJob(
                id="job_dead",
                step_id=image_step,
                attempt=1,
                idempotency_key=key,
                kind="image",
                model="wan-2.7-image",
                status="intent",
                units=1.0,
            )
        )
        s.get_one(Step, image_step).status = StepStatus.QUEUED
    run_step(rt, image_step)
    drain(rt)
    assert api.status(pid)["status"] == "succeeded"
    with rt.db.transaction() as s:
        job = s.get_one(ProviderJob, "job_dead")
    assert job.task_id == first["data"][0]["task_id"]
    stats = sim_stats(sim)
    assert stats["duplicate_jobs"] == 0 and stats["submit_calls"][key] == 2 and stats["jobs_created"][key] == 1


def test_a_job_the_provider_fails_fails_the_pipeline_with_a_reason(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    sim_post(sim, "/_sim/config", {"job_failure_rate": 1.0})
    status = run_one(rt, request_fields())
    assert status["status"] == "failed"
    assert status["error"]["code"] == "provider_job_failed"
    assert status["error"]["message"].startswith("The image step failed: the provider could not make the image")
    assert [s["status"] for s in status["steps"]] == ["succeeded", "failed", "cancelled", "cancelled"]


def test_a_moderation_rejection_is_not_retried_and_says_why(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    status = run_one(rt, request_fields(description="A mug with forbidden-content printed on it."))
    assert status["status"] == "failed"
    assert status["error"]["code"] == "provider_rejected_request"
    with rt.db.transaction() as s:
        submits = s.scalar(select(func.count()).select_from(ProviderCall).where(ProviderCall.operation == "submit"))
    assert submits == 1


def test_an_expired_result_link_fails_the_pipeline_plainly(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    sim_post(sim, "/_sim/config", {"url_ttl_s": 0.0})
    status = run_one(rt, request_fields())
    assert status["status"] == "failed"
    assert status["error"]["code"] == "result_expired"
    assert "expired" in status["error"]["message"]
    assert Decimal(status["cost_usd"]) > 0  # what was spent is still on the record


def test_an_unavailable_video_model_falls_back_to_the_next_one(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    sim_post(
        sim,
        "/_sim/faults",
        {
            "script": [
                {
                    "method": "POST",
                    "path": "/v1/videos/generations",
                    "status": 503,
                    "times": rt.settings.provider_max_attempts,
                }
            ]
        },
    )
    status = run_one(rt, request_fields())
    assert status["status"] == "succeeded"
    assert status["steps"][2]["model"] == "kling-v3-omni"
    assert sim_stats(sim)["duplicate_jobs"] == 0


def test_the_api_key_is_nowhere_in_the_database(rt: Runtime, request_fields: RequestFn) -> None:
    run_one(rt, request_fields())
    dump = "\n".join(rt.db.engine.raw_connection().iterdump())  # type: ignore[attr-defined]
    assert TEST_KEY not in dump
