"""The worker's step path: two transactions per step, and every guarantee the extra ones used to give.

A step is claimed in one transaction (the media steps' intent and the copy step's "stored already"
read go with it) and completed in one (the held audit row and the stored objects go with it). These
tests count the transactions, and break the database at the exact statement that matters to show
what a rollback leaves: an audited call, no second paid job, no half-recorded copy, no overwritten
cancel. Drain mode on SQLite, the simulator over real HTTP; the last tests repeat the parts that
differ on PostgreSQL (marked integration).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

import genline.pipelines.engine as engine
from genline.config.clock import utcnow
from genline.config.constants import JobStatus, StepStatus
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.audit import DatabaseAuditSink
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext, CallRecord
from genline.provider.simulator import SimulatorHandle
from genline.provider.wire import SubmitResult
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, Step, StoredObject
from genline.workers.drain import drain, jobs_in_flight
from genline.workers.poller import Poller
from tests.support.drive import backoff_over, kind_of, next_nudge, nudges, output_of, run_until, sim_stats, step_row

RequestFn = Callable[..., dict[str, Any]]


def calls(rt: Runtime, pipeline_id: str, operation: str) -> list[ProviderCall]:
    with rt.db.transaction() as s:
        return list(
            s.scalars(
                select(ProviderCall).where(ProviderCall.pipeline_id == pipeline_id, ProviderCall.operation == operation)
            )
        )


@contextmanager
def failing_once(rt: Runtime, statement_start: str) -> Iterator[list[str]]:
    """The first statement that starts with ``statement_start`` fails as a dropped connection would."""
    failed: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        if not failed and " ".join(statement.split()).startswith(statement_start):
            failed.append(statement)
            raise OperationalError(statement, params, Exception("injected: the database went away"))

    event.listen(rt.db.engine, "before_cursor_execute", before)
    try:
        yield failed
    finally:
        event.remove(rt.db.engine, "before_cursor_execute", before)


@contextmanager
def counting_commits(rt: Runtime) -> Iterator[list[int]]:
    commits = [0]

    def on_commit(conn: Any) -> None:
        commits[0] += 1

    event.listen(rt.db.engine, "commit", on_commit)
    try:
        yield commits
    finally:
        event.remove(rt.db.engine, "commit", on_commit)


# --- the cost of a step -------------------------------------------------------------------------------
def test_every_step_costs_the_worker_two_transactions_and_the_video_step_one_more_for_the_image(
    rt: Runtime, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields(image="https://images.example.com/mug.png")).pipeline_id
    per_kind: dict[str, int] = {}
    poller = Poller(rt)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(500):
            while (step_id := nudges(rt).pop()) is not None:
                kind = kind_of(rt, step_id)
                with counting_commits(rt) as commits:
                    run_step(rt, step_id)
                per_kind[kind] = commits[0]
            if not nudges(rt).sent and not loop.run_until_complete(poller.run_once()):
                if jobs_in_flight(rt) == 0:
                    break
                loop.run_until_complete(asyncio.sleep(0.01))  # the next poll is not due yet
    finally:
        loop.run_until_complete(poller.aclose())
        loop.close()
    assert api.status(pid)["status"] == "succeeded"
    # claim (+ intent / stored-already read) and completion (+ audit row / stored objects / task_id);
    # the video step also records the image it copied as it started, in a transaction of its own
    # (so the copy is on record even if the video's submit then fails)
    assert per_kind == {"copy": 2, "image": 2, "video": 3, "store": 2}


# --- invariant 2: intent before the submit, task_id right after it ----------------------------------
def test_the_intent_is_committed_before_the_submit_and_the_task_id_with_the_submits_audit_row(
    rt: Runtime, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    image_step = run_until(rt, "image")
    seen: list[tuple[str, str | None, int]] = []
    real_submit = rt.gateway.submit

    def submit(ctx: CallContext, kind: str, payload: dict[str, Any], idempotency_key: str) -> SubmitResult:
        with rt.db.transaction() as s:  # another transaction: only what was committed is visible
            job = s.scalars(select(ProviderJob).where(ProviderJob.idempotency_key == idempotency_key)).one()
        seen.append((job.status, job.task_id, len(calls(rt, pid, "submit"))))
        return real_submit(ctx, kind, payload, idempotency_key)

    rt.gateway.submit = submit  # type: ignore[method-assign]  # a spy on this one runtime's gateway
    run_step(rt, image_step)
    assert seen == [("intent", None, 0)]
    with rt.db.transaction() as s:
        job = s.scalars(select(ProviderJob).where(ProviderJob.step_id == image_step)).one()
        assert job.status == JobStatus.PENDING and job.task_id and job.next_poll_at is not None
        assert s.get_one(Step, image_step).status == StepStatus.WAITING
    assert len(calls(rt, pid, "submit")) == 1


def test_a_task_id_that_cannot_be_committed_is_audited_and_never_paid_twice(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    image_step = run_until(rt, "image")
    with failing_once(rt, "UPDATE provider_jobs SET task_id") as failed:
        run_step(rt, image_step)
    assert failed
    step = step_row(rt, pid, "image")
    assert step.status == StepStatus.QUEUED and step.error_code == "transient_error"
    assert len(calls(rt, pid, "submit")) == 1  # the held audit row was written on its own
    with rt.db.transaction() as s:
        job = s.scalars(select(ProviderJob).where(ProviderJob.step_id == image_step)).one()
        assert (job.status, job.task_id) == ("intent", None)  # kept: the next try reuses its key
        key = job.idempotency_key
    backoff_over(rt, image_step)
    run_step(rt, image_step)  # the retry (the sweeper's nudge)
    drain(rt)
    assert api.status(pid)["status"] == "succeeded"
    stats = sim_stats(sim)
    assert stats["duplicate_jobs"] == 0 and stats["jobs_created"][key] == 1 and stats["submit_calls"][key] == 2
    assert len(calls(rt, pid, "submit")) == 3  # both image submits and the video's, each audited once


def test_a_photo_that_cannot_be_read_leaves_no_intent_of_unknown_outcome(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    rt.settings = rt.settings.with_overrides(step_max_attempts=1)
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id  # an uploaded photo: read from our storage
    image_step = run_until(rt, "image")
    with rt.db.transaction() as s:
        ref = s.get_one(Pipeline, pid).image_ref
    rt.store.delete(ref)
    run_step(rt, image_step)
    assert api.status(pid)["status"] == "failed"
    with rt.db.transaction() as s:
        assert s.scalars(select(ProviderJob).where(ProviderJob.step_id == image_step)).all() == []
    assert sim_stats(sim)["jobs_total"] == 0


# --- the audit row of the copy step ------------------------------------------------------------------
def test_a_copy_step_whose_completion_rolls_back_still_audits_its_chat_call(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    copy_step = next_nudge(rt)
    with failing_once(rt, "UPDATE steps SET status=?, output=?") as failed:
        run_step(rt, copy_step)
    assert failed
    step = step_row(rt, pid, "copy")
    assert step.status == StepStatus.QUEUED and step.output is None
    assert not nudges(rt).sent  # nothing nudged for a rolled-back completion
    assert len(calls(rt, pid, "chat")) == 1
    backoff_over(rt, copy_step)
    run_step(rt, copy_step)
    drain(rt)
    status = api.status(pid)
    assert status["status"] == "succeeded"
    chats = calls(rt, pid, "chat")
    assert len(chats) == sim_stats(sim)["chat_calls"] == 2  # every call the provider billed is on record
    with rt.db.transaction() as s:
        total = s.scalar(select(func.sum(ProviderCall.cost_usd)).where(ProviderCall.pipeline_id == pid))
    assert total is not None  # the pipeline's calls are on record
    assert Decimal(status["cost_usd"]) == total.quantize(Decimal("0.000001"))


def test_a_successful_call_is_held_and_a_failed_one_written_at_once(rt: Runtime) -> None:
    sink = DatabaseAuditSink(rt.db)

    def record(error: str | None) -> CallRecord:
        return CallRecord(
            ctx=CallContext(pipeline_id="pl_x", model="m"), operation="chat", ts=utcnow(), error_code=error
        )

    def rows() -> int:
        with rt.db.transaction() as s:
            return (
                s.scalar(select(func.count()).select_from(ProviderCall).where(ProviderCall.pipeline_id == "pl_x")) or 0
            )

    with sink.holding() as hold:
        sink.record(record("provider_unavailable"))
        assert rows() == 1  # failed: at once, a backoff may follow
        sink.record(record(None))
        assert rows() == 1 and len(hold.records) == 1  # held for the step's next transaction
        with pytest.raises(RuntimeError), hold.committed_with(), rt.db.transaction():
            raise RuntimeError("the step's transaction rolled back")
        assert len(hold.records) == 1  # still held: that transaction did not commit
    assert rows() == 2  # the hold wrote it on its own when it ended
    sink.record(record(None))  # no hold: written at once, as always
    assert rows() == 3


# --- the store step ----------------------------------------------------------------------------------
def test_stored_objects_are_recorded_with_the_completion_or_not_at_all(rt: Runtime, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    store_step = run_until(rt, "store")
    with failing_once(rt, "UPDATE pipelines SET status=?") as failed:
        run_step(rt, store_step)
    assert failed
    with rt.db.transaction() as s:  # only the image, which the video step stored on its own
        kept = s.scalars(select(StoredObject).where(StoredObject.pipeline_id == pid)).all()
    assert [(o.kind, o.step_id) for o in kept] == [("image", step_row(rt, pid, "video").id)]
    assert step_row(rt, pid, "store").status == StepStatus.QUEUED
    backoff_over(rt, store_step)
    run_step(rt, store_step)  # copies again, to the same keys
    status = api.status(pid)
    assert status["status"] == "succeeded"
    with rt.db.transaction() as s:
        kinds = Counter(o.kind for o in s.scalars(select(StoredObject).where(StoredObject.pipeline_id == pid)))
    assert kinds == {"video": 1, "image": 1}
    assert Path(status["video"]["location"]).read_bytes()[4:8] == b"ftyp"


def test_a_copy_is_due_before_the_video_link_runs_out_not_the_image_link_stored_already(
    rt: Runtime, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    video_step = run_until(rt, "video")
    with rt.db.transaction() as s:  # the image was made first, so its link runs out first
        image = s.scalars(select(Step).where(Step.pipeline_id == pid, Step.kind == "image")).one()
        assert image.output is not None  # the image step has succeeded: the video step was nudged
        image_expiry = utcnow() + timedelta(minutes=5)
        image.output = {
            **image.output,
            "assets": [{**image.output["assets"][0], "expires_at": image_expiry.isoformat()}],
        }
    run_step(rt, video_step)
    run_until(rt, "store")
    video_expiry = datetime.fromisoformat(output_of(rt, pid, "video")["assets"][0]["expires_at"])
    assert image_expiry < video_expiry
    assert step_row(rt, pid, "store").deadline_at == video_expiry


# --- claims and cancels -------------------------------------------------------------------------------
def test_a_claim_made_on_a_stale_read_loses_to_the_one_that_got_there_first(
    rt: Runtime, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    copy_step = next_nudge(rt)
    with rt.db.transaction() as s:
        stale = engine.pipeline_rows(s, copy_step)  # what a second worker read before the first claimed
    first = engine._begin(rt, copy_step)
    assert first is not None and first.ctx.attempt == 1
    fresh = engine.pipeline_rows
    monkeypatch.setattr(engine, "pipeline_rows", lambda s, step_id: stale)
    assert engine._begin(rt, copy_step) is None
    step = step_row(rt, pid, "copy")
    assert (step.status, step.attempts) == (StepStatus.RUNNING, 1)
    # The first worker gave the step back, refunding the attempt (nothing reached the provider): it
    # is queued with the attempts the stale read saw, and still the stale claim must lose.
    engine._requeue(rt, copy_step, "provider_paused", "paused", refund=True)
    assert (step_row(rt, pid, "copy").status, step_row(rt, pid, "copy").attempts) == (StepStatus.QUEUED, 0)
    backoff_over(rt, copy_step)
    assert engine._begin(rt, copy_step) is None
    monkeypatch.setattr(engine, "pipeline_rows", fresh)
    again = engine._begin(rt, copy_step)
    assert again is not None and again.ctx.attempt == 1


def test_a_cancel_while_the_step_runs_is_not_overwritten_by_its_completion(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    copy_step = next_nudge(rt)
    real_chat = rt.gateway.chat

    def chat(*args: Any, **kwargs: Any) -> Any:
        answer = real_chat(*args, **kwargs)
        api.cancel(pid)  # the user cancels while the answer is on its way back
        return answer

    rt.gateway.chat = chat  # type: ignore[method-assign]  # a spy on this one runtime's gateway
    run_step(rt, copy_step)
    status = api.status(pid)
    assert status["status"] == "cancelled"
    assert [s["status"] for s in status["steps"]] == ["cancelled"] * 4
    assert not nudges(rt).sent
    assert len(calls(rt, pid, "chat")) == 1  # the call it made is on record all the same


def test_only_a_pipeline_with_a_callback_url_costs_a_callback_lookup(
    rt: Runtime, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    real = engine.notify_callback

    def spy(runtime: Runtime, pipeline_id: str) -> None:
        looked_up.append(pipeline_id)
        real(runtime, pipeline_id)

    monkeypatch.setattr(engine, "notify_callback", spy)
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    drain(rt)
    assert api.status(pid)["status"] == "succeeded"
    assert looked_up == []


# --- PostgreSQL ------------------------------------------------------------------------------------------
@pytest.fixture
def pg_rt(pg_url: str, sim: SimulatorHandle, make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    settings = make_settings(sim.base_url, GENLINE_DATABASE_URL=pg_url)
    upgrade(pg_url)
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.close()


@pytest.mark.integration
def test_on_postgres_a_pipeline_runs_with_the_same_rows_and_cost(
    pg_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=pg_rt)
    pid = api.submit(request_fields(callback_url=None)).pipeline_id
    drain(pg_rt)
    status = api.status(pid)
    assert status["status"] == "succeeded", status
    assert status["copy"] and status["video"]["content_type"] == "video/mp4"
    with pg_rt.db.transaction() as s:
        total = s.scalar(select(func.sum(ProviderCall.cost_usd)).where(ProviderCall.pipeline_id == pid))
        ops = Counter(s.scalars(select(ProviderCall.operation).where(ProviderCall.pipeline_id == pid)))
        steps = s.scalars(select(Step).where(Step.pipeline_id == pid).order_by(Step.position)).all()
    assert total is not None  # the pipeline's calls are on record
    assert Decimal(status["cost_usd"]) == total
    assert ops["chat"] == 1 and ops["submit"] == 2
    assert [st.attempts for st in steps] == [1, 1, 1, 1]
    assert isinstance(steps[0].output, dict) and steps[0].output["text"]  # JSON, not a string of JSON
    assert sim_stats(sim)["duplicate_jobs"] == 0


@pytest.mark.integration
def test_on_postgres_a_copy_another_worker_holds_is_skipped_for_the_next_most_urgent(
    pg_rt: Runtime, request_fields: RequestFn
) -> None:
    api = Genline(runtime=pg_rt)
    ids = [api.submit(request_fields()).pipeline_id for _ in range(2)]
    held = [run_until(pg_rt, "store") for _ in ids]
    urgent, other = held
    with pg_rt.db.transaction() as s:
        s.get_one(Step, urgent).deadline_at = utcnow()
    with pg_rt.db.engine.connect() as conn, conn.begin():  # another worker is on the urgent copy
        conn.exec_driver_sql("SELECT id FROM steps WHERE id = %(id)s FOR UPDATE", {"id": urgent})
        run_step(pg_rt, urgent)  # its nudge runs the next most urgent copy instead of waiting
        by_id = {st: step_row(pg_rt, pid, "store") for st, pid in zip(held, ids, strict=True)}
        assert by_id[other].status == StepStatus.SUCCEEDED
        assert by_id[urgent].status == StepStatus.QUEUED
    run_step(pg_rt, other)  # the other nudge finds the urgent copy free now
    assert [api.status(p)["status"] for p in ids] == ["succeeded", "succeeded"]


def test_an_image_link_that_ran_out_while_the_video_rendered_does_not_cost_the_video(
    rt: Runtime, request_fields: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import genline.pipelines.store as store
    from genline.config.errors import ResultExpired
    from genline.storage.transfer import copy_url_to_store as real_copy

    def image_link_gone(*args: Any, **kwargs: Any) -> Any:
        if kwargs["expect_type"] == "image":
            raise ResultExpired("The provider's result link expired before it could be copied.")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(store, "copy_url_to_store", image_link_gone)
    api = Genline(runtime=rt)
    accepted = api.submit(request_fields())
    drain(rt)
    status = api.status(accepted.pipeline_id)
    assert status["status"] == "succeeded", status
    assert Path(status["video"]["location"]).exists()
    assert status["image"]["expired"] is True and status["image"]["error_code"] == "result_expired"
    with rt.db.transaction() as s:
        kinds = s.scalars(select(StoredObject.kind).where(StoredObject.pipeline_id == accepted.pipeline_id)).all()
    assert kinds == ["video"]


def test_the_video_step_stores_the_image_while_the_video_renders_so_a_link_that_runs_out_later_costs_nothing(
    rt: Runtime, request_fields: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import genline.pipelines.store as store
    from genline.config.errors import ResultExpired
    from genline.storage.transfer import copy_url_to_store as real_copy

    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    video_step = run_until(rt, "video")
    image_url = output_of(rt, pid, "image")["assets"][0]["url"]
    run_step(rt, video_step)  # submits the video, then stores the image
    with rt.db.transaction() as s:
        image = s.scalars(select(StoredObject).where(StoredObject.pipeline_id == pid)).one()
    assert (image.kind, image.step_id) == ("image", video_step)
    assert Path(image.location).read_bytes() == httpx.get(image_url).content

    copied: list[str] = []

    def image_link_gone(*args: Any, **kwargs: Any) -> Any:  # the image's link has run out by now
        copied.append(kwargs["expect_type"])
        if kwargs["expect_type"] == "image":
            raise ResultExpired("The provider's result link expired before it could be copied.")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(store, "copy_url_to_store", image_link_gone)
    drain(rt)
    status = api.status(pid)
    assert status["status"] == "succeeded", status
    assert status["image"]["key"] == image.key and "expired" not in status["image"]
    assert copied == ["video"]  # the store step copied only the video
    # the store step's deadline is the video's link, not the image's (made earlier, gone earlier)
    video_expiry = datetime.fromisoformat(output_of(rt, pid, "video")["assets"][0]["expires_at"])
    assert step_row(rt, pid, "store").deadline_at == video_expiry


def test_an_image_the_video_step_could_not_copy_is_copied_by_the_store_step(
    rt: Runtime, request_fields: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import genline.pipelines.store as store
    from genline.config.errors import RetryableStorageError
    from genline.storage.transfer import copy_url_to_store as real_copy

    failures: list[str] = []

    def storage_hiccup_once(*args: Any, **kwargs: Any) -> Any:
        if kwargs["expect_type"] == "image" and not failures:
            failures.append("image")
            raise RetryableStorageError("The storage service did not answer.")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(store, "copy_url_to_store", storage_hiccup_once)
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    drain(rt)
    status = api.status(pid)
    assert status["status"] == "succeeded", status
    assert failures == ["image"]
    with rt.db.transaction() as s:
        rows = {o.kind: o.step_id for o in s.scalars(select(StoredObject).where(StoredObject.pipeline_id == pid))}
    assert rows == {"image": step_row(rt, pid, "store").id, "video": step_row(rt, pid, "store").id}
    assert Path(status["image"]["location"]).exists()


def test_an_image_copy_that_lands_while_the_store_step_copies_it_too_costs_the_store_step_nothing(
    rt: Runtime, request_fields: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import genline.pipelines.steps as steps
    import genline.pipelines.store as store
    from genline.pipelines.store import store_image_early as early
    from genline.storage.transfer import copy_url_to_store as real_copy

    # A video done at once: the store step starts before the video step's image copy has landed,
    # finds no image stored, copies it too, and the early copy's row commits meanwhile.
    held: list[Any] = []

    def store_steps_copy(*args: Any, **kwargs: Any) -> Any:
        info = real_copy(*args, **kwargs)
        if kwargs["expect_type"] == "image" and held:
            early(rt, held.pop())  # the video step's copy lands now, its row committed
        return info

    monkeypatch.setattr(steps, "store_image_early", lambda rt_, ctx: held.append(ctx))
    monkeypatch.setattr(store, "copy_url_to_store", store_steps_copy)
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    drain(rt)
    assert api.status(pid)["status"] == "succeeded" and not held
    video_step, store_step = step_row(rt, pid, "video"), step_row(rt, pid, "store")
    assert store_step.attempts == 1  # its completion did not trip over the image's row
    with rt.db.transaction() as s:
        rows = [(o.kind, o.step_id) for o in s.scalars(select(StoredObject).where(StoredObject.pipeline_id == pid))]
    assert sorted(rows) == [("image", video_step.id), ("video", store_step.id)]
    assert Path(api.status(pid)["image"]["location"]).exists()


def test_a_video_link_that_ran_out_still_fails_the_pipeline_plainly(
    rt: Runtime, request_fields: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import genline.pipelines.store as store
    from genline.config.errors import ResultExpired

    def video_link_gone(*args: Any, **kwargs: Any) -> Any:
        raise ResultExpired("The provider's result link expired before it could be copied.")

    monkeypatch.setattr(store, "copy_url_to_store", video_link_gone)
    api = Genline(runtime=rt)
    accepted = api.submit(request_fields())
    drain(rt)
    status = api.status(accepted.pipeline_id)
    assert status["status"] == "failed" and status["error"]["code"] == "result_expired"
