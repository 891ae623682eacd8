"""Drain mode: run queued steps and due polls in this process until nothing is left to do.

For tests and benchmarks that must not sleep and hope: deterministic, one process, the same code
paths as the workers and the poller (only the broker is the in-memory dispatcher).
"""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from genline.config.constants import JobStatus
from genline.pipelines.dispatch import MemoryDispatcher
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.storage.models import ProviderJob
from genline.workers.poller import Poller


def jobs_in_flight(rt: Runtime) -> int:
    with rt.db.transaction() as s:
        return (
            s.scalar(
                select(func.count())
                .select_from(ProviderJob)
                .where(ProviderJob.status.in_([JobStatus.PENDING, JobStatus.PROCESSING]))
            )
            or 0
        )


def drain(rt: Runtime, *, max_rounds: int = 10_000, idle_wait_s: float = 0.02) -> int:
    """Run until nothing is left to do now: no nudge queued and no provider job in flight (a step
    queued again for later waits for the sweeper, which tests call themselves). Returns rounds used."""
    assert isinstance(rt.dispatcher, MemoryDispatcher), "drain mode needs the in-memory dispatcher"
    poller = Poller(rt)
    loop = asyncio.new_event_loop()
    try:
        for rounds in range(1, max_rounds + 1):
            while (step_id := rt.dispatcher.pop()) is not None:
                run_step(rt, step_id)
            polled = loop.run_until_complete(poller.run_once())
            if not rt.dispatcher.sent and polled == 0:
                if jobs_in_flight(rt) == 0:
                    return rounds
                loop.run_until_complete(asyncio.sleep(idle_wait_s))  # a job is not due yet
        return max_rounds
    finally:
        loop.run_until_complete(poller.aclose())
        loop.close()
