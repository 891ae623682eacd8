"""Polls timed by expected render time: the first read near the expected finish, progress
refining it, the fixed cadence kept for those who ask for it; a round that defers a first poll
makes no request."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

import genline.workers.poller as poller_module
from genline.config.clock import utcnow
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext
from genline.provider.simulator import SimulatorHandle
from genline.provider.stages import RequestBudget
from genline.storage.models import ProviderJob
from genline.workers.poller import EARLY_S, LEAD, Claimed, NotYet, Poller, first_poll_at, next_delay, plan_delay
from tests.support.drive import nudges, run_until, sim_config, sim_stats

INTERVAL = 2.0


def test_the_first_poll_comes_near_the_expected_finish_not_at_the_first_interval() -> None:
    assert first_poll_at(1000.0, 90, 1001.0, INTERVAL) == pytest.approx(1000.0 + LEAD * 90)
    assert first_poll_at(1000.0, None, 1001.0, INTERVAL) is None  # nothing to expect: the cadence
    assert first_poll_at(1000.0, 2, 1001.0, INTERVAL) is None  # nearer than a cadence: read now


def test_progress_points_to_the_finish_and_the_read_comes_just_after_it() -> None:
    # 60% after 60 s: done by 100 s (progress is rounded down), so read once, just after that
    delay = plan_delay(INTERVAL, 60.0, 90, 60, schedule="expected")
    assert 40.0 <= delay <= 41.0
    # a job past what its progress promised is read at the cadence
    assert plan_delay(INTERVAL, 120.0, 90, 99, schedule="expected") == INTERVAL
    # no progress yet (queued): at LEAD of the estimate
    assert plan_delay(INTERVAL, 10.0, 90, 0, schedule="expected") == pytest.approx(LEAD * 90 - 10)


def test_the_fixed_schedule_keeps_the_plain_cadence() -> None:
    for elapsed, estimate, progress in ((10.0, 90, 10), (80.0, 90, 88), (100.0, None, 50)):
        assert plan_delay(INTERVAL, elapsed, estimate, progress, schedule="fixed") == next_delay(
            INTERVAL, elapsed, estimate
        )
    assert plan_delay(INTERVAL, 75.0, 90, 83, schedule="fixed") == INTERVAL


def _one_round(poller: Poller) -> int:
    async def go() -> int:
        try:
            return await poller.run_once()
        finally:
            await poller.aclose()

    return asyncio.run(go())


def _runtime(sim: SimulatorHandle, make_settings: object, **env: str) -> Runtime:
    from genline.storage.migrate import upgrade

    env = {"GENLINE_POLL_SCHEDULE": "expected", **env}  # as shipped, and whatever the environment says
    settings: Settings = make_settings(sim.base_url, GENLINE_PROVIDER_RATE_PER_S="100000", **env)  # type: ignore[operator]
    upgrade(settings.database_url)
    return Runtime.from_settings(settings)


def test_a_long_render_is_read_a_few_times_not_every_interval(
    sim: SimulatorHandle, make_settings: object, request_fields: object
) -> None:
    """A 60 s render, at a 1 s cadence: the first due round moves the job's first poll to near
    its finish without a request; then its progress is read once or twice, not 60 times."""
    rt = _runtime(sim, make_settings, GENLINE_POLL_INTERVAL_S="1")
    try:
        sim_config(sim, image_seconds=60, submit_shape="object")  # an answer with the estimate
        Genline(runtime=rt).submit(request_fields())  # type: ignore[operator]
        image_step = run_until(rt, "image")  # the copy runs; the image step is nudged
        run_step(rt, image_step)  # the image job is submitted
        with rt.db.transaction() as s:
            job = s.scalars(select(ProviderJob)).one()
            s.execute(update(ProviderJob).values(next_poll_at=job.submitted_at))  # due now
        polls_before = sim_stats(sim)["polls_total"]
        assert _one_round(Poller(rt)) == 1  # claimed ...
        assert sim_stats(sim)["polls_total"] == polls_before  # ... and no request made
        with rt.db.transaction() as s:
            job = s.scalars(select(ProviderJob)).one()
            assert job.polls == 0 and job.next_poll_at is not None and job.submitted_at is not None
            wait = (job.next_poll_at - job.submitted_at).total_seconds()
        assert wait == pytest.approx(LEAD * 60, abs=1.0)
    finally:
        rt.close()


def test_with_the_fixed_schedule_the_first_poll_is_one_interval_after_the_submit(
    sim: SimulatorHandle, make_settings: object, request_fields: object
) -> None:
    rt = _runtime(sim, make_settings, GENLINE_POLL_INTERVAL_S="1", GENLINE_POLL_SCHEDULE="fixed")
    try:
        sim_config(sim, image_seconds=60, submit_shape="object")  # an answer with the estimate
        Genline(runtime=rt).submit(request_fields())  # type: ignore[operator]
        run_step(rt, run_until(rt, "image"))
        with rt.db.transaction() as s:
            job = s.scalars(select(ProviderJob)).one()
            s.execute(update(ProviderJob).values(next_poll_at=job.submitted_at))
        polls_before = httpx.get(f"{sim.base_url}/_sim/stats").json()["polls_total"]
        assert _one_round(Poller(rt)) == 1
        assert httpx.get(f"{sim.base_url}/_sim/stats").json()["polls_total"] == polls_before + 1  # read
    finally:
        rt.close()


@pytest.mark.parametrize(("due_in_s", "claimed"), [(EARLY_S * 0.75, True), (EARLY_S * 2, False)])
def test_a_job_is_claimed_just_before_it_is_due_so_its_read_goes_out_on_time(
    sim: SimulatorHandle,
    make_settings: object,
    request_fields: object,
    monkeypatch: pytest.MonkeyPatch,
    due_in_s: float,
    claimed: bool,
) -> None:
    rt = _runtime(sim, make_settings, GENLINE_POLL_INTERVAL_S="1", GENLINE_POLL_SCHEDULE="fixed")
    try:
        Genline(runtime=rt).submit(request_fields())  # type: ignore[operator]
        run_step(rt, run_until(rt, "image"))
        now = utcnow()
        with rt.db.transaction() as s:
            s.execute(update(ProviderJob).values(next_poll_at=now + timedelta(seconds=due_in_s)))
        monkeypatch.setattr(poller_module, "utcnow", lambda: now)  # the claim happens at ``now``
        assert len(Poller(rt).claim()) == (1 if claimed else 0)
    finally:
        rt.close()


def _claimed(job: str, *, polls: int, due_s: float, submitted_s: float, estimate: int) -> Claimed:
    return Claimed(job, f"task-{job}", "video", f"st-{job}", CallContext(model="m"), 6.0, estimate, submitted_s,
                   due_s, polls, float("inf"))  # fmt: skip


def test_when_the_budget_runs_short_reads_that_find_finished_jobs_go_first(
    sim: SimulatorHandle, make_settings: object
) -> None:
    """``expected``: a first read (it only learns how far a long render has got) is funded after
    the reads of jobs that should just have finished, though it fell due earlier."""
    rt = _runtime(sim, make_settings)
    try:
        now = time.time()
        claimed = [
            _claimed("progress", polls=0, due_s=now - 5, submitted_s=now - 40, estimate=50),  # finishes in ~10 s
            _claimed("finish", polls=1, due_s=now - 1, submitted_s=now - 30, estimate=29),  # due at its finish
            _claimed("late", polls=3, due_s=now - 3, submitted_s=now - 90, estimate=60),  # past its estimate
        ]
        order = Poller(rt).plan_reads(claimed, [None] * 3)  # type: ignore[list-item]
        assert [claimed[i].job_id for i in order] == ["late", "finish", "progress"]
        fixed = rt.settings.with_overrides(poll_schedule="fixed")
        rt.settings = fixed
        assert Poller(rt).plan_reads(claimed, [None] * 3) == [0, 1, 2]  # type: ignore[list-item]
    finally:
        rt.close()


def test_a_round_keeps_drawing_as_the_budget_refills_instead_of_reading_only_the_first_tokens(
    sim: SimulatorHandle, make_settings: object, request_fields: object
) -> None:
    """A budget of 100 a second with a burst of 10 leaves the poller 7 tokens at once; within one
    round (``PACE_S``, 0.5 s) it draws again as tokens come, and reads more than those 7, but not
    the 150 reads asked for: the rest wait, and the stretch is visible."""
    rt = _runtime(sim, make_settings, GENLINE_POLL_SCHEDULE="fixed")
    try:
        rt.budget = RequestBudget(rt.shared, rate_per_s=100, burst=10, provider="paced")
        poller = Poller(rt)
        sim_config(sim, image_seconds=600)
        api = Genline(runtime=rt)
        for i in range(3):
            api.submit(request_fields(description=f"Mug number {i}, speckled glaze."))  # type: ignore[operator]
        while (step := nudges(rt).pop()) is not None:
            run_step(rt, step)  # the copies, then the image submits (their jobs render for 10 min)
        with rt.db.transaction() as s:
            jobs = list(s.scalars(select(ProviderJob)))
        now = time.time()
        claimed = []
        for n in range(150):  # reads of the same few jobs: only the reads are counted, nothing applied
            job = jobs[n % len(jobs)]
            c = _claimed(job.id, polls=1, due_s=now, submitted_s=now - 5, estimate=600)
            c.task_id, c.step_id = job.task_id or "", job.step_id
            claimed.append(c)

        async def go() -> list[object]:
            try:
                return await poller.poll(claimed)  # type: ignore[return-value]
            finally:
                await poller.aclose()

        answers = asyncio.run(go())
        read = sum(1 for a in answers if not isinstance(a, NotYet))
        assert 10 < read < len(claimed)  # more than one draw's worth, and no more than the budget gave
        assert poller.stretched_since is not None  # the rest waited: the stretch is visible
    finally:
        rt.close()
