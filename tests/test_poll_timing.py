"""Polls timed by expected render time: the first read near the expected finish, progress
refining it, the fixed cadence kept for those who ask for it; a round that defers a first poll
makes no request."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import select, update

from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from genline.storage.models import ProviderJob
from genline.workers.poller import LEAD, Poller, first_poll_at, next_delay, plan_delay
from tests.support.drive import run_until, sim_config, sim_stats

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
