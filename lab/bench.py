"""``make bench``: genline's figures, each a ratio or a count measured in the same run.

Figures are ratios against baselines measured in the same process and minute, or counts, because
this machine's speed drifts; nothing here asserts a time. Every server runs on loopback: a Redis
server of the run's own (``redis-server`` on a free port; the machine's shared Redis is never
touched), a PostgreSQL database of its own per section (created, then dropped), the
provider simulator in its own process, moto's S3 server in its own process.

Sections (each writes its keys; a section that fails is reported under ``errors`` and the rest go on):

- pipelines (``pipelines_per_s``, ``bare_celery_chain_per_s``, ``pipeline_vs_bare_chain``,
  ``step_overhead_p95_ms``): 4-step pipelines against a zero-delay simulator on Redis + PostgreSQL
  against bare 4-task Celery chains on the same broker, 2 worker processes each (throughput: all
  submitted at once; the chains run before the pipelines and again after them); then pipelines
  one at a time for the per-step overhead (see ``step_overhead``). Also: the chains on genline's
  Redis transport (``pipeline_vs_chain_same_transport``), and the same pipelines run with no
  Celery at all by as many processes (``lab/bench_floor.py``: ``no_celery_pipelines_per_s``, and
  the CPU a pipeline took there, ``cpu_ms_per_no_celery_pipeline``, beside genline's
  ``cpu_ms_per_pipeline``), and ``floor_ratio_with_chain_deliveries_only``: the floor ratio a
  pipeline would reach if it cost the floor's work plus a bare chain's four Celery deliveries
  and nothing else (the chains on genline's transport; kombu's in a quick run). A throughput run
  ends when its last pipeline's row says it finished; the bench looks four times a second (its
  count is a query, and would take the CPU it measures).
- submit (``submit_vs_bare_apply_async``): ``Genline.submit`` against bare ``apply_async`` (and
  ``submit_vs_apply_async_same_transport``, against it on genline's Redis transport).
- poller (``poller_inflight_capacity``, ``poller_detect_lag_p99_s``, ``poller_vs_raw_http``):
  see ``lab/bench_poller.py``.
- limited (``rate_limit_hit_rate``, ``polls_per_completed_job``, ``detect_lag_p99_s``,
  ``submit_p95_under_poll_load_ratio``): a provider allowing 100 requests/s per key, 2,000 renders
  of 30-120 s in flight, new pipelines at 5/s; see ``lab/bench_limited.py``.
- store (``completion_to_stored_p95_s``): see ``lab/bench_store.py``.
- money (``cache_hit_rate``, ``estimate_error_p95``): pipelines in drain mode on shipped defaults,
  60% of copy requests repeating an earlier one; see ``lab/bench_money.py``.
- batch (``batch_interactive_step_p95_ratio``, reported): interactive step latency beside a running
  batch ÷ alone, and with the batch throttle lifted; see ``lab/bench_batch.py``. A quick run leaves
  it out unless ``--only`` names it.

Every section tells genline its simulator's request limit (``GENLINE_PROVIDER_RATE_PER_S``: the
provider's limit is the account's to set); the poller section polls at the fixed cadence
(``GENLINE_POLL_SCHEDULE=fixed``), as its capacity target is defined. Otherwise shipped defaults
(the limited section runs docker-compose.yml's one worker per queue).
``pipeline_vs_no_celery_floor`` = ``pipelines_per_s`` ÷ ``no_celery_pipelines_per_s``.
- copy (``copy_rss_mib_per_gib``, ``copy_vs_raw_boto3``): see ``lab/bench_copy.py``.

``--quick`` (``make bench QUICK=1``; under 2 minutes on two cores, a full run under 10): the same
sections at smaller sizes (60 pipelines and chains, 400 submits, the poller at its 10,000-job
target only, with no saturation step or raw yardstick unless profiling, 300 renders of 3-12 s and
streams of 30 in the limited section, 128 MiB copied, 30 money pipelines) and no batch section.
Its ratios are rougher than a full run's; the README's figures come from full runs.

``--profile`` also samples the poller, the worker's steps and submit with py-spy and writes the
summaries to ``var/bench/profiles/`` (and into the JSON under ``profiles``); profiling runs are
the same runs, so figures of a profiled run are a little lower.
Writes var/bench/latest.json and prints the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select, text

from genline.workers.broker import REDIS_TRANSPORT
from genline.workers.processes import ProcessGroup
from lab.chaos_faults import fresh_database
from tests.support.redis_server import OwnRedis

REDIS_DB = 14
CONCURRENCY = 2
POLL_INTERVAL_S = 0.1

# target of each headline figure: (comparison, value)
TARGETS: dict[str, tuple[str, float]] = {
    "pipeline_vs_no_celery_floor": (">=", 0.85),
    "step_overhead_p95_ms": ("<=", 25.0),
    "submit_vs_bare_apply_async": (">=", 0.5),
    "poller_inflight_capacity": (">=", 10000),
    "poller_detect_lag_p99_s": ("<=", 3.0),
    "rate_limit_hit_rate": ("<=", 0.01),
    "polls_per_completed_job": ("<=", 3.0),
    "detect_lag_p99_s": ("<=", 3.0),
    "submit_p95_under_poll_load_ratio": ("<=", 1.5),
    "copy_rss_mib_per_gib": ("<", 64.0),
    "copy_vs_raw_boto3": (">=", 0.8),
    "completion_to_stored_p95_s": ("<=", math.nan),  # 2 s + transfer_s, from the same run
    "cache_hit_rate": (">=", 0.5),
    "estimate_error_p95": ("<=", 0.10),
}


def _wait(predicate: Any, timeout_s: float, what: str, tick: Any = None, every_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: timed out waiting for {what}")
        if tick:
            tick()
        time.sleep(every_s)


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for one section, dropped afterwards whatever happens."""
    with fresh_database(f"genline_bench_{uuid.uuid4().hex[:8]}") as url:
        yield url


