"""Does a running batch starve interactive work? Interactive step latency with and without one.

``run_batch_section()`` runs three phases, each on a fresh PostgreSQL database and a flushed Redis
of its own (``OwnRedis``: the machine's shared Redis is never touched), with the same genline
worker (``WORKER_CONCURRENCY`` processes serving every queue, as ``genline worker`` does by
default), the poller and the simulator in its own process (``SIM_LATENCY_S`` added to each /v1
answer, so a step holds its worker a while):

- ``alone``: ``INTERACTIVE`` interactive pipelines, one at a time, nothing else running;
- ``batch``: the same while ``BATCH`` batch pipelines (priority batch) run, throttled as shipped
  (``GENLINE_BATCH_MAX_RUNNING``, default 2);
- ``batch_unthrottled``: the same with the throttle lifted (``GENLINE_BATCH_MAX_RUNNING`` 10000),
  to show what the throttle is for.

Per phase, from the rows the run left behind: each interactive step's queue wait (the step was
ready — its pipeline accepted, or the step before it finished — until a worker began it) and its
latency (ready → finished), p50 and p95; and the most batch steps seen running at once. Headline
figures are ratios against ``alone`` measured in the same process and minute (this machine's
speed drifts): ``batch_interactive_queue_p95_ratio``, ``batch_interactive_step_p95_ratio``, and the
same for the unthrottled phase. Nothing here asserts a time.

    python -m lab.bench_batch            # prints one JSON document
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import text

from genline.workers.processes import ProcessGroup
from lab.bench_poller import quantile
from lab.bench_sim import SimProcess
from lab.chaos_faults import fresh_database

INTERACTIVE = 15
BATCH = 60
WORKER_CONCURRENCY = 4
SIM_LATENCY_S = 0.15
POLL_INTERVAL_S = 0.1
UNTHROTTLED = 10_000


def _env(var: Path, db_url: str, broker: str, sim_url: str, key: str, max_running: int | None) -> dict[str, str]:
    env = {
        "GENLINE_VAR_DIR": str(var),
        "GENLINE_DATABASE_URL": db_url,
        "GENLINE_BROKER_URL": broker,
        "APIMART_BASE_URL": sim_url,
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator, on loopback
        "APIMART_API_KEY": key,
        "GENLINE_POLL_INTERVAL_S": str(POLL_INTERVAL_S),
        "GENLINE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
    }
    if max_running is not None:
        env["GENLINE_BATCH_MAX_RUNNING"] = str(max_running)
    return env


def _request(run: str, i: int, priority: str) -> dict[str, Any]:
    return {
        "user_id": f"bench-{i % 10}",
        "feature": "bench",
        "description": f"Bench product {i}.",
        "image": "https://images.example.com/product.png",
        "idempotency_key": f"{run}-{priority}-{i}",
        "priority": priority,
    }


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, tick: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench_batch: timed out waiting for {what}")
        tick()
        time.sleep(0.02)


def _scalar(rt: Any, sql: str, **params: Any) -> int:
    with rt.db.engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar() or 0)


def _ended(rt: Any, pattern: str) -> int:
    return _scalar(
        rt,
        "SELECT count(*) FROM pipelines WHERE idempotency_key LIKE :p AND status IN ('succeeded','failed','cancelled')",
        p=pattern,
    )


def _ended_over(rt: Any, pattern: str, count: int) -> bool:
    return _ended(rt, pattern) > count


_BATCH_RUNNING = (
    "SELECT count(*) FROM steps s JOIN pipelines p ON p.id = s.pipeline_id "
    "WHERE s.status = 'running' AND p.priority = 'batch'"
)


@contextlib.contextmanager
def _sampling(rt: Any, every_s: float = 0.05) -> Iterator[list[int]]:
    """Counts of running batch steps, sampled in a thread while the block runs."""
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(_scalar(rt, _BATCH_RUNNING))
            stop.wait(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(5)


def interactive_steps(rt: Any, pattern: str) -> dict[str, Any]:
    """Queue wait and latency of each step of the pipelines whose key matches, in ms."""
    with rt.db.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT p.id, p.created_at, st.position, st.kind, st.started_at, st.finished_at "
                "FROM pipelines p JOIN steps st ON st.pipeline_id = p.id "
                "WHERE p.idempotency_key LIKE :p AND p.status = 'succeeded' ORDER BY p.id, st.position"
            ),
            {"p": pattern},
        ).all()
    queue: list[float] = []
    latency: list[float] = []
    by_kind: dict[str, list[float]] = {}
    ready = None
    for _pipeline, created, position, kind, started, finished in rows:
        if position == 0:
            ready = created
        assert ready is not None and started is not None and finished is not None
        queue.append((started - ready).total_seconds() * 1000)
        by_kind.setdefault(kind, []).append(queue[-1])
        latency.append((finished - ready).total_seconds() * 1000)
        ready = finished
    return {
        "queue_p50_ms": round(quantile(queue, 0.5), 1),
        "queue_p95_ms": round(quantile(queue, 0.95), 1),
        "step_p50_ms": round(quantile(latency, 0.5), 1),
        "step_p95_ms": round(quantile(latency, 0.95), 1),
        "queue_p95_ms_by_kind": {k: round(quantile(v, 0.95), 1) for k, v in by_kind.items()},
        "steps": len(queue),
    }


def _phase(
    name: str,
    *,
    batch: int,
    interactive: int,
    max_running: int | None,
    broker: str,
    sim_url: str,
    key: str,
    var: Path,
) -> dict[str, Any]:
    from genline.config.settings import load_settings
    from genline.pipelines.api import Genline
    from genline.storage.migrate import upgrade

    run = uuid.uuid4().hex[:8]
    with fresh_database(f"genline_bench_batch_{run}") as db_url:
        env = _env(var / name, db_url, broker, sim_url, key, max_running)
        settings = load_settings(env)
        upgrade(db_url)
        with ProcessGroup(log_dir=var / name / "logs", env=env) as group, Genline(settings) as api:
            rt = api.runtime
            group.start_worker("worker", concurrency=WORKER_CONCURRENCY)
            group.start_poller("poller")
            api.submit({**_request(run, 0, "interactive"), "idempotency_key": f"{run}-warmup"})
            _wait(lambda: _ended(rt, f"{run}-warmup") >= 1, 120, "the worker to start", group.check)
            for i in range(batch):
                api.submit(_request(run, i, "batch"))
            with _sampling(rt) as seen:
                if batch:  # the batch is under way before the interactive work comes
                    _wait(lambda: bool(seen) and max(seen) > 0, 60, "the batch to start", group.check)
                for i in range(interactive):  # one at a time: the figure is waiting for a worker, not a backlog
                    api.submit(_request(run, i, "interactive"))
                    _wait(
                        partial(_ended_over, rt, f"{run}-interactive-%", i), 120, "an interactive pipeline", group.check
                    )
            batch_ended = _ended(rt, f"{run}-batch-%")
            figures = interactive_steps(rt, f"{run}-interactive-%")
            failed = interactive * 4 - figures["steps"]
            if failed:
                raise RuntimeError(f"bench_batch: {failed // 4} interactive pipeline(s) did not succeed ({name})")
            figures.update(
                batch_pipelines=batch,
                batch_ended_meanwhile=batch_ended,
                batch_running_max=max(seen, default=0),
                batch_max_running_setting=settings.batch_max_running,
            )
            return figures


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b and not math.isnan(a) and not math.isnan(b) else math.nan


def run_batch_section(*, quick: bool = False) -> dict[str, Any]:
    """The figures (see the module's docstring). Raises if a phase fails (an interactive pipeline
    that does not succeed, a process that dies): the lead's ``make bench`` reports it as an error.
    ``quick``: half the batch and of the interactive pipelines, and no unthrottled phase (its
    ratio is reported, not a target)."""
    batch_n = BATCH // 2 if quick else BATCH
    interactive = INTERACTIVE // 2 if quick else INTERACTIVE
    from tests.support.redis_server import OwnRedis

    key = "bench-" + uuid.uuid4().hex
    sim_config = {"image_seconds": 0, "video_seconds": 0, "video_bytes": 65536, "latency_s": SIM_LATENCY_S}
    with tempfile.TemporaryDirectory(prefix="genline-bench-batch-") as tmp, OwnRedis() as redis_server:
        var = Path(tmp)
        with SimProcess(sim_config, api_key=key, log_path=var / "simulator.log") as sim:
            phases: dict[str, Any] = {}
            runs = [("alone", 0, None), ("batch", batch_n, None), ("batch_unthrottled", batch_n, UNTHROTTLED)]
            for name, batch, max_running in runs[:2] if quick else runs:
                redis_server.client().flushall()
                phases[name] = _phase(
                    name,
                    batch=batch,
                    interactive=interactive,
                    max_running=max_running,
                    broker=redis_server.url_for(0),
                    sim_url=sim.base_url,
                    key=key,
                    var=var,
                )
    alone, loaded = phases["alone"], phases["batch"]
    free = phases.get("batch_unthrottled", {"queue_p95_ms": math.nan, "step_p95_ms": math.nan})
    return {
        "batch_interactive_queue_p95_ratio": _ratio(loaded["queue_p95_ms"], alone["queue_p95_ms"]),
        "batch_interactive_step_p95_ratio": _ratio(loaded["step_p95_ms"], alone["step_p95_ms"]),
        "unthrottled_interactive_queue_p95_ratio": _ratio(free["queue_p95_ms"], alone["queue_p95_ms"]),
        "unthrottled_interactive_step_p95_ratio": _ratio(free["step_p95_ms"], alone["step_p95_ms"]),
        "batch_running_max": loaded["batch_running_max"],
        "phases": phases,
        "setup": {
            "interactive_pipelines": interactive,
            "batch_pipelines": batch_n,
            "worker_concurrency": WORKER_CONCURRENCY,
            "sim_latency_s": SIM_LATENCY_S,
        },
    }


def main() -> None:
    from genline.config.logging import configure_logging

    configure_logging("WARNING")  # log lines to stderr: stdout is the one JSON document
    print(json.dumps(run_batch_section(), indent=2, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
