"""The poller's PostgreSQL path (one-statement claim, bulk routine update, audit by COPY, the ORM
only for jobs that end) on a real database against the real simulator. The poller's HTTP readers
need no database: tests/test_poll_reader.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from genline.config.settings import Settings
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, Step
from genline.workers import poller as poller_module
from genline.workers.poller import QUIET_ROUND, Poller
from lab.bench_http import create_tasks
from tests.conftest import TEST_KEY

INTERVAL_S = 2.0
LONG_S = 3600.0  # a render that stays in flight for the whole test
SUBMITTED_AGO_S = 2900.0  # past 80% of the estimate, under 200%: the next poll is one interval away
SLACK_S = 0.05  # rounding between our clock, PostgreSQL's timestamps and float epochs


@pytest.fixture
def pg_rt(pg_url: str, sim: SimulatorHandle, make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    upgrade(pg_url)
    # The rounds' mechanics at a plain cadence, with a request budget that covers every poll due
    # (tests/test_poll_timing.py and tests/test_request_budget.py test those).
    settings = make_settings(
        sim.base_url,
        GENLINE_DATABASE_URL=pg_url,
        GENLINE_POLL_INTERVAL_S=str(INTERVAL_S),
        GENLINE_POLL_SCHEDULE="fixed",
        GENLINE_PROVIDER_RATE_PER_S="1000000",
    )
    rt = Runtime.from_settings(settings)  # the in-memory dispatcher: nudges are kept in order
    yield rt
    rt.close()


def _sim_config(sim: SimulatorHandle, **changes: Any) -> None:
    httpx.post(f"{sim.base_url}/_sim/config", json=changes).raise_for_status()


def _faults(sim: SimulatorHandle, *entries: dict[str, Any]) -> None:
    httpx.post(f"{sim.base_url}/_sim/faults", json={"script": list(entries)}).raise_for_status()


def _submit(rt: Runtime, sim: SimulatorHandle, n: int, *, seconds: float, prefix: str) -> list[str]:
    _sim_config(sim, video_seconds=seconds)  # the simulator fixes a job's duration at its submit
    model = rt.catalog.profiles["standard"].video_models[0]
    return asyncio.run(create_tasks(sim.base_url, TEST_KEY, n, model=model, prefix=prefix))


def _seed(
    rt: Runtime, task_ids: list[str], *, prefix: str, status: str = "processing", due_ago_s: float = 1.0
) -> list[str]:
    """One pipeline per task: copy and image done, video waiting on the job, store pending. All due
    ``due_ago_s`` ago."""
    model = rt.catalog.profiles["standard"].video_models[0]
    now = datetime.now(UTC)
    with rt.db.transaction() as s:
        for i, task_id in enumerate(task_ids):
            pid = f"pl_{prefix}{i}"
            s.add(
                Pipeline(
                    id=pid,
                    user_id=f"user-{prefix}{i}",
                    feature=f"feature-{i % 3}",
                    profile="standard",
                    description="d",
                    image_ref="i",
                    image_url="https://x/i.png",
                    idempotency_key=f"{prefix}{i}",
                    request_hash="h",
                    status="running",
                )
            )
            for position, (kind, step_status) in enumerate(
                (("copy", "succeeded"), ("image", "succeeded"), ("video", "waiting"), ("store", "pending"))
            ):
                s.add(
                    Step(
                        id=f"st_{prefix}{i}_{position}",
                        pipeline_id=pid,
                        position=position,
                        kind=kind,
                        status=step_status,
                    )
                )
            s.flush()
            s.add(
                ProviderJob(
                    id=f"job_{prefix}{i}",
                    step_id=f"st_{prefix}{i}_2",
                    attempt=1,
                    idempotency_key=f"key-{prefix}{i}",
                    kind="video",
                    model=model,
                    task_id=task_id,
                    status=status,
                    units=6.0,
                    submitted_at=now - timedelta(seconds=SUBMITTED_AGO_S),
                    next_poll_at=now - timedelta(seconds=due_ago_s),
                )
            )
    return [f"job_{prefix}{i}" for i in range(len(task_ids))]


def _jobs(rt: Runtime) -> dict[str, ProviderJob]:
    with rt.db.transaction() as s:
        return {j.id: j for j in s.scalars(select(ProviderJob))}


def _polls_audited(rt: Runtime) -> list[ProviderCall]:
    with rt.db.transaction() as s:
        return list(s.scalars(select(ProviderCall).where(ProviderCall.operation == "poll")))


def _round(poller: Poller) -> int:
    async def go() -> int:
        try:
            return await poller.run_once()
        finally:
            await poller.aclose()

    return asyncio.run(go())


def test_a_round_on_postgres_leaves_every_job_and_the_audit_log_right(pg_rt: Runtime, sim: SimulatorHandle) -> None:
    rt = pg_rt
    long_ids = _seed(rt, _submit(rt, sim, 30, seconds=LONG_S, prefix="long"), prefix="long", due_ago_s=0.25)
    retry_tasks = _submit(rt, sim, 4, seconds=LONG_S, prefix="retry")
    retry_ids = _seed(rt, retry_tasks, prefix="retry")
    done_ids = _seed(rt, _submit(rt, sim, 5, seconds=0, prefix="done"), prefix="done")
    gone_ids = _seed(rt, ["task_the_provider_never_made"], prefix="gone")
    _faults(sim, *({"method": "GET", "path": f"/v1/tasks/{t}", "status": 503, "times": 1} for t in retry_tasks))
    everything = long_ids + retry_ids + done_ids + gone_ids

    due: dict[str, datetime] = {}
    for job_id, job in _jobs(rt).items():
        assert job.next_poll_at is not None
        due[job_id] = job.next_poll_at
    lateness: list[float] = []
    poller = Poller(rt, on_applied=lateness.extend)
    before = datetime.now(UTC)
    assert _round(poller) == len(everything)
    after = datetime.now(UTC)

    jobs = _jobs(rt)
    for job_id in long_ids:  # routine: the bulk update
        job = jobs[job_id]
        assert (job.status, job.progress, job.polls, job.lease_until) == ("pending", 0, 1, None)
        assert job.estimated_time_s == int(LONG_S)
        assert job.next_poll_at is not None
        # One interval after the poll was due (not after the round ended), unless that is less
        # than half an interval from when the answer was applied.
        cadence = due[job_id] + timedelta(seconds=INTERVAL_S)
        earliest = max(cadence, before + timedelta(seconds=INTERVAL_S / 2))
        latest = max(cadence, after + timedelta(seconds=INTERVAL_S / 2))
        assert earliest - timedelta(seconds=SLACK_S) <= job.next_poll_at <= latest + timedelta(seconds=SLACK_S)
    for job_id in retry_ids:  # a failed read: read again after the back-off, state kept
        job = jobs[job_id]
        assert (job.status, job.progress, job.polls, job.lease_until) == ("processing", 0, 1, None)
        assert job.next_poll_at is not None
        assert before + timedelta(seconds=2 * INTERVAL_S - SLACK_S) <= job.next_poll_at
        assert job.next_poll_at <= after + timedelta(seconds=2 * INTERVAL_S + SLACK_S)
    with rt.db.transaction() as s:
        for job_id in done_ids:  # ended: the job row, then the engine's finish_step
            job = s.get_one(ProviderJob, job_id)
            assert (job.status, job.progress, job.polls, job.lease_until, job.next_poll_at) == (
                "completed",
                100,
                1,
                None,
                None,
            )
            assert job.result and job.cost_usd > 0
            step = s.get_one(Step, job.step_id)
            assert step.status == "succeeded" and step.output and step.output["assets"]
            store = s.scalars(select(Step).where(Step.pipeline_id == step.pipeline_id, Step.position == 3)).one()
            assert store.status == "queued"
        gone = s.get_one(ProviderJob, gone_ids[0])
        assert (gone.status, gone.polls, gone.lease_until) == ("failed", 1, None)
        assert s.get_one(Step, gone.step_id).pipeline.status == "failed"
    nudged = []
    while (step_id := rt.dispatcher.pop()) is not None:  # type: ignore[attr-defined]
        nudged.append(step_id)
    assert sorted(nudged) == sorted(jobs[j].step_id[:-1] + "3" for j in done_ids)

    calls = _polls_audited(rt)  # one row per call, whatever its answer
    assert sorted(c.step_id or "" for c in calls) == sorted(jobs[j].step_id for j in everything)
    by_step = {c.step_id: c for c in calls}
    with rt.db.transaction() as s:
        for job_id in everything:
            job = jobs[job_id]
            call = by_step[job.step_id]
            pipeline = s.get_one(Step, job.step_id).pipeline
            assert (call.user_id, call.feature, call.pipeline_id, call.model) == (
                pipeline.user_id,
                pipeline.feature,
                pipeline.id,
                job.model,
            )
            expected_status = 503 if job_id in retry_ids else 404 if job_id in gone_ids else 200
            assert call.status_code == expected_status
            assert (call.cost_usd > 0) == (job_id in done_ids)
            assert call.ts.tzinfo is not None and before - timedelta(seconds=1) <= call.ts <= after
    assert len(lateness) == len(everything)  # each poll's lateness is told once

    assert _round(Poller(rt)) == 0  # nothing is due any more
    assert len(_polls_audited(rt)) == len(everything)


def test_a_job_that_ends_or_is_cancelled_between_claim_and_apply_is_not_overwritten(
    pg_rt: Runtime, sim: SimulatorHandle
) -> None:
    rt = pg_rt
    long_ids = _seed(rt, _submit(rt, sim, 6, seconds=LONG_S, prefix="l"), prefix="l")
    done_ids = _seed(rt, _submit(rt, sim, 2, seconds=0, prefix="d"), prefix="d")
    poller = Poller(rt)
    claimed = poller.claim()
    assert {c.job_id for c in claimed} == set(long_ids + done_ids)
    cancelled = [long_ids[0], done_ids[0]]  # one answer routine, one an ending
    with rt.db.transaction() as s:  # what cancel_pipeline does to a job the provider stopped
        s.execute(
            update(ProviderJob)
            .where(ProviderJob.id.in_(cancelled))
            .values(status="cancelled", next_poll_at=None, error_code="cancelled")
        )

    async def poll_and_apply() -> None:
        try:
            answers = await poller.poll(claimed)
            await asyncio.to_thread(poller.apply, claimed, answers, poller.audit.drain())
        finally:
            await poller.aclose()

    asyncio.run(poll_and_apply())
    jobs = _jobs(rt)
    for job_id in cancelled:
        job = jobs[job_id]
        assert (job.status, job.next_poll_at, job.polls, job.error_code) == ("cancelled", None, 0, "cancelled")
    with rt.db.transaction() as s:
        assert s.get_one(Step, jobs[done_ids[0]].step_id).status == "waiting"  # not completed by the late answer
    assert jobs[done_ids[1]].status == "completed"
    for job_id in long_ids[1:]:
        assert (jobs[job_id].polls, jobs[job_id].lease_until, jobs[job_id].status) == (1, None, "pending")
    assert len(_polls_audited(rt)) == len(claimed)  # the calls were made: each one is in the log


def test_the_running_poller_on_postgres_sees_jobs_through_to_their_end(pg_rt: Runtime, sim: SimulatorHandle) -> None:
    rt = pg_rt
    rt.settings = rt.settings.with_overrides(poll_interval_s=0.05)
    _sim_config(sim, video_seconds=0.3)
    model = rt.catalog.profiles["standard"].video_models[0]
    tasks = asyncio.run(create_tasks(sim.base_url, TEST_KEY, 20, model=model, prefix="run"))
    job_ids = _seed(rt, tasks, prefix="run")

    async def scenario() -> dict[str, str]:
        poller = Poller(rt)
        stop = asyncio.Event()
        running = asyncio.create_task(poller.run(stop, sweep_every_s=3600))
        statuses: dict[str, str] = {}
        for _ in range(300):  # until every job has ended (or give up after many tries)
            await asyncio.sleep(0.1)
            statuses = {j.id: j.status for j in (await asyncio.to_thread(_jobs, rt)).values()}
            if all(v == "completed" for v in statuses.values()):
                break
        stop.set()
        await running
        return statuses

    statuses = asyncio.run(scenario())
    assert statuses == {j: "completed" for j in job_ids}
    calls = _polls_audited(rt)
    jobs = _jobs(rt)
    assert len(calls) == sum(j.polls for j in jobs.values())  # one audit row per poll, no more, no less
    assert all(j.lease_until is None for j in jobs.values())


def _claims_while(poller: Poller, busy: Callable[[], bool]) -> list[int]:
    """Count the poller's claims taken while ``busy()`` (the returned list's one item)."""
    counted = [0]
    claim = poller.claim

    def watched(limit: int | None = None) -> list[Any]:
        counted[0] += busy()
        return claim(limit)

    poller.claim = watched  # type: ignore[method-assign]
    return counted


def _run_until_each_job_is_read(rt: Runtime, poller: Poller) -> None:
    """Run the poller until every job has been read (well inside the 2 s cadence: each is due once)."""

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(poller.run(stop, sweep_every_s=3600))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if all(j.polls for j in (await asyncio.to_thread(_jobs, rt)).values()):
                break
        stop.set()
        await running

    asyncio.run(scenario())


# on time: 3 rounds of ~0.06 s, so the last claim's earliest job is well under the 0.5 s mark
@pytest.mark.parametrize(("due_ago_s", "jobs", "behind"), [(1.0, 30, True), (0.0, 12, False)])
def test_behind_schedule_the_next_round_is_claimed_while_this_one_is_read_and_no_job_is_read_twice(
    pg_rt: Runtime, sim: SimulatorHandle, due_ago_s: float, jobs: int, behind: bool
) -> None:
    rt = pg_rt
    rt.settings = rt.settings.with_overrides(poller_batch=4)  # more due jobs than that: claims come back full
    tasks = _submit(rt, sim, jobs, seconds=LONG_S, prefix="ahead")
    job_ids = _seed(rt, tasks, prefix="ahead", due_ago_s=due_ago_s)
    poller = Poller(rt)
    reading = [False]
    claims_during_reads = _claims_while(poller, lambda: reading[0])
    poll = poller.poll

    async def watched_poll(claimed: list[Any]) -> list[Any]:
        reading[0] = True
        try:
            await asyncio.sleep(0.05)  # a slow provider: the claim taken ahead has time to land
            return await poll(claimed)
        finally:
            reading[0] = False

    poller.poll = watched_poll  # type: ignore[method-assign]

    _run_until_each_job_is_read(rt, poller)
    rows = _jobs(rt)
    assert {j: rows[j].polls for j in job_ids} == {j: 1 for j in job_ids}
    assert all(j.lease_until is None for j in rows.values())
    assert len(_polls_audited(rt)) == len(job_ids)
    if behind:  # a second late (half a cadence): rounds overlap, claims taken while reads are in flight
        assert claims_during_reads[0] >= 3
    else:  # on time: each round is claimed when the last one's reads are done, so none is held back
        assert claims_during_reads[0] == 0


@pytest.mark.parametrize(("jobs", "quiet"), [(QUIET_ROUND, True), (QUIET_ROUND * 3, False)])
def test_a_quiet_round_is_written_before_the_next_claim_and_a_busier_one_while_it(
    pg_rt: Runtime, sim: SimulatorHandle, jobs: int, quiet: bool
) -> None:
    rt = pg_rt
    job_ids = _seed(rt, _submit(rt, sim, jobs, seconds=LONG_S, prefix="quiet"), prefix="quiet")
    poller = Poller(rt)
    writing = [False]
    claims_during_writes = _claims_while(poller, lambda: writing[0])
    write = poller._apply_and_move_on

    def watched_write(*args: Any) -> None:
        writing[0] = True
        try:
            time.sleep(0.2)  # a slow database: a claim taken meanwhile has time to start
            write(*args)
        finally:
            writing[0] = False

    poller._apply_and_move_on = watched_write  # type: ignore[method-assign,assignment]

    _run_until_each_job_is_read(rt, poller)
    assert {j: r.polls for j, r in _jobs(rt).items() if j in job_ids} == {j: 1 for j in job_ids}
    if quiet:  # next to nothing due: the answers (and the next steps' nudges) go first
        assert claims_during_writes[0] == 0
    else:  # a larger round is written while the next is claimed
        assert claims_during_writes[0] >= 1


def _round_sizes(poller: Poller, after_first: Callable[[], None] = lambda: None) -> list[int]:
    """The size of each claim the poller takes (empty ones too); ``after_first`` runs once, just
    after the first claim."""
    sizes: list[int] = []
    claim = poller.claim

    def watched(limit: int | None = None) -> list[Any]:
        claimed = claim(limit)
        sizes.append(len(claimed))
        if len(sizes) == 1:
            after_first()
        return claimed

    poller.claim = watched  # type: ignore[method-assign]
    return sizes


def _due_in(rt: Runtime, seconds_by_job: dict[str, float]) -> None:
    """Each job falls due that many seconds from now (one transaction)."""
    with rt.db.transaction() as s:
        now = datetime.now(UTC)
        for job_id, seconds in seconds_by_job.items():
            due = now + timedelta(seconds=seconds)
            s.execute(update(ProviderJob).where(ProviderJob.id == job_id).values(next_poll_at=due))


def test_a_quiet_round_that_took_every_due_job_looks_for_the_next_one_instead_of_claiming_again(
    pg_rt: Runtime, sim: SimulatorHandle
) -> None:
    rt = pg_rt
    job_ids = _seed(rt, _submit(rt, sim, 3, seconds=LONG_S, prefix="caught"), prefix="caught")
    _due_in(rt, dict.fromkeys(job_ids, 60))

    def fall_due() -> None:  # once the poller has settled (its doorbell's first ring answered)
        _due_in(rt, {job_ids[0]: 0, job_ids[1]: 0, job_ids[2]: 0.15})  # an idle poller looks every 0.25 s

    poller = Poller(rt)
    sizes = _round_sizes(poller)
    threading.Timer(0.5, fall_due).start()
    _run_until_each_job_is_read(rt, poller)
    assert sorted(j.polls for j in _jobs(rt).values()) == [1, 1, 1]
    first = next(i for i, n in enumerate(sizes) if n)
    # the loop before claimed again at once after a round, and found nothing due: 2, 0, 1
    assert sizes[first : first + 2] == [2, 1]


def test_jobs_falling_due_just_after_a_quiet_round_share_the_next_round(
    pg_rt: Runtime, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a busy spell of small rounds, the next claim waits until ``COALESCE_S`` after the last
    (scaled up here so that the test does not race the rounds: 0.3 s, half the cadence being 1 s)."""
    rt = pg_rt
    monkeypatch.setattr(poller_module, "COALESCE_S", 0.3)
    job_ids = _seed(rt, _submit(rt, sim, 3, seconds=LONG_S, prefix="share"), prefix="share")
    _due_in(rt, dict.fromkeys(job_ids[1:], 60))  # until the first claim: then one due in 0.05 s, one in 0.2 s

    def two_fall_due() -> None:
        _due_in(rt, {job_ids[1]: 0.05, job_ids[2]: 0.2})

    poller = Poller(rt)
    sizes = _round_sizes(poller, after_first=two_fall_due)
    _run_until_each_job_is_read(rt, poller)
    assert sorted(j.polls for j in _jobs(rt).values()) == [1, 1, 1]
    assert sizes[:2] == [1, 2]  # with no wait: 1, 1, 1 (each claimed as it falls due)