def _meter(**processes: Any) -> Any:
    """CPU seconds of the given process readers, Redis, this process (the submitter) and the
    whole machine, while the ``with`` block runs."""
    from lab.bench_profile import CpuMeter, cpu_seconds, machine_cpu_seconds, named_cpu_seconds

    me = os.getpid()
    return CpuMeter(
        **processes,
        redis=lambda: named_cpu_seconds("redis-server"),
        submitter=lambda: cpu_seconds(me),
        machine=machine_cpu_seconds,
    )


def bare_chains(n: int, broker: str, log_dir: Path, transport: str | None = None) -> tuple[float, Any]:
    """Chains/s of 4 no-op tasks through a 2-process Celery worker, and the CPU they took; on
    kombu's Redis transport, or on ``transport`` (worker and producer alike)."""
    from celery import chain

    from lab.bench_profile import tree_cpu_seconds
    from lab.bench_tasks import COUNTER, QUEUE, make_app

    app = make_app(transport)
    app.conf.broker_url = broker
    noop = app.tasks["bench.noop"]
    r = redis.Redis.from_url(broker)
    r.delete(COUNTER)
    env = {**os.environ, "BENCH_BROKER_URL": broker, "BENCH_BROKER_TRANSPORT": transport or ""}
    log = (log_dir / "bare-worker.log").open("ab")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "lab.bench_tasks",
            "worker",
            "-Q",
            QUEUE,
            "-c",
            str(CONCURRENCY),
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # warm up: the worker is ready once one chain has gone through
        chain(noop.si(), noop.si(), noop.si(), noop.si(last=True)).apply_async()
        _wait(lambda: int(r.get(COUNTER) or 0) >= 1, 60, "the bare worker to start")
        r.delete(COUNTER)
        with _meter(worker=lambda: tree_cpu_seconds(worker.pid)) as cpu:
            started = time.perf_counter()
            for _ in range(n):
                chain(noop.si(), noop.si(), noop.si(), noop.si(last=True)).apply_async()
            _wait(lambda: int(r.get(COUNTER) or 0) >= n, 600, "bare chains")
            elapsed = time.perf_counter() - started
        return n / elapsed, cpu
    finally:
        worker.terminate()
        worker.wait(15)
        log.close()
        r.delete(COUNTER)


def _genline_env(var: Path, db_url: str, broker: str, sim_url: str, key: str) -> dict[str, str]:
    return {
        "GENLINE_VAR_DIR": str(var),
        "GENLINE_DATABASE_URL": db_url,
        "GENLINE_BROKER_URL": broker,
        "APIMART_BASE_URL": sim_url,
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator, on loopback
        "APIMART_API_KEY": key,
        "GENLINE_POLL_INTERVAL_S": str(POLL_INTERVAL_S),
        # the pipelines' simulator allows 10^6 requests a second per key; genline is told so
        # (GENLINE_PROVIDER_RATE_PER_S is the provider's limit, which is the account's to set)
        "GENLINE_PROVIDER_RATE_PER_S": "1000000",
        "GENLINE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
    }


