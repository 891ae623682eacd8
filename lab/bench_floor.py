"""What a pipeline costs with no Celery at all: the pipelines section's floor.

``pipeline_floor_rate`` (the figure ``pipeline_vs_no_celery_floor`` divides by): the same 4-step
pipelines as the section measures (same simulator process, PostgreSQL, Redis for the gateway's
shared state), run by as many processes as the section's worker has (``processes``), each
``python -m lab.bench_floor``: it submits its share, then runs steps from its own in-memory
dispatcher one after another and the poller's rounds in between (``Poller.run_once``, any
process's jobs: a completion's next step goes to the process that read it), with a poll interval
of a millisecond so that no round waits. No broker, no worker or poller process, no Celery: what
is left is the work itself (the provider's HTTP calls and downloads, the database transactions,
the stored files). Every process starts at the same instant (after a warm-up of its own); the
rate is pipelines ÷ (the last one's end − the first one's start). genline's pipelines/s ÷ this rate is
what orchestration through Celery leaves of the work's own speed on the same cores.

Until 2026-12-03 the floor was one such process's CPU, and the ratio an estimate built on it
(a pipeline costs a chain plus the floor); that run measured 0.154 against an estimate of 0.087,
so the estimate was dropped for this direct rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
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


def _drive(rt: Any, api: Any, poller: Any, loop: Any, submit: list[dict[str, Any]], pattern: str) -> None:
    """Submit ``submit``, then run steps and poll rounds until no pipeline whose key matches
    ``pattern`` is left running (another process may finish some of them)."""
    from genline.pipelines.engine import run_step

    for request in submit:
        api.submit(request)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        step_id = rt.dispatcher.pop()
        if step_id is not None:
            run_step(rt, step_id)
        elif not loop.run_until_complete(poller.run_once()):
            if not _running(rt, pattern):
                return
            time.sleep(0.001)
    raise RuntimeError("bench: in-process pipelines did not finish")


def _running(rt: Any, pattern: str) -> int:
    terminal = [str(x) for x in PIPELINE_TERMINAL]
    with rt.db.transaction() as s:
        query = (
            select(func.count())
            .select_from(Pipeline)
            .where(Pipeline.status.not_in(terminal), Pipeline.idempotency_key.like(pattern))
        )
        return s.scalar(query) or 0


def child(spec: dict[str, Any]) -> dict[str, float]:
    """One floor process: warm up, wait for the common start, run its share; when it ended."""
    from genline.config.settings import load_settings
    from genline.pipelines.api import Genline
    from genline.pipelines.runtime import Runtime
    from genline.workers.poller import Poller
    from lab.bench import _request as request

    rt = Runtime.from_settings(load_settings({**os.environ, "GENLINE_POLL_INTERVAL_S": "0.001"}))
    api, poller, loop = Genline(runtime=rt), Poller(rt), asyncio.new_event_loop()
    run, me = spec["run"], spec["index"]
    try:
        warm = [request(i, f"{run}-warm{me}") for i in range(3)]
        _drive(rt, api, poller, loop, warm, f"{run}-warm{me}-%")
        time.sleep(max(0.0, spec["start_at"] - time.time()))
        started_at, cpu_at = time.time(), time.process_time()  # later than start_at if the warm-up ran long
        share = [request(i, f"{run}-{me}") for i in range(spec["n"])]
        _drive(rt, api, poller, loop, share, f"{run}-%")
        return {"started_at": started_at, "ended_at": time.time(), "cpu_s": time.process_time() - cpu_at}
    finally:
        loop.run_until_complete(poller.aclose())
        loop.close()
        rt.close()


def pipeline_floor_rate(
    env: dict[str, str],
    n: int,
    processes: int,
    log_dir: Any,
    *,
    start_in_s: float = 10.0,
    sim_pid: int | None = None,
) -> tuple[float, dict[str, float]]:
    """Pipelines/s of ``n`` pipelines run by ``processes`` Celery-free processes at once (see the
    module's notes), starting ``start_in_s`` after launch (after each one's imports and warm-up);
    and the CPU ms a pipeline took, by process (``floor``: the floor processes themselves), as the
    pipelines section reports it for genline's. PostgreSQL's share is only in ``machine`` (every
    core's busy time): the floor's database connections end with its processes, and a process
    that has ended can no longer be read."""
    from lab.bench_profile import CpuMeter, cpu_seconds, machine_cpu_seconds, named_cpu_seconds

    run = f"floor{uuid.uuid4().hex[:6]}"
    start_at = time.time() + start_in_s
    share = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    procs = []
    for index, count in enumerate(share):
        spec = json.dumps({"run": run, "index": index, "n": count, "start_at": start_at})
        log = (log_dir / f"floor-{index}.log").open("ab")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "lab.bench_floor", spec],
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        )
    started: list[float] = []
    ended: list[float] = []
    floor_cpu_s = 0.0
    time.sleep(max(0.0, start_at - time.time()))
    with CpuMeter(
        simulator=lambda: None if sim_pid is None else cpu_seconds(sim_pid),
        redis=lambda: named_cpu_seconds("redis-server"),
        machine=machine_cpu_seconds,
    ) as cpu:
        for proc in procs:
            out, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"bench: a floor process exited {proc.returncode}; see {log_dir}/floor-*.log")
            times = json.loads(out.decode().strip().splitlines()[-1])
            started.append(float(times["started_at"]))
            ended.append(float(times["ended_at"]))
            floor_cpu_s += float(times["cpu_s"])
    per = {"floor": round(floor_cpu_s / n * 1e3, 1), **cpu.per(n, 1e3)}
    return n / (max(ended) - min(started)), per


if __name__ == "__main__":
    from genline.config.logging import configure_logging

    configure_logging("WARNING")
    print(json.dumps(child(json.loads(sys.argv[1]))), flush=True)
