"""The poller's doorbell: a napping poller wakes when a rung job is due, not at the ring.

No database here: the rings are handed in as the LISTEN loop hands them (``Doorbell.ring``); the
ring itself, through PostgreSQL, is in tests/integration/test_postgres.py. The checks are on
order (before or after a due time, before a long nap's end), never on how fast anything is.
"""

from __future__ import annotations

import asyncio
import math
import time

from genline.workers.wakeup import Doorbell

URL = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # never connected to: start() is not called


def nap(bell: Doorbell, timeout_s: float, *, ring_after_s: float | None = None, due_in_s: float = 0.0) -> float:
    """Seconds ``bell.wait`` slept, with one ring (for a job due ``due_in_s`` after the ring) during it."""

    async def scenario() -> float:
        stop = asyncio.Event()

        async def ring_later() -> None:
            assert ring_after_s is not None
            await asyncio.sleep(ring_after_s)
            bell.ring(f"{time.time() + due_in_s:.3f}")

        ringer = asyncio.create_task(ring_later()) if ring_after_s is not None else None
        started = time.monotonic()
        await bell.wait(stop, timeout_s)
        slept = time.monotonic() - started
        if ringer is not None:
            ringer.cancel()
        return slept

    return asyncio.run(scenario())


def test_a_ring_for_a_job_due_soon_wakes_the_poller_when_it_is_due_not_at_the_ring() -> None:
    bell = Doorbell(URL)
    slept = nap(bell, 30.0, ring_after_s=0.05, due_in_s=0.3)
    assert 0.3 <= slept < 20  # not at the ring (0.05 s), not at the nap's end (30 s)
    assert bell.due == math.inf  # spent: the poller looks up what is due next itself


def test_a_ring_for_a_job_due_after_the_nap_does_not_wake_the_poller_early() -> None:
    bell = Doorbell(URL)
    assert nap(bell, 0.3, ring_after_s=0.05, due_in_s=60.0) >= 0.3


def test_a_ring_before_the_nap_for_a_job_already_due_means_no_nap_and_bad_payloads_mean_now() -> None:
    for payload in ("", "not a time", "nan", "inf", f"{time.time() - 1:.3f}"):
        bell = Doorbell(URL)
        bell.ring(payload)
        assert bell.due <= time.time(), payload
        assert nap(bell, 30.0) < 20, payload


def test_the_stop_signal_ends_a_nap_at_once() -> None:
    async def scenario() -> float:
        bell, stop = Doorbell(URL), asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        started = time.monotonic()
        await bell.wait(stop, 30.0)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 20