def _request(i: int, run: str) -> dict[str, Any]:
    return {
        "user_id": f"bench-{i % 10}",
        "feature": "bench",
        # unique per run: a copy answered from the cache would make a step look cheaper than it is
        "description": f"Bench product {i} ({run}).",
        "image": "https://images.example.com/product.png",
        "idempotency_key": f"{run}-{i}",
    }


def genline_pipelines(
    n: int,
    broker: str,
    db_url: str,
    var: Path,
    sim_url: str,
    key: str,
    profile_dir: Path | None = None,
    latency_runs: int = 20,
    sim_pid: int | None = None,
) -> tuple[float, dict[str, Any], Any]:
    """4-step pipelines/s through a 2-process genline worker and the poller; the per-step overhead;
    and the CPU the pipelines took."""
    from genline.config.settings import load_settings
    from genline.pipelines.api import Genline
    from genline.storage.migrate import upgrade
    from genline.storage.models import Pipeline
    from lab.bench_floor import count_pipelines
    from lab.bench_profile import Spy, cpu_seconds, named_cpu_seconds, summarise, tree_cpu_seconds

    env = _genline_env(var, db_url, broker, sim_url, key)
    settings = load_settings(env)
    upgrade(db_url)

    def terminal(api: Genline) -> int:
        return count_pipelines(api.runtime, ended=True)

    with ProcessGroup(log_dir=var / "logs", env=env) as group, Genline(settings) as api:
        worker = group.start_worker("bench-worker", concurrency=CONCURRENCY)
        poller = group.start_poller("bench-poller")
        api.submit(_request(0, "warmup"))  # ready once one pipeline has gone through
        _wait(lambda: terminal(api) >= 1, 120, "the genline worker to start", group.check)
        run = uuid.uuid4().hex[:8]
        spy = Spy(worker.proc.pid, profile_dir / "worker.raw", subprocesses=True, idle=True) if profile_dir else None
        cpu = _meter(
            worker=lambda: tree_cpu_seconds(worker.proc.pid),
            poller=lambda: tree_cpu_seconds(poller.proc.pid),
            simulator=lambda: None if sim_pid is None else cpu_seconds(sim_pid),
            postgres=lambda: named_cpu_seconds("postgres"),
        )
        with spy or contextlib.nullcontext(), cpu:
            started = time.time()
            for i in range(n):
                api.submit(_request(i, run))
            # looked at four times a second, not fifty: the count is a query, and the CPU it
            # takes is the measured pipelines' own; the end is the last one's finish as recorded
            _wait(lambda: terminal(api) >= n + 1, 600, "genline pipelines", group.check, every_s=0.25)
            elapsed = last_finish(api.runtime, f"{run}-%") - started
        # latency: one pipeline in flight at a time, so the figure is per-step overhead, not a backlog
        lone = uuid.uuid4().hex[:8]
        for i in range(latency_runs):
            api.submit(_request(i, lone))
            _wait(lambda i=i: terminal(api) >= n + 2 + i, 60, "a lone pipeline", group.check)
        with api.runtime.db.transaction() as s:
            bad = s.scalar(select(func.count()).select_from(Pipeline).where(Pipeline.status != "succeeded"))
        if bad:
            raise RuntimeError(f"bench: {bad} pipeline(s) did not succeed; see {var / 'logs'}")
        overhead = step_overhead(api.runtime, f"{lone}-%")
        under_load = step_overhead(api.runtime, f"{run}-%")
        overhead["under_load_step_latency_p95_ms"] = under_load["step_overhead_p95_ms"]
    if profile_dir:
        overhead["profile"] = summarise(profile_dir / "worker.raw", focus="run_step")
    return n / elapsed, overhead, cpu


def last_finish(rt: Any, key_pattern: str) -> float:
    """When the last of these pipelines finished (epoch seconds), as its row records it."""
    from genline.storage.models import Pipeline

    with rt.db.transaction() as s:
        last = s.scalar(select(func.max(Pipeline.finished_at)).where(Pipeline.idempotency_key.like(key_pattern)))
    assert last is not None, key_pattern
    return float(last.timestamp())