def test_a_poller_that_stops_behind_schedule_gives_back_the_round_it_claimed_ahead(
    pg_rt: Runtime, sim: SimulatorHandle
) -> None:
    rt = pg_rt
    rt.settings = rt.settings.with_overrides(poller_batch=4)
    job_ids = _seed(rt, _submit(rt, sim, 12, seconds=LONG_S, prefix="stop"), prefix="stop")
    poller = Poller(rt)
    stop = asyncio.Event()
    poll = poller.poll

    async def first_round_then_stop(claimed: list[Any]) -> list[Any]:
        await asyncio.sleep(0.1)  # the claim taken ahead lands meanwhile
        stop.set()
        return await poll(claimed)

    poller.poll = first_round_then_stop  # type: ignore[method-assign]
    asyncio.run(poller.run(stop, sweep_every_s=3600))
    jobs = _jobs(rt)
    read = [j for j in job_ids if jobs[j].polls]
    assert len(read) == 4  # one round was read
    assert all(jobs[j].lease_until is None for j in job_ids)  # the one claimed ahead was given back
    assert Poller(rt).claim()  # and is there for the next poller at once, not after its lease


def test_audit_rows_by_copy_are_the_rows_an_insert_writes(pg_rt: Runtime) -> None:
    from decimal import Decimal
    from zoneinfo import ZoneInfo

    from genline.pipelines.audit import _COPY_TYPES, audit_row, write_audit, write_audit_many
    from genline.provider.gateway import CallContext, CallRecord

    def records(pipeline_id: str) -> list[CallRecord]:
        ctx = CallContext("user-1", "listing", pipeline_id, "st_x", "wan-2.7-image")
        bare = CallContext(pipeline_id=pipeline_id)  # every other field NULL
        odd = CallContext("usér\tone\nline", "fête", pipeline_id, "st_y", "sora-2")  # tabs, newlines, not ASCII
        at = datetime(2026, 11, 27, 8, 0, 1, 123456, tzinfo=UTC)
        berlin = datetime(2026, 11, 27, 9, 0, 2, tzinfo=ZoneInfo("Europe/Berlin"))  # not UTC: converted
        return [
            CallRecord(ctx, "poll", at, latency_ms=1.25, status_code=200, request_id="req_1"),
            CallRecord(ctx, "poll", berlin, status_code=503, error_code="provider_unavailable"),
            CallRecord(ctx, "poll", at, status_code=200, units=5.0, cost_usd=Decimal("0.123456")),
            CallRecord(bare, "chat", at, prompt_tokens=12, completion_tokens=34, cost_usd=Decimal("0.000017")),
            CallRecord(odd, "submit", at, latency_ms=3, status_code=400, error_code="bad\\req", units=8),  # ints
        ]

    with pg_rt.db.transaction() as s:
        write_audit(s, records("pl_insert"))
        write_audit_many(s, records("pl_copy"))
    columns = [c.key for c in ProviderCall.__table__.columns if c.key not in ("id", "pipeline_id")]
    with pg_rt.db.transaction() as s:
        rows = s.scalars(select(ProviderCall).order_by(ProviderCall.id)).all()
        by = {
            p: [tuple(getattr(r, c) for c in columns) for r in rows if r.pipeline_id == p]
            for p in ("pl_insert", "pl_copy")
        }
    assert len(by["pl_insert"]) == 5
    assert by["pl_copy"] == by["pl_insert"]
    assert [name for name, _ in _COPY_TYPES] == list(audit_row(records("pl")[0]))  # no column left out
    assert by["pl_copy"][1][0] == datetime(2026, 11, 27, 8, 0, 2, tzinfo=UTC)  # ts, back in UTC
