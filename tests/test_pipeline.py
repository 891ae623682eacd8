"""The whole pipeline in drain mode: SQLite, local files, the simulator over real HTTP.

Drain mode runs the same step and poller code as the workers, in this process, with the
in-memory broker, so nothing here sleeps and hopes."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import func, make_url, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import QueuePool

from genline.config.clock import utcnow
from genline.config.constants import StepStatus
from genline.config.errors import IdempotencyConflict
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.engine import run_step
from genline.pipelines.estimate import estimate_pipeline
from genline.pipelines.request import validate_request
from genline.pipelines.runtime import Runtime
from genline.pipelines.submit import Accepted
from genline.provider.simulator import SimulatorHandle
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, Step
from genline.workers.drain import drain
from lab.chaos_faults import drop_pg_connections
from tests.conftest import TEST_KEY
from tests.support.drive import next_nudge, nudges, sim_stats

RequestFn = Callable[..., dict[str, Any]]


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
    assert task_id is not None  # a finished job: the provider named it at the submit
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
    assert chat.prompt_tokens is not None and chat.completion_tokens is not None  # a chat call's usage
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
    run_step(rt, next_nudge(rt))  # copy
    image_step = next_nudge(rt)
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
    run_step(rt, next_nudge(rt))  # copy
    image_step = next_nudge(rt)
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
    sqlite = rt.db.engine.raw_connection().driver_connection
    assert isinstance(sqlite, sqlite3.Connection)  # the ``rt`` fixture's database is SQLite
    dump = "\n".join(sqlite.iterdump())
    assert TEST_KEY not in dump


# --- accepting a pipeline: the rows, the idempotency key, a race on it, on SQLite and PostgreSQL ----
def test_a_submit_writes_the_pipeline_and_its_steps_as_the_models_define_them(
    either_rt: Runtime, request_fields: RequestFn
) -> None:
    rt = either_rt
    fields = request_fields(copy_model="claude-haiku", callback_url="https://hooks.example.com/done")
    accepted = Genline(runtime=rt).submit(fields)
    assert accepted.created and accepted.status == "pending"
    request = validate_request(fields, rt.catalog, upload_dirs=rt.settings.upload_dirs)
    with rt.db.transaction() as s:
        p = s.get_one(Pipeline, accepted.pipeline_id)
        steps = s.scalars(select(Step).where(Step.pipeline_id == p.id).order_by(Step.position)).all()
    assert (p.user_id, p.feature, p.profile) == ("seller-1", "listing-video", "standard")
    assert p.description == fields["description"]
    assert p.image_ref == f"inputs/{request.image.sha256}.png" and p.image_url  # the uploaded file, stored
    assert (p.callback_url, p.priority) == ("https://hooks.example.com/done", "interactive")
    assert p.models == {"copy": "claude-haiku"}
    assert (p.idempotency_key, p.request_hash) == (fields["idempotency_key"], request.fingerprint())
    assert (p.status, p.error_code, p.error_message, p.finished_at) == ("pending", None, None, None)
    estimate = estimate_pipeline(rt.catalog, "standard", description=request.description, models=request.models)
    assert abs(p.estimated_cost_usd - estimate.total_usd) < Decimal("0.000001") and p.cost_usd == 0
    assert p.created_at == p.updated_at and p.created_at.tzinfo is not None
    assert abs((utcnow() - p.created_at).total_seconds()) < 60
    assert [(st.position, st.kind, st.status, st.attempts) for st in steps] == [
        (0, "copy", "queued", 0),
        (1, "image", "pending", 0),
        (2, "video", "pending", 0),
        (3, "store", "pending", 0),
    ]
    for st in steps:
        assert (st.model, st.output, st.error_code, st.error_message) == (None, None, None, None)
        assert (st.deadline_at, st.started_at, st.finished_at) == (None, None, None)
        assert st.created_at == st.updated_at == p.created_at
    assert list(nudges(rt).sent) == [(steps[0].id, "genline.copy")]


def test_a_repeated_key_returns_the_same_pipeline_and_a_changed_request_is_refused(
    either_rt: Runtime, request_fields: RequestFn
) -> None:
    rt, api = either_rt, Genline(runtime=either_rt)
    fields = request_fields(idempotency_key="order-7")
    first = api.submit(fields)
    again = api.submit(fields)
    assert (again.pipeline_id, again.created, again.status) == (first.pipeline_id, False, "pending")
    with pytest.raises(IdempotencyConflict) as info:
        api.submit(request_fields(idempotency_key="order-7", description="A different product."))
    assert (info.value.code, info.value.field) == ("idempotency_conflict", "idempotency_key")
    assert first.pipeline_id in info.value.message
    other_user = api.submit(request_fields(idempotency_key="order-7", user_id="seller-2"))  # keys are per user
    assert other_user.created and other_user.pipeline_id != first.pipeline_id
    assert _counts(rt) == (2, 8)
    assert len(nudges(rt).sent) == 2


@pytest.mark.integration
def test_a_submit_gives_its_postgres_connection_back_out_of_autocommit(
    pg_url: str, make_settings: Callable[..., Settings], request_fields: RequestFn
) -> None:
    """The submit's statement runs in autocommit, set on the driver; the pooled connection must come
    back as SQLAlchemy lent it, or the next transaction on it would commit statement by statement."""
    settings = make_settings(GENLINE_DATABASE_URL=pg_url)
    upgrade(pg_url)
    rt = Runtime.from_settings(settings)

    def lent_in_autocommit() -> bool:
        pool = rt.db.engine.pool
        assert isinstance(pool, QueuePool)  # PostgreSQL's default pool, which counts its connections
        with rt.db.engine.connect() as conn:  # submits run one at a time: the pool holds one connection
            assert pool.checkedout() == 1 and pool.checkedin() == 0
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            return driver.autocommit

    try:
        api = Genline(runtime=rt)
        fields = request_fields(idempotency_key="order-8")
        assert api.submit(fields).created
        assert not lent_in_autocommit()
        assert not api.submit(fields).created  # the key found taken: the conflict's own query follows
        assert not lent_in_autocommit()
        with pytest.raises(IdempotencyConflict):
            api.submit(request_fields(idempotency_key="order-8", description="Another product."))
        assert not lent_in_autocommit()
    finally:
        rt.close()


def test_two_submits_with_one_key_at_once_both_get_the_one_pipeline(
    either_rt: Runtime, request_fields: RequestFn
) -> None:
    rt, api = either_rt, Genline(runtime=either_rt)
    keys = [f"race-{i}" for i in range(8)]
    results: dict[str, list[Accepted]] = {key: [] for key in keys}
    errors: list[BaseException] = []
    fields = {key: request_fields(idempotency_key=key) for key in keys}

    def submit_all(barrier: threading.Barrier) -> None:
        try:
            for key in keys:
                barrier.wait(timeout=30)
                results[key].append(api.submit(fields[key]))
        except BaseException as exc:  # noqa: BLE001  # reported by the test below
            errors.append(exc)
            barrier.abort()  # the other thread stops too, rather than wait out the timeout

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=submit_all, args=(barrier,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for key in keys:
        a, b = results[key]
        assert a.pipeline_id == b.pipeline_id and sorted([a.created, b.created]) == [False, True], key
    assert _counts(rt) == (len(keys), 4 * len(keys))
    assert len(nudges(rt).sent) == len(keys)  # one nudge per pipeline


@pytest.mark.integration
def test_a_submit_on_a_dropped_postgres_connection_fails_plainly_and_the_next_one_works(
    pg_url: str, make_settings: Callable[..., Settings], request_fields: RequestFn
) -> None:
    settings = make_settings(GENLINE_DATABASE_URL=pg_url)
    upgrade(pg_url)
    rt = Runtime.from_settings(settings)
    try:
        api = Genline(runtime=rt)
        api.submit(request_fields())  # a pooled connection now exists
        assert drop_pg_connections(make_url(pg_url).database or "") >= 1
        fields = request_fields()
        with pytest.raises(OperationalError):  # SQLAlchemy's error, as from any other statement
            api.submit(fields)
        again = api.submit(fields)  # the dead connection left the pool
        assert again.created
        assert _counts(rt) == (2, 8)
        assert len(nudges(rt).sent) == 2  # nothing nudged for the failure
    finally:
        rt.close()


def _counts(rt: Runtime) -> tuple[int, int]:
    with rt.db.transaction() as s:
        return (
            s.scalar(select(func.count()).select_from(Pipeline)) or 0,
            s.scalar(select(func.count()).select_from(Step)) or 0,
        )