def step_overhead(rt: Any, key_pattern: str) -> dict[str, Any]:
    """Added latency per step against a zero-delay simulator, from the rows the run left behind
    (measured on pipelines run one at a time, so it is overhead, not a backlog's queueing).

    A step is ready when the one before it finished (the first: when its pipeline was accepted);
    its latency is finished − ready. The poll cadence is a designed wait, not overhead, so for the
    image and video steps ``polls × GENLINE_POLL_INTERVAL_S`` of their job is taken off; what is left
    is queue (ready → a worker began it), database, gateway and the poller's own lateness.
    """
    from lab.bench_poller import quantile

    with rt.db.transaction() as s:
        rows = s.execute(
            text(
                "SELECT p.id, p.created_at, st.position, st.kind, st.started_at, st.finished_at, "
                "COALESCE((SELECT sum(j.polls) FROM provider_jobs j WHERE j.step_id = st.id "
                "AND j.status = 'completed'), 0) "
                "FROM pipelines p JOIN steps st ON st.pipeline_id = p.id "
                "WHERE p.idempotency_key LIKE :pattern ORDER BY p.id, st.position"
            ),
            {"pattern": key_pattern},
        ).all()
    overhead: list[float] = []
    raw: list[float] = []
    queue: list[float] = []
    by_kind: dict[str, list[float]] = {}
    ready = None
    for pipeline_id, created, position, kind, started, finished, polls in rows:
        if position == 0:
            ready = created
        assert ready is not None and finished is not None and started is not None, pipeline_id
        latency = (finished - ready).total_seconds()
        wait = float(polls or 0) * POLL_INTERVAL_S
        overhead.append((latency - wait) * 1000)
        raw.append(latency * 1000)
        queue.append((started - ready).total_seconds() * 1000)
        by_kind.setdefault(kind, []).append((latency - wait) * 1000)
        ready = finished
    return {
        "step_overhead_p95_ms": quantile(overhead, 0.95),
        "step_overhead_p50_ms": quantile(overhead, 0.5),
        "step_latency_p95_ms": quantile(raw, 0.95),
        "step_queue_p95_ms": quantile(queue, 0.95),
        "step_overhead_p95_ms_by_kind": {k: round(quantile(v, 0.95), 1) for k, v in by_kind.items()},
        "steps_measured": len(overhead),
    }


def _cpu_line(cpu: Any, n: int, what: str) -> str:
    per = cpu.per(n, 1e3)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in per.items() if k != "machine")
    busy = cpu.busy_share()
    return f"CPU ms a {what}: {parts}; all {per.get('machine', math.nan):.1f} (cores {busy:.0%} busy)" if busy else ""


