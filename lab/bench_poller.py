"""How many in-flight provider jobs one poller keeps on schedule (``poller_inflight_capacity``).

Set-up, all on loopback: a simulator in its own process holding long renders (an hour each; its
rate limit raised out of the way), a PostgreSQL database seeded with one pipeline per job (four
steps: copy and image done, video waiting on the job, store pending) and Redis as the broker for
the nudges of finished jobs. The poller under test is ``workers.poller.Poller`` itself, run in
this process exactly as ``genline poller`` runs it (``Poller(rt).run(stop)``, GENLINE_POLL_INTERVAL_S=2,
the default batch and concurrency).

Each step activates N jobs, their first polls spread evenly over one interval, and the jobs sit
in the part of a render where the poller's cadence is the plain interval (between 80% and 200%
of the provider's estimate: ``next_delay``). After one interval of warm-up, the poller's own
lateness (applied time minus due time, per poll; the poller tells it through ``on_applied``) is
read over a window; the step is on schedule when its p99 is at most 1 s and the poller applied at
least 95% of the polls a second a 2 s cadence asks for (N/2, less the few jobs that finish in the
window; a poller that let its cadence stretch would pass on lateness alone). Steps grow until one
misses; the capacity is the largest N that was on schedule.

A few jobs per step finish during the window (renders of a few tens of seconds, submitted just
before the step): detect lag = when the poller committed the video step as succeeded
(``steps.finished_at``) minus when the simulator finished the render (its ``done_at``).

Then a saturation step (every job due at once, more than the poller can do) gives the most
polls/s the poller applies, and the raw yardstick: the most GET /v1/tasks/{id} a second that
the fastest asyncio client tried (aiohttp, httpx, and the poller's own ``HttpTaskReader``, on
asyncio's loop and on uvloop) does against the same simulator, with no database and no gateway,
measured just before the saturation step and again just after it (each client's better run
counts: the machine's speed drifts within minutes). N jobs at a 2 s cadence can ask for at most
N/2 polls a second, so the saturation step needs N/2 above anything the poller does: 30,000
(15,000/s; the poller has applied 3,000-12,500/s here, depending on the day).
With 12,000 (the old quick size) the step measured the demand, ~5,000/s, not the poller.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Table, text

from genline.config.loop import run as run_loop
from lab.bench_http import create_tasks, raw_http_rates
from lab.bench_profile import CpuMeter, Spy, cpu_seconds, named_cpu_seconds, summarise
from lab.bench_sim import SimProcess

INTERVAL_S = 2.0
LONG_RENDER_S = 3600.0
ON_SCHEDULE_P99_S = 1.0
ON_SCHEDULE_RATE = 0.95  # of the polls due a second (``due_per_s``), applied


@dataclass
class StepResult:
    n: int
    polls: int
    polls_per_s: float
    lateness_p50_s: float
    lateness_p99_s: float
    lateness_max_s: float
    detect_lag_p99_s: float | None
    detect_lag_max_s: float | None
    completions: int
    undetected: int
    on_schedule: bool
    due_per_s: float  # what the cadence asks for, at least: the jobs rendering all window / interval
    # CPU µs a poll in the window, per process: the poller (this process), the simulator and
    # every PostgreSQL process (lower bounds: a backend that ended meanwhile is not counted)
    cpu_us_per_poll: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class PollerFigures:
    capacity: int
    steps: list[StepResult] = field(default_factory=list)
    detect_lag_p99_s: float | None = None
    detect_lag_n: int = 0  # the N it was measured at: the capacity, or the smallest N tried
    max_polls_per_s: float = 0.0
    raw: dict[str, float] = field(default_factory=dict)
    saturated_cpu_us_per_poll: dict[str, float] = field(default_factory=dict)
    profile: str | None = None


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def _naive(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(tzinfo=None)


class Seeder:
    """Pipelines, steps and provider jobs written straight into the schema (Core inserts, batched)."""

    def __init__(self, rt: Any, image_url: str) -> None:
        from genline.storage.models import Pipeline, ProviderJob, Step

        self.rt, self.image_url = rt, image_url
        self.tables: tuple[Table, Table, Table] = (Pipeline.__table__, Step.__table__, ProviderJob.__table__)  # type: ignore[assignment]
        profile = rt.catalog.profiles["standard"]
        self.video_model = profile.video_models[0]
        self.copy_model = profile.copy_models[0]
        self.units = float(profile.video_duration_s)

    def add(
        self,
        prefix: str,
        task_ids: list[str],
        *,
        status: str,
        estimated_s: list[int],
        submitted_ago_s: list[float],
        next_poll_at: list[datetime | None],
        image_stored: bool = False,
    ) -> list[str]:
        """One pipeline per task id; returns the video steps' ids, in order. ``image_stored``:
        with the image's ``stored_objects`` row, as the video step leaves it (it copies the image
        before it submits), so the store step copies only the video."""
        from genline.storage.models import StoredObject

        pipelines_t, steps_t, jobs_t = self.tables
        stored_t: Table = StoredObject.__table__  # type: ignore[assignment]
        stored: list[dict[str, Any]] = []
        now = datetime.now(UTC)
        pipelines: list[dict[str, Any]] = []
        steps: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []
        video_steps: list[str] = []
        expires = (now + timedelta(days=1)).isoformat()
        for i, task_id in enumerate(task_ids):
            pid = f"pl_{prefix}{i:07d}"
            pipelines.append(
                {
                    "id": pid,
                    "user_id": f"bench-{i % 10}",
                    "feature": "bench",
                    "profile": "standard",
                    "description": f"Bench product {i}.",
                    "image_ref": self.image_url,
                    "image_url": self.image_url,
                    "callback_url": None,
                    "priority": "interactive",
                    "models": {},
                    "idempotency_key": f"{prefix}{i}",
                    "request_hash": "0" * 64,
                    "status": "running",
                    "created_at": now,
                    "updated_at": now,
                }
            )
            outputs = [
                {"model": self.copy_model, "text": "Meet the bench product.\nIt is fast.", "tokens": 20},
                {
                    "model": "wan-2.7-image",
                    "task_id": "seeded",
                    "assets": [{"url": self.image_url, "expires_at": expires}],
                },
                None,
                None,
            ]
            for position, (kind, step_status) in enumerate(
                (("copy", "succeeded"), ("image", "succeeded"), ("video", "waiting"), ("store", "pending"))
            ):
                sid = f"st_{prefix}{i:07d}{position}"
                steps.append(
                    {
                        "id": sid,
                        "pipeline_id": pid,
                        "position": position,
                        "kind": kind,
                        "status": step_status,
                        "attempts": 1 if position < 3 else 0,
                        "model": None,
                        "output": outputs[position],
                        "created_at": now,
                        "updated_at": now,
                        "started_at": now if position < 3 else None,
                        "finished_at": now if position < 2 else None,
                    }
                )
                if kind == "video":
                    video_steps.append(sid)
                    if image_stored:
                        stored.append(
                            {
                                "id": f"obj_{prefix}{i:07d}",
                                "pipeline_id": pid,
                                "step_id": sid,
                                "kind": "image",
                                "key": f"{pid}/image.png",
                                "location": f"seeded://{pid}/image.png",
                                "size": 1,
                                "sha256": "0" * 64,
                                "content_type": "image/png",
                                "source_expires_at": None,
                                "created_at": now,
                            }
                        )
            jobs.append(
                {
                    "id": f"job_{prefix}{i:07d}",
                    "step_id": video_steps[-1],
                    "attempt": 1,
                    "idempotency_key": f"genline:{video_steps[-1]}:{self.video_model}",
                    "kind": "video",
                    "model": self.video_model,
                    "task_id": task_id,
                    "status": status,
                    "progress": 50,
                    "estimated_time_s": estimated_s[i],
                    "next_poll_at": next_poll_at[i],
                    "lease_until": None,
                    "polls": 0,
                    "units": self.units,
                    "created_at": now,
                    "submitted_at": now - timedelta(seconds=submitted_ago_s[i]),
                }
            )
        with self.rt.db.transaction() as s:
            for table, rows in ((pipelines_t, pipelines), (steps_t, steps), (jobs_t, jobs), (stored_t, stored)):
                _copy_rows(s, table, rows)
        return video_steps


def _copy_rows(s: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    """``rows`` into ``table`` by ``COPY`` (PostgreSQL; the bench's poller runs on nothing else),
    stored as SQLAlchemy stores them: JSON as text, times as naive UTC. 180,000 rows took ~14 s as
    batched INSERTs, most of a quick run's poller section."""
    if not rows:
        return
    # the Python-side defaults an INSERT would have filled in (COPY fills none)
    defaults: dict[str, Any] = {}
    for column in table.columns:
        if column.key in rows[0] or column.default is None:
            continue
        if not column.default.is_scalar:
            raise ValueError(f"bench seeder: give {table.name}.{column.key} a value (its default is computed)")
        defaults[column.key] = column.default.arg  # type: ignore[attr-defined]
    columns = [*rows[0], *defaults]

    def plain(value: Any) -> Any:
        if isinstance(value, (dict, list)):
            return json.dumps(value)
        if isinstance(value, datetime):
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    driver = s.connection().connection.driver_connection
    with driver.cursor() as cursor, cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([plain(row[c] if c in row else defaults[c]) for c in columns])


def _activate(rt: Any, prefix: str, n: int, t0: datetime, spread_s: float) -> None:
    """Jobs ``0..n-1`` of the long renders become due from ``t0`` on, evenly over ``spread_s``;
    every other long render rests (status ``intent`` is never polled)."""
    cut = len(f"job_{prefix}") + 1
    with rt.db.transaction() as s:
        s.execute(
            text(
                "UPDATE provider_jobs SET status = CASE WHEN CAST(substr(id, :cut) AS integer) < :n "
                "THEN 'processing' ELSE 'intent' END, lease_until = NULL, "
                "next_poll_at = CASE WHEN CAST(substr(id, :cut) AS integer) < :n THEN "
                ":t0 + make_interval(secs => :spread * CAST(substr(id, :cut) AS integer) / :n) ELSE NULL END "
                "WHERE id LIKE :pattern"
            ),
            {"cut": cut, "n": n, "t0": _naive(t0), "spread": spread_s, "pattern": f"job_{prefix}%"},
        )
    with rt.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE provider_jobs")
        conn.exec_driver_sql("VACUUM ANALYZE steps")


async def _run_window(
    rt: Any, warmup_s: float, window_s: float, sim_pid: int, spy: Path | None = None
) -> tuple[list[float], float, CpuMeter]:
    """Run a fresh Poller; return the lateness of the polls applied inside the window, its length
    and the CPU the poller, the simulator and PostgreSQL used in it."""
    import os

    from genline.workers.poller import Poller

    lateness: list[float] = []
    counting = False

    def on_applied(samples: list[float]) -> None:
        if counting:
            lateness.extend(samples)

    poller = Poller(rt, on_applied=on_applied)
    stop = asyncio.Event()
    task = asyncio.create_task(poller.run(stop))
    await asyncio.sleep(warmup_s)
    counting = True
    started = time.perf_counter()
    me = os.getpid()
    meter = CpuMeter(
        poller=lambda: cpu_seconds(me),
        simulator=lambda: cpu_seconds(sim_pid),
        postgres=lambda: named_cpu_seconds("postgres"),
    )
    with meter:
        if spy is not None:
            with Spy(me, spy, rate=200):
                await asyncio.sleep(window_s)
        else:
            await asyncio.sleep(window_s)
        counting = False
        elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.wait_for(task, timeout=120)
    return lateness, elapsed, meter


def _measure_step(
    rt: Any,
    sim: SimProcess,
    seeder: Seeder,
    key: str,
    n: int,
    window_s: float,
    finishers: int,
    spy: Path | None = None,
    spread_s: float = INTERVAL_S,
) -> StepResult:
    warmup_s = INTERVAL_S + 1.0
    t0 = datetime.now(UTC) + timedelta(seconds=1.0)
    # renders that finish inside the window, at spread-out moments
    start_at = time.time()
    lead = (t0.timestamp() - start_at) + warmup_s
    durations = [lead + 0.5 + (window_s - 5.5) * (i + 0.5) / finishers for i in range(finishers)]
    finisher_ids: list[str] = []
    for d in durations:  # one config change per duration: the simulator fixes a job's duration at submit
        sim.configure(video_seconds=round(d, 3))
        finisher_ids += asyncio.run(
            create_tasks(sim.base_url, key, 1, model=seeder.video_model, prefix=f"fin-{uuid.uuid4().hex[:8]}")
        )
    sim.configure(video_seconds=LONG_RENDER_S)
    estimates = [max(1, math.ceil(d)) for d in durations]
    prefix = f"f{uuid.uuid4().hex[:6]}"
    video_steps = seeder.add(
        prefix,
        finisher_ids,
        status="processing",
        estimated_s=estimates,
        submitted_ago_s=[0.8 * e for e in estimates],
        next_poll_at=[t0 + timedelta(seconds=INTERVAL_S * random.random()) for _ in estimates],
    )
    _activate(rt, "long", n - finishers, t0, spread_s)
    lateness, elapsed, cpu = run_loop(
        _run_window(rt, warmup_s + (t0 - datetime.now(UTC)).total_seconds(), window_s, sim.pid, spy)
    )
    stopped = time.time()
    done_at = {tid: float(sim.task(tid)["done_at"]) for tid in finisher_ids}
    with rt.db.transaction() as s:
        finished = dict(
            s.execute(
                text(
                    "SELECT j.task_id, st.finished_at FROM provider_jobs j JOIN steps st ON st.id = j.step_id "
                    "WHERE st.id = ANY(:ids)"
                ),
                {"ids": video_steps},
            ).all()
        )
    lags, undetected = [], 0
    for tid, done in done_at.items():
        at = finished.get(tid)
        if at is None:
            undetected += 1
            lags.append(stopped - done)  # a lower bound
        else:
            lags.append(at.replace(tzinfo=UTC).timestamp() - done)
    p99 = quantile(lateness, 0.99)
    polls_per_s = len(lateness) / elapsed if elapsed else 0.0
    due_per_s = (n - finishers) / INTERVAL_S  # at least: the finishers stop being read when they finish
    return StepResult(
        n=n,
        polls=len(lateness),
        polls_per_s=polls_per_s,
        lateness_p50_s=quantile(lateness, 0.5),
        lateness_p99_s=p99,
        lateness_max_s=max(lateness) if lateness else math.nan,
        detect_lag_p99_s=quantile(lags, 0.99) if lags else None,
        detect_lag_max_s=max(lags) if lags else None,
        completions=len(lags),
        undetected=undetected,
        on_schedule=bool(lateness) and p99 <= ON_SCHEDULE_P99_S and polls_per_s >= ON_SCHEDULE_RATE * due_per_s,
        due_per_s=due_per_s,
        cpu_us_per_poll=cpu.per(len(lateness)),
    )


def _log_step(log: Any, result: StepResult) -> None:
    lag = math.nan if result.detect_lag_p99_s is None else result.detect_lag_p99_s
    log(
        f"  N={result.n:6d}  {result.polls_per_s:7.0f} polls/s of {result.due_per_s:.0f} due"
        f"  lateness p50 {result.lateness_p50_s:6.3f} s "
        f"p99 {result.lateness_p99_s:6.3f} s  detect lag p99 {lag:6.3f} s"
        f"  {'on schedule' if result.on_schedule else 'LATE'}"
    )


@contextmanager
def _runtime(db_url: str, sim_url: str, key: str, var: Path, broker: str) -> Iterator[Any]:
    from genline.config.settings import load_settings
    from genline.pipelines.runtime import Runtime
    from genline.storage.migrate import upgrade
    from genline.tasks.app import CeleryDispatcher, make_celery

    env = {
        "GENLINE_VAR_DIR": str(var),
        "GENLINE_DATABASE_URL": db_url,
        "GENLINE_BROKER_URL": broker,
        "APIMART_BASE_URL": sim_url,
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator, on loopback
        "APIMART_API_KEY": key,
        "GENLINE_POLL_INTERVAL_S": str(INTERVAL_S),
        # Capacity is measured at the fixed cadence (every job read every 2 s) against a simulator
        # that allows 10^9 requests a second, so genline is told that limit: settings that differ
        # from the shipped defaults, on purpose (the limited section measures those).
        "GENLINE_POLL_SCHEDULE": "fixed",
        "GENLINE_PROVIDER_RATE_PER_S": "1000000000",
        "GENLINE_LOG_LEVEL": "WARNING",
    }
    settings = load_settings(env)
    upgrade(db_url)
    rt = Runtime.from_settings(settings, CeleryDispatcher(make_celery(settings)))
    try:
        yield rt
    finally:
        rt.close()


def measure_poller(
    db_url: str, broker: str, var: Path, *, quick: bool, profile_dir: Path | None, log: Any = print
) -> PollerFigures:
    key = "bench-" + uuid.uuid4().hex
    # steps below a tenth of the target say nothing of it; a miss is bisected once (not quick)
    # (a quick run measures the target's own size only)
    sizes = [10000] if quick else [1000, 5000, 10000, 15000, 20000]
    window_s = 5.0 if quick else 12.0
    finishers = 10 if quick else 24
    # N/2 due a second: more than the poller does (see above); a quick run's 10,000 a second still is.
    # A quick run without profiling measures no saturation and no raw yardstick (figures without target).
    saturate = not quick or profile_dir is not None
    saturate_n = 30000 if not quick else 20000 if saturate else 0
    sim_config = {"video_seconds": LONG_RENDER_S, "image_seconds": 0.0, "rate_limit_per_s": 10**9, "video_bytes": 65536}
    with (
        SimProcess(sim_config, api_key=key, log_path=var / "logs" / "poller-simulator.log") as sim,
        _runtime(db_url, sim.base_url, key, var, broker) as rt,
    ):
        seeder = Seeder(rt, "")
        image_id = asyncio.run(
            create_tasks(sim.base_url, key, 1, kind="image", model="wan-2.7-image", body={"n": 1, "size": "1:1"})
        )[0]
        seeder.image_url = f"{sim.base_url}/files/{image_id}/0.png"
        total = max(max(sizes), saturate_n)
        started = time.perf_counter()
        long_ids = sim.make_jobs(total, model=seeder.video_model, key_prefix="long-")
        seeder.add(
            "long",
            long_ids,
            status="intent",
            estimated_s=[int(LONG_RENDER_S)] * total,
            submitted_ago_s=[0.8 * LONG_RENDER_S] * total,
            next_poll_at=[None] * total,
        )
        log(f"  seeded {total} in-flight jobs in {time.perf_counter() - started:.1f} s")
        figures = PollerFigures(capacity=0)
        missed: int | None = None
        for n in sizes:
            result = _measure_step(rt, sim, seeder, key, n, window_s, finishers)
            figures.steps.append(result)
            _log_step(log, result)
            if not result.on_schedule:
                missed = n
                break
            figures.capacity = figures.detect_lag_n = n
            figures.detect_lag_p99_s = result.detect_lag_p99_s
        if missed is not None and figures.capacity and not quick:  # one bisection between the last pass and the miss
            n = (figures.capacity + missed) // 2 // 250 * 250
            if figures.capacity < n < missed:
                result = _measure_step(rt, sim, seeder, key, n, window_s, finishers)
                figures.steps.append(result)
                _log_step(log, result)
                if result.on_schedule:
                    figures.capacity = figures.detect_lag_n = n
                    figures.detect_lag_p99_s = result.detect_lag_p99_s
        if figures.capacity == 0:  # not even the smallest: report its detect lag anyway
            figures.detect_lag_p99_s = figures.steps[0].detect_lag_p99_s
            figures.detect_lag_n = figures.steps[0].n
        if not saturate:
            figures.max_polls_per_s = max(s.polls_per_s for s in figures.steps)
            log("  (quick: no saturation step and no raw HTTP yardstick, so no poller_vs_raw_http)")
            return figures
        # saturation: every job due at once; the most polls/s the poller applies, with the raw
        # yardstick measured just before it and again just after (this machine's speed drifts)
        raw_s = 1.0 if quick else 1.5  # per client and concurrency, twice (its ratio's target is withdrawn)
        # (a quick run measures it once, after: the ratio has no target)
        early_raw = {} if quick else raw_http_rates(sim.base_url, key, long_ids[:2000], raw_s, quick=quick)
        spy = profile_dir / "poller.raw" if profile_dir else None
        sat = _measure_step(rt, sim, seeder, key, saturate_n, max(4.0, window_s * 0.5), 2, spy, spread_s=0.0)
        figures.max_polls_per_s = max(sat.polls_per_s, *(s.polls_per_s for s in figures.steps))
        figures.saturated_cpu_us_per_poll = sat.cpu_us_per_poll
        log(
            f"  saturated (N={saturate_n}, at most {saturate_n / INTERVAL_S:.0f} due a second): "
            f"{sat.polls_per_s:7.0f} polls/s applied; CPU a poll: "
            + ", ".join(f"{k} {v:.0f} µs" for k, v in sat.cpu_us_per_poll.items())
        )
        if spy is not None:
            figures.profile = summarise(spy)
        _activate(rt, "long", 0, datetime.now(UTC), INTERVAL_S)
        for name, rate in raw_http_rates(sim.base_url, key, long_ids[:2000], raw_s, quick=quick).items():
            figures.raw[name] = max(rate, early_raw.get(name, 0.0))
        log("  raw GET /v1/tasks/{id}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in figures.raw.items()))
    return figures
