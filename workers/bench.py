"""``make bench``: genline's orchestration measured against bare Celery, in the same run.

Figures are ratios against a baseline measured in the same process and minute, because this
machine's speed drifts: a bare Celery chain of 4 no-op tasks on the same Redis broker, with the
same worker settings and process count, is the yardstick for 4-step genline pipelines against a
zero-delay simulator on Redis + PostgreSQL. Writes var/bench/latest.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy import func, select

from config.constants import PIPELINE_TERMINAL
from workers.processes import ProcessGroup

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
REDIS_DB = 14
CONCURRENCY = 2
POLL_INTERVAL_S = 0.1


def _wait(predicate: Any, timeout_s: float, what: str, tick: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        if tick:
            tick()
        time.sleep(0.02)


def bare_chains(n: int, broker: str, log_dir: Path) -> float:
    """Chains/s of 4 no-op tasks through a 2-process Celery worker."""
    from celery import chain

    from workers.bench_tasks import COUNTER, QUEUE, noop

    r = redis.Redis.from_url(broker)
    r.delete(COUNTER)
    env = {**os.environ, "BENCH_BROKER_URL": broker}
    log = (log_dir / "bare-worker.log").open("ab")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.bench_tasks",
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
        started = time.perf_counter()
        for _ in range(n):
            chain(noop.si(), noop.si(), noop.si(), noop.si(last=True)).apply_async()
        _wait(lambda: int(r.get(COUNTER) or 0) >= n, 600, "bare chains")
        return n / (time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait(15)
        log.close()
        r.delete(COUNTER)


def genline_pipelines(n: int, broker: str, db_url: str, var: Path, sim_url: str, key: str) -> float:
    """4-step pipelines/s through a 2-process genline worker and the poller."""
    from config.settings import load_settings
    from pipelines.api import Genline
    from storage.migrate import upgrade
    from storage.models import Pipeline

    env = {
        "GENLINE_VAR_DIR": str(var),
        "GENLINE_DATABASE_URL": db_url,
        "GENLINE_BROKER_URL": broker,
        "APIMART_BASE_URL": sim_url,
        "APIMART_API_KEY": key,
        "GENLINE_POLL_INTERVAL_S": str(POLL_INTERVAL_S),
        "GENLINE_LOG_LEVEL": "WARNING",
    }
    settings = load_settings(env)
    upgrade(db_url)
    os.environ.update(env)

    def terminal(api: Genline) -> int:
        with api.runtime.db.transaction() as s:
            return (
                s.scalar(
                    select(func.count())
                    .select_from(Pipeline)
                    .where(Pipeline.status.in_([str(x) for x in PIPELINE_TERMINAL]))
                )
                or 0
            )

    def request(i: int, run: str) -> dict[str, Any]:
        return {
            "user_id": f"bench-{i % 10}",
            "feature": "bench",
            "description": f"Bench product {i}.",
            "image": "https://images.example.com/product.png",
            "idempotency_key": f"{run}-{i}",
        }

    with ProcessGroup(log_dir=var / "logs", env=env) as group, Genline(settings) as api:
        group.start_worker("bench-worker", concurrency=CONCURRENCY)
        group.start_poller("bench-poller")
        api.submit(request(0, "warmup"))  # ready once one pipeline has gone through
        _wait(lambda: terminal(api) >= 1, 120, "the genline worker to start", group.check)
        run = uuid.uuid4().hex[:8]
        started = time.perf_counter()
        for i in range(n):
            api.submit(request(i, run))
        _wait(lambda: terminal(api) >= n + 1, 600, "genline pipelines", group.check)
        elapsed = time.perf_counter() - started
        with api.runtime.db.transaction() as s:
            bad = s.scalar(select(func.count()).select_from(Pipeline).where(Pipeline.status != "succeeded"))
        if bad:
            raise SystemExit(f"bench: {bad} pipeline(s) did not succeed; see {var / 'logs'}")
        return n / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="genline-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="A short run for local use (under 2 minutes).")
    parser.add_argument("--pipelines", type=int, default=None, help="Pipelines (and bare chains) per measurement.")
    parser.add_argument("--out", type=Path, default=Path("var/bench/latest.json"), help="Where to write the figures.")
    args = parser.parse_args(argv)
    n = args.pipelines or (60 if args.quick else 300)

    from config.logging import configure_logging
    from provider.simulator import SimConfig, start_simulator

    configure_logging("WARNING")

    out_dir = args.out.parent
    var = out_dir / f"run-{uuid.uuid4().hex[:8]}"
    (var / "logs").mkdir(parents=True, exist_ok=True)
    broker = f"redis://127.0.0.1:6379/{REDIS_DB}"
    redis.Redis.from_url(broker).flushdb()
    db_name = f"genline_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    key = "bench-" + uuid.uuid4().hex
    try:
        with start_simulator(SimConfig(api_key=key, image_seconds=0, video_seconds=0, video_bytes=65536)) as sim:
            print(
                f"bench: {n} bare 4-task Celery chains, then {n} 4-step genline pipelines "
                f"(Redis + PostgreSQL, {CONCURRENCY} worker processes each)",
                flush=True,
            )
            chains_per_s = bare_chains(n, broker, var / "logs")
            print(f"  bare_celery_chain_per_s  {chains_per_s:8.1f}", flush=True)
            pipelines_per_s = genline_pipelines(
                n, broker, f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}", var, sim.base_url, key
            )
            print(f"  pipelines_per_s          {pipelines_per_s:8.1f}", flush=True)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        redis.Redis.from_url(broker).flushdb()
    figures = {
        "pipelines_per_s": round(pipelines_per_s, 2),
        "bare_celery_chain_per_s": round(chains_per_s, 2),
        "pipeline_vs_bare_chain": round(pipelines_per_s / chains_per_s, 3),
        "pipelines": n,
        "worker_processes": CONCURRENCY,
        "poll_interval_s": POLL_INTERVAL_S,
        "broker": "redis",
        "database": "postgresql",
        "storage": "local files",
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"  pipeline_vs_bare_chain   {figures['pipeline_vs_bare_chain']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"bench: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