def section_pipelines(
    figures: dict[str, Any], args: argparse.Namespace, var: Path, broker: str, profile_dir: Path | None
) -> None:
    from lab.bench_sim import SimProcess

    n = args.pipelines or (60 if args.quick else 300)
    key = "bench-" + uuid.uuid4().hex
    sim_config = {"image_seconds": 0.0, "video_seconds": 0.0, "video_bytes": 65536, "rate_limit_per_s": 10**6}
    with (
        SimProcess(sim_config, api_key=key, log_path=var / "logs" / "pipelines-simulator.log") as sim,
        database() as db_url,
    ):
        print(
            f"bench: {n} bare 4-task Celery chains, {n} 4-step genline pipelines, {n} chains again "
            f"(Redis + PostgreSQL, {CONCURRENCY} worker processes each)",
            flush=True,
        )
        # the yardstick is measured before the pipelines and again after them (a drift of the
        # machine's speed meanwhile touches both sides alike); the figure is chains run ÷ time taken
        before_per_s, chain_cpu = bare_chains(n, broker, var / "logs")
        print(f"  bare_celery_chain_per_s  {before_per_s:8.1f}   {_cpu_line(chain_cpu, n, 'chain')}", flush=True)
        redis.Redis.from_url(broker).flushdb()
        # the same chains on genline's Redis transport (workers/broker.py), for the same-transport
        # ratio; a quick run leaves it out (it keeps a quick run short)
        same_per_s: float | None = None
        if not args.quick:
            same_per_s, _ = bare_chains(n, broker, var / "logs", transport=REDIS_TRANSPORT)
            print(f"  ... on genline's transport {same_per_s:6.1f}", flush=True)
            redis.Redis.from_url(broker).flushdb()
        pipelines_per_s, overhead, pipeline_cpu = genline_pipelines(
            n,
            broker,
            db_url,
            var,
            sim.base_url,
            key,
            profile_dir,
            latency_runs=10 if args.quick else 40,
            sim_pid=sim.pid,
        )
        print(
            f"  pipelines_per_s          {pipelines_per_s:8.1f}   {_cpu_line(pipeline_cpu, n, 'pipeline')}", flush=True
        )
        after_per_s, after_cpu = bare_chains(n, broker, var / "logs")
        redis.Redis.from_url(broker).flushdb()
        chains_per_s = 2 / (1 / before_per_s + 1 / after_per_s)
        chain_ms_each = {k: (v + after_cpu.per(n, 1e3).get(k, v)) / 2 for k, v in chain_cpu.per(n, 1e3).items()}
        print(f"  ... and again after them {after_per_s:6.1f}   ({_cpu_line(after_cpu, n, 'chain')})", flush=True)
        # the floor: the same pipelines with no Celery, as many processes as the worker has
        from lab.bench_floor import pipeline_floor_rate

        env = _genline_env(var, db_url, broker, sim.base_url, key)
        floor_per_s, floor_cpu = pipeline_floor_rate(
            env, n, CONCURRENCY, var / "logs", start_in_s=6.0 if args.quick else 10.0, sim_pid=sim.pid
        )
        parts = ", ".join(f"{k} {v:.1f}" for k, v in floor_cpu.items() if k != "machine")
        print(
            f"  ... with no Celery at all {floor_per_s:6.1f} pipelines/s ({CONCURRENCY} processes)   "
            f"CPU ms a pipeline: {parts}; all {floor_cpu.get('machine', math.nan):.1f}",
            flush=True,
        )
    chain_only = same_per_s or chains_per_s
    figures.update(
        {
            "pipelines_per_s": round(pipelines_per_s, 2),
            "bare_celery_chain_per_s": round(chains_per_s, 2),
            "bare_celery_chain_per_s_before_and_after": [round(before_per_s, 2), round(after_per_s, 2)],
            "pipeline_vs_bare_chain": round(pipelines_per_s / chains_per_s, 3),
            # the yardstick on genline's own Redis transport too: what the transport fix is worth
            "bare_chain_same_transport_per_s": round(same_per_s, 2) if same_per_s else None,
            "pipeline_vs_chain_same_transport": round(pipelines_per_s / same_per_s, 3) if same_per_s else None,
            "pipelines": n,
            # CPU ms per pipeline / per bare chain, by process ("machine": every core's busy time),
            # and how busy the machine's cores were on average while they ran
            "cpu_ms_per_pipeline": pipeline_cpu.per(n, 1e3),
            "cpu_ms_per_bare_chain": {k: round(v, 1) for k, v in chain_ms_each.items()},
            "machine_busy_share": {
                "pipelines": pipeline_cpu.busy_share(),
                "bare_chains": [chain_cpu.busy_share(), after_cpu.busy_share()],
            },
            # the same pipelines with no Celery at all, on as many processes (lab/bench_floor.py)
            "no_celery_pipelines_per_s": round(floor_per_s, 2),
            "cpu_ms_per_no_celery_pipeline": floor_cpu,
            # what orchestration through Celery leaves of the work's own speed on the same cores
            "pipeline_vs_no_celery_floor": round(pipelines_per_s / floor_per_s, 3),
            # the same ratio for a pipeline that cost the floor's work plus a bare chain's four
            # deliveries (on genline's transport where measured) and nothing else: each worker
            # process then spends 1/floor + 1/chains a pipeline; what Celery alone leaves
            "floor_ratio_with_chain_deliveries_only": round(chain_only / (floor_per_s + chain_only), 3),
            "step_overhead_p95_ms": round(overhead["step_overhead_p95_ms"], 1),
            "step_overhead": {
                k: (round(v, 1) if isinstance(v, float) else v)
                for k, v in overhead.items()
                if k not in ("profile", "step_overhead_p95_ms")
            },
        }
    )
    if "profile" in overhead:
        figures.setdefault("profiles", {})["worker_steps"] = overhead["profile"]
    same = figures["pipeline_vs_chain_same_transport"]
    print(
        f"  pipeline_vs_bare_chain   {figures['pipeline_vs_bare_chain']:8.3f}   (against {chains_per_s:.1f} chains/s, "
        + ("both runs; " if same is None else f"both runs; against chains on genline's transport: {same:.3f}; ")
        + f"pipeline_vs_no_celery_floor {figures['pipeline_vs_no_celery_floor']:.3f}; "
        + f"the floor plus a bare chain's deliveries: {figures['floor_ratio_with_chain_deliveries_only']:.3f})"
    )
    print(
        f"  step_overhead_p95_ms     {figures['step_overhead_p95_ms']:8.1f}   "
        f"(by kind {overhead['step_overhead_p95_ms_by_kind']}, queue p95 {overhead['step_queue_p95_ms']:.1f} ms)",
        flush=True,
    )


