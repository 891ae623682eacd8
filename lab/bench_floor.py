"""What a pipeline costs with no Celery at all: the pipelines section's floor.

The same 4-step pipelines as the section measures (same simulator process, PostgreSQL, Redis for
the gateway's shared state), run in this one process in drain mode: steps are taken from the
in-memory dispatcher and run one after another, and the poller's rounds are run in between
(``Poller.run_once``), with a poll interval of a millisecond so that each round takes every job
waiting (no nap, no round for one job). No broker, no worker processes, no poller process: what
is left is the work itself (the provider's HTTP calls and downloads, the database transactions,
the stored files) and what the simulator and PostgreSQL spend answering it.

A pipeline through Celery costs about this plus a bare chain's own CPU, so where the cores are
the limit, chain ÷ (chain + this) estimates how far ``pipeline_vs_bare_chain`` could go if
orchestration cost nothing more. It is an estimate, measured in another shape of run (one
process, batched rounds) on a machine whose speed drifts, not a proof.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from sqlalchemy import func, select

from genline.config.constants import PIPELINE_TERMINAL
from genline.storage.models import Pipeline


def count_pipelines(rt: Any, *, ended: bool) -> int:
    """How many pipelines have ended (``ended``), or have not."""
    terminal = [str(x) for x in PIPELINE_TERMINAL]
    status = Pipeline.status.in_(terminal) if ended else Pipeline.status.not_in(terminal)
    with rt.db.transaction() as s:
        return s.scalar(select(func.count()).select_from(Pipeline).where(status)) or 0


def pipeline_floor(env: dict[str, str], n: int, sim_pid: int | None, request: Any) -> Any:
    """Run ``n`` pipelines in this process; the CPU they took (a ``CpuMeter``), per process."""
    from genline.config.settings import load_settings
    from genline.pipelines.api import Genline
    from genline.pipelines.engine import run_step
    from genline.pipelines.runtime import Runtime
    from genline.workers.poller import Poller
    from lab.bench_profile import CpuMeter, cpu_seconds, machine_cpu_seconds, named_cpu_seconds

    # the in-memory dispatcher: drain mode; every job due a millisecond after its submit
    rt = Runtime.from_settings(load_settings({**env, "GENLINE_POLL_INTERVAL_S": "0.001"}))
    api, poller, loop = Genline(runtime=rt), Poller(rt), asyncio.new_event_loop()
    run = uuid.uuid4().hex[:8]

    def drive(count: int, tag: str) -> None:
        for i in range(count):
            api.submit(request(i, f"{run}-{tag}"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            step_id = rt.dispatcher.pop()  # type: ignore[attr-defined]
            if step_id is not None:
                run_step(rt, step_id)
            elif not loop.run_until_complete(poller.run_once()):
                wait = poller.seconds_to_next_due()
                if wait == float("inf") and not count_pipelines(rt, ended=False):
                    return
                time.sleep(min(1.0, max(0.001, wait)))  # until the next job is due, no busy loop
        raise RuntimeError("bench: in-process pipelines did not finish")

    me = os.getpid()
    meter = CpuMeter(
        genline=lambda: cpu_seconds(me),
        simulator=lambda: None if sim_pid is None else cpu_seconds(sim_pid),
        postgres=lambda: named_cpu_seconds("postgres"),
        redis=lambda: named_cpu_seconds("redis-server"),
        machine=machine_cpu_seconds,
    )
    try:
        drive(5, "warmup")
        with meter:
            drive(n, "floor")
    finally:
        loop.run_until_complete(poller.aclose())
        loop.close()
        rt.close()
    return meter