def section_submit(
    figures: dict[str, Any], args: argparse.Namespace, var: Path, broker: str, profile_dir: Path | None
) -> None:
    from lab.bench_submit import measure_submit

    print("bench: submits against bare apply_async (same Redis, same process)", flush=True)
    with database() as db_url:
        out = measure_submit(db_url, broker, var, "http://127.0.0.1:9", quick=args.quick, profile_dir=profile_dir)
    if "profile" in out:
        figures.setdefault("profiles", {})["submit"] = out.pop("profile")
    figures.update(
        {
            "submit_vs_bare_apply_async": round(out["submit_vs_bare_apply_async"], 3),
            "submit_vs_apply_async_same_transport": round(out["submit_vs_apply_async_same_transport"], 3),
            "submit": {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()},
        }
    )
    print(
        f"  submits_per_s {out['submits_per_s']:.0f}, bare apply_async/s {out['bare_apply_async_per_s']:.0f}, "
        f"submit_vs_bare_apply_async {out['submit_vs_bare_apply_async']:.3f} (against apply_async on genline's "
        f"transport, {out['same_transport_apply_async_per_s']:.0f}/s: "
        f"{out['submit_vs_apply_async_same_transport']:.3f})",
        flush=True,
    )


def section_poller(
    figures: dict[str, Any], args: argparse.Namespace, var: Path, broker: str, profile_dir: Path | None
) -> None:
    from lab.bench_poller import measure_poller

    print(
        "bench: poller capacity at a 2 s cadence (PostgreSQL + Redis; p99 lateness ≤ 1 s, 95% of polls due)",
        flush=True,
    )
    with database() as db_url:
        result = measure_poller(db_url, broker, var, quick=args.quick, profile_dir=profile_dir)
    redis.Redis.from_url(broker).flushdb()
    raw_best = max(result.raw.values()) if result.raw else math.nan
    figures.update(
        {
            "poller_inflight_capacity": result.capacity,
            "poller_detect_lag_p99_s": None if result.detect_lag_p99_s is None else round(result.detect_lag_p99_s, 3),
            "poller_vs_raw_http": round(result.max_polls_per_s / raw_best, 3) if result.raw else None,
            "poller": {
                "max_polls_per_s": round(result.max_polls_per_s, 1),
                "saturated_cpu_us_per_poll": result.saturated_cpu_us_per_poll,
                "raw_http_get_per_s": {k: round(v, 1) for k, v in result.raw.items()},
                "raw_http_fastest": max(result.raw, key=result.raw.__getitem__) if result.raw else None,
                "steps": [s.row() for s in result.steps],
            },
        }
    )
    if result.profile:
        figures.setdefault("profiles", {})["poller"] = result.profile
    print(
        f"  poller_inflight_capacity {result.capacity}, detect lag p99 {figures['poller_detect_lag_p99_s']} s, "
        f"poller_vs_raw_http {figures['poller_vs_raw_http']}",
        flush=True,
    )


def section_limited(
    figures: dict[str, Any], args: argparse.Namespace, var: Path, broker: str, profile_dir: Path | None
) -> None:
    from lab.bench_limited import LIMIT_PER_S, measure_limited

    print(
        f"bench: a provider that allows {LIMIT_PER_S} requests/s per key: 2,000 video renders of 30-120 s in "
        "flight and new pipelines at 5/s (shipped defaults; GENLINE_PROVIDER_RATE_PER_S told the limit)"
        if not args.quick
        else f"bench: a provider that allows {LIMIT_PER_S} requests/s per key (quick: 300 renders of 3-12 s)",
        flush=True,
    )
    with database() as db_url:
        out = measure_limited(db_url, broker, var, quick=args.quick, genline_env=_genline_env, request=_request)
    redis.Redis.from_url(broker).flushdb()
    for key in (
        "rate_limit_hit_rate",
        "polls_per_completed_job",
        "detect_lag_p99_s",
        "submit_p95_under_poll_load_ratio",
    ):
        figures[key] = round(out[key], 4) if isinstance(out[key], float) and not math.isnan(out[key]) else None
    figures["limited"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
    print(
        f"  rate_limit_hit_rate {out['rate_limit_hit_rate']:.4f} ({out['provider_429s']} of "
        f"{out['provider_requests']} requests), polls_per_completed_job {out['polls_per_completed_job']:.2f} "
        f"(a fixed 2 s cadence: {out['polls_per_completed_job_fixed_2s']:.1f}), detect lag p99 "
        f"{out['detect_lag_p99_s']:.2f} s within the estimate ({out['jobs_finished_within_estimate']} jobs), "
        f"{out['detect_lag_p99_s_late_jobs']:.2f} s late ({out['jobs_finished_late']}), "
        f"submit p95 under load ÷ without {out['submit_p95_under_poll_load_ratio']:.2f} "
        f"({out['submit_to_first_step_p95_s']:.3f} / {out['submit_to_first_step_p95_s_no_load']:.3f} s)",
        flush=True,
    )


def section_money(
    figures: dict[str, Any], args: argparse.Namespace, var: Path, broker: str, profile_dir: Path | None
) -> None:
    from lab.bench_money import run_money_section

    count = 30 if args.quick else 100
    print(f"bench: money: {count} pipelines in drain mode, 60% of copy requests repeating an earlier one", flush=True)
    out = run_money_section(count, log_dir=var / "logs", log=lambda line: None)
    figures["cache_hit_rate"] = round(float(out["cache_hit_rate"]), 4)
    figures["estimate_error_p95"] = round(float(out["estimate_error_p95"]), 4)
    figures["money"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    print(
        f"  cache_hit_rate {out['cache_hit_rate']:.2f} ({out['copy_cache_hits']} of {out['copy_steps']} copy "
        f"steps), estimate_error_p95 {out['estimate_error_p95']:.4f}",
        flush=True,
    )


def section_batch(
    figures: dict[str, Any], args: argparse.Namespace, var: Path, broker: str, profile_dir: Path | None
) -> None:
    from lab.bench_batch import run_batch_section

    print("bench: batch: interactive steps alone, beside a throttled batch, beside an unthrottled one", flush=True)
    out = run_batch_section(quick=args.quick)
    figures["batch_interactive_step_p95_ratio"] = out["batch_interactive_step_p95_ratio"]
    figures["batch"] = out
    print(
        f"  interactive step p95 with a batch running ÷ alone {out['batch_interactive_step_p95_ratio']} "
        f"(queue wait {out['batch_interactive_queue_p95_ratio']}); with the throttle lifted "
        f"{out['unthrottled_interactive_step_p95_ratio']}",
        flush=True,
    )


def section_store(
    figures: dict[str, Any], args: argparse.Namespace, var: Path, broker: str, profile_dir: Path | None
) -> None:
    from lab.bench_store import measure_completion_to_stored

    print("bench: provider completion → verified object in S3 (5 MB videos, 1,000 jobs in flight)", flush=True)
    with database() as db_url:
        out = measure_completion_to_stored(db_url, broker, var, quick=args.quick)
    redis.Redis.from_url(broker).flushdb()
    figures["completion_to_stored_p95_s"] = round(out["completion_to_stored_p95_s"], 3)
    figures["completion_to_stored"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def section_copy(
    figures: dict[str, Any], args: argparse.Namespace, var: Path, broker: str, profile_dir: Path | None
) -> None:
    from lab.bench_copy import measure_copy

    size = "128 MiB" if args.quick else "1 GiB"
    print(f"bench: copying a {size} result into S3 (moto) against plain boto3 upload_file", flush=True)
    out = measure_copy(var, quick=args.quick)
    figures["copy_rss_mib_per_gib"] = round(out["copy_rss_mib_per_gib"], 1)
    figures["copy_vs_raw_boto3"] = round(out["copy_vs_raw_boto3"], 3)
    figures["copy"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


SECTIONS: dict[str, Callable[[dict[str, Any], argparse.Namespace, Path, str, Path | None], None]] = {
    "pipelines": section_pipelines,
    "submit": section_submit,
    "poller": section_poller,
    "limited": section_limited,
    "store": section_store,
    "copy": section_copy,
    "money": section_money,
    "batch": section_batch,
}


# Left out of a quick run unless named in ``--only``: figures reported, with no target.
NOT_QUICK = ("batch",)


def verdicts(figures: dict[str, Any]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for key, (op, target) in TARGETS.items():
        value = figures.get(key)
        if key == "completion_to_stored_p95_s":
            target = figures.get("completion_to_stored", {}).get("completion_to_stored_target_s", math.nan)
        if key == "poller_detect_lag_p99_s" and not figures.get("poller_inflight_capacity"):
            value = None  # measured at a load the poller could not keep on schedule: not the target's reading
        if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
            out[key] = None
            continue
        out[key] = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
    return out


LOCK_PATH = Path(tempfile.gettempdir()) / "genline-bench.lock"


def one_run_at_a_time() -> Any:
    """An exclusive lock for this machine's bench runs (every checkout shares the CPUs, and two
    runs at once would measure each other); the open file is the lock, released when the process ends."""
    handle = LOCK_PATH.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="genline-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A short run for local use (under 2 minutes on two cores; leaves out the batch section).",
    )
    parser.add_argument("--pipelines", type=int, default=None, help="Pipelines (and bare chains) per measurement.")
    parser.add_argument(
        "--only",
        default=None,
        help=f"Sections to run, of {', '.join(SECTIONS)} [default: all; with --quick all but {', '.join(NOT_QUICK)}].",
    )
    parser.add_argument("--profile", action="store_true", help="Also profile with py-spy (var/bench/profiles/).")
    parser.add_argument("--out", type=Path, default=Path("var/bench/latest.json"), help="Where to write the figures.")
    args = parser.parse_args(argv)
    only = args.only or ",".join(s for s in SECTIONS if not (args.quick and s in NOT_QUICK))
    chosen = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")

    from genline.config.logging import configure_logging

    configure_logging("WARNING")
    lock = one_run_at_a_time()
    if lock is None:
        print(
            f"bench: another bench run holds {LOCK_PATH}; two at once would share the CPUs and "
            "measure each other. Wait for it to end.",
            file=sys.stderr,
        )
        return 2
    began = time.perf_counter()
    out_dir = args.out.parent
    var = (out_dir / f"run-{uuid.uuid4().hex[:8]}").resolve()
    (var / "logs").mkdir(parents=True, exist_ok=True)
    profile_dir = (out_dir / "profiles").resolve() if args.profile else None
    # a Redis server of the run's own: the sections flush it between them, and the machine's
    # shared Redis is never touched
    own_redis = OwnRedis(log_dir=var / "logs").start()
    broker = own_redis.url_for(REDIS_DB)
    figures: dict[str, Any] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    try:
        for name in chosen:
            started = time.perf_counter()
            try:
                SECTIONS[name](figures, args, var, broker, profile_dir)
            except Exception as exc:  # noqa: BLE001  # one broken section must not hide the others' figures
                errors[name] = f"{type(exc).__name__}: {exc}"
                print(f"bench: section {name} failed: {errors[name]}", flush=True)
                (var / "logs" / f"{name}-error.txt").write_text(traceback.format_exc())
            timings[name] = round(time.perf_counter() - started, 1)
    finally:
        own_redis.close()
    figures.update(
        {
            "met": verdicts(figures),
            "targets": {
                k: f"{op} {v}" if not math.isnan(v) else "<= 2 s + transfer_s" for k, (op, v) in TARGETS.items()
            },
            "errors": errors,
            "section_seconds": timings,
            "total_seconds": round(time.perf_counter() - began, 1),
            "worker_processes": CONCURRENCY,
            "poll_interval_s": POLL_INTERVAL_S,
            "broker": "redis",
            "database": "postgresql",
            "quick": args.quick,
            "profiled": args.profile,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    if profile_dir and "profiles" in figures:
        for name, summary in figures["profiles"].items():
            (profile_dir / f"{name}.txt").write_text(summary + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(
        "bench: "
        + ", ".join(f"{k} {'met' if v else 'MISSED' if v is False else 'n/a'}" for k, v in figures["met"].items())
    )
    print(f"bench: wrote {args.out} in {figures['total_seconds']:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
