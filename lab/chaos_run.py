"""``make chaos`` (``python -m lab.chaos``): the production footprint under fire, and the invariants that
must survive it.

What runs: a Redis of the run's own on a free port (so it can be restarted without touching the
machine's), a fresh PostgreSQL database, moto's S3 server, the provider simulator over HTTP with
faults switched on (429 with Retry-After, 500/503, answers that hang past the client's timeout,
jobs that fail, jobs that stall far past their estimate, result links that expire in 60 s), two
worker processes on every queue and a poller, each a separate OS process.

What happens to it (see ``workers/chaos_faults.py``): pipelines are submitted at a steady pace;
a worker process is SIGKILLed every ~5 s and started again (the two take turns); the poller is
SIGKILLed and restarted (twice; once in ``--quick``); Redis is SIGKILLed and restarted once, empty
(``--save '' --appendonly no``: its data is not kept); every PostgreSQL connection of the run's
database is terminated once.

What is checked at the end (see ``workers/chaos_verify.py``): every pipeline ended, none failed
without a reason, no provider job was paid twice, every stored video is byte-identical to the
provider's and none was lost, recorded spend is within $0.001 of the provider's bill, a per-user
spend cap held (and refused the pipelines past it), and the API
key is in no log line, database row or Redis key. The figures go to ``var/chaos/latest.json``;
the run's logs stay in ``var/chaos/run-<id>/logs/``. Everything started is stopped on the way
out, on failure and on Ctrl-C too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from genline.config.logging import configure_logging
from genline.workers.processes import ProcessGroup
from lab.chaos_faults import Disruptor, fresh_database, schedule
from lab.chaos_verify import RecoveryWatch, Verdict, invariant_failures, settled_stats
from tests.support.redis_server import OwnRedis
from tests.support.s3_server import DUMMY_AWS_ENV, MotoServer

DEFAULT_OUT = Path("var/chaos/latest.json")
TERMINAL_SQL = text(
    "SELECT COUNT(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled')), COUNT(*) FROM pipelines"
)


@dataclass
class ChaosPlan:
    pipelines: int = 300
    timeout_s: float = 900.0  # waiting for every pipeline to end
    submit_per_s: float = 15.0
    workers: int = 2
    worker_concurrency: int = 2
    worker_kill_every_s: float = 5.0
    poller_kills: int = 2
    redis_restarts: int = 1
    pg_drops: int = 1
    copy_kills: int = 2  # a worker SIGKILLed while it holds a running copy
    first_disruption_s: float = 6.0
    disruption_gap_s: float = 6.0
    faults: dict[str, float] = field(
        default_factory=lambda: {
            "rate_429": 0.10,  # each with Retry-After: retry_after_s
            "rate_500": 0.025,
            "rate_503": 0.025,
            "rate_timeout": 0.02,  # the answer hangs timeout_hang_s, past the client's timeout
            "job_failure_rate": 0.01,
            "job_stall_rate": 0.01,  # processing stall_seconds past an estimate of video_seconds
            "short_url_ttl_rate": 0.05,  # result links that expire short_url_ttl_s after completion
            "poisoned_link_every": 25,  # every 25th video's link points where nothing answers
        }
    )
    # The provider's side: quick renders, short link lifetimes and slow downloads (so kills land in
    # the middle of copies); answers that hang outlast genline's shipped 30 s client timeout.
    simulator: dict[str, float] = field(
        default_factory=lambda: {
            "image_seconds": 1.0,
            "video_seconds": 2.0,
            "retry_after_s": 0.5,
            "timeout_hang_s": 35.0,
            "stall_seconds": 30.0,
            "short_url_ttl_s": 60.0,
            "download_bytes_per_s": 100_000.0,  # a 200 KB video takes 2 s to copy
        }
    )
    # genline's side runs on its shipped settings: every recovery setting (sweep, lease, visibility
    # timeout, backoffs, breaker cooldown, poll interval, timeouts) is the default a user gets.
    settings: dict[str, str] = field(default_factory=dict)
    max_recovery_wait_s: float = 90.0  # a killed worker's step must run again within this
    # A per-user daily spend cap, in the catalog the run writes (shipped catalog + this cap), set to
    # fit about this share of each seller's pipelines: the rest must be refused at submit, and no
    # seller's spend may pass the cap through the kills.
    user_cap_share: float = 0.85
    sellers: int = 7

    @classmethod
    def quick(cls, pipelines: int = 40, timeout_s: float = 420.0) -> ChaosPlan:
        """What CI runs: 40 pipelines, one poller kill, one kill in mid-copy, one Redis restart, one
        connection drop."""
        return cls(pipelines=pipelines, timeout_s=timeout_s, poller_kills=1, copy_kills=1, submit_per_s=10.0)


class _Tee(io.TextIOBase):
    """The harness's own output: to the screen and to ``harness.log`` (searched for the key too)."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
            stream.flush()
        return len(s)


class Chaos:
    def __init__(self, plan: ChaosPlan, run_dir: Path, say: Callable[[str], None]) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.secret = "sk-chaos-" + uuid.uuid4().hex  # made up per run; never a real key
        self.db_name = f"genline_chaos_{uuid.uuid4().hex[:10]}"
        self._harness_log = (self.logs / "harness.log").open("a")
        self._say = say
        self.accepted = 0  # pipelines accepted so far (the rest were refused at the spend cap)

    def say(self, line: str) -> None:
        self._say(line)
        self._harness_log.write(line + "\n")
        self._harness_log.flush()

    def user_cap_usd(self) -> Decimal:
        """The per-user daily cap: the estimate of one pipeline times the share of a seller's pipelines
        it fits (every chaos request is alike but for a number in its description)."""
        from genline.config.catalog import load_catalog
        from genline.pipelines.estimate import estimate_pipeline

        one = estimate_pipeline(load_catalog(), "standard", description=self._description(self.plan.pipelines))
        per_seller = -(-self.plan.pipelines // self.plan.sellers)
        return (one.total_usd * int(per_seller * self.plan.user_cap_share)).quantize(Decimal("0.01"))

    def _catalog(self) -> str:
        from genline.config.catalog import BUILTIN_CATALOG

        raw = json.loads(BUILTIN_CATALOG.read_text())
        raw["caps"] = [{"scope": "user", "match": "*", "period": "day", "limit_usd": str(self.user_cap_usd())}]
        path = self.run_dir / "catalog.json"
        path.write_text(json.dumps(raw, indent=2))
        return str(path)

    def _env(self, db_url: str, redis_url: str, s3_endpoint: str, sim_url: str) -> dict[str, str]:
        return {
            "GENLINE_CATALOG_FILE": self._catalog(),
            "GENLINE_VAR_DIR": str(self.run_dir / "var"),
            "GENLINE_DATABASE_URL": db_url,
            "GENLINE_BROKER_URL": redis_url,
            "GENLINE_STORAGE_URL": "s3://genline-chaos/outputs",
            "GENLINE_S3_ENDPOINT_URL": s3_endpoint,
            "APIMART_BASE_URL": sim_url,
            "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator, on loopback
            "APIMART_API_KEY": self.secret,
            "GENLINE_LOG_LEVEL": "INFO",
            **self.plan.settings,
        }

    def run(self) -> dict[str, Any]:
        from genline.config.settings import load_settings
        from genline.pipelines.api import Genline
        from genline.provider.simulator import SimConfig, start_simulator
        from genline.storage.factory import open_store
        from genline.storage.migrate import upgrade

        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on the PATH; the chaos run starts (and restarts) its own Redis")
        sim_config = SimConfig(api_key=self.secret, video_bytes=200_000, seed=int(time.time()) % 100_000)
        # plan.simulator may also carry "seed" (replay a run's fault draws) or any other SimConfig field
        sim_config.update({**self.plan.simulator, **self.plan.faults})
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            stack.enter_context(_environ(DUMMY_AWS_ENV))  # our own boto3 client talks to moto too
            redis = stack.enter_context(OwnRedis(self.logs))
            db_url = stack.enter_context(fresh_database(self.db_name))
            moto = stack.enter_context(MotoServer(log_path=self.logs / "moto.log"))
            sim = stack.enter_context(start_simulator(sim_config))
            env = self._env(db_url, redis.url, moto.endpoint_url, sim.base_url)
            settings = load_settings(env)
            upgrade(settings.database_url)
            store = open_store(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
            store.ensure_bucket()  # type: ignore[attr-defined]
            self.say(
                f"chaos: {self.plan.pipelines} pipelines on Redis :{redis.port}, PostgreSQL {self.db_name}, "
                f"S3 {moto.endpoint_url}, simulator {sim.base_url}; logs in {self.logs}"
            )
            group = stack.enter_context(ProcessGroup(log_dir=self.logs, env={**env, **DUMMY_AWS_ENV}))
            watch = RecoveryWatch(db_url)
            stack.callback(watch.close)
            disruptor = Disruptor(
                group,
                redis,
                self.db_name,
                {f"worker-{chr(97 + i)}": None for i in range(self.plan.workers)},
                concurrency=self.plan.worker_concurrency,
                worker_kill_every_s=self.plan.worker_kill_every_s,
                planned=schedule(
                    self.plan.poller_kills,
                    self.plan.redis_restarts,
                    self.plan.pg_drops,
                    self.plan.first_disruption_s,
                    self.plan.disruption_gap_s,
                    copy_kills=self.plan.copy_kills,
                ),
                say=self.say,
                on_kill=watch.killed,
            )
            with Genline(settings) as api:
                drive_s = self._drive(api, disruptor, db_url, watch)
            group.stop()  # every child ends before anything is counted: logs and rows are final
            self.say("chaos: every process stopped; checking the invariants")
            stats = settled_stats(sim.base_url, wait_s=self.plan.simulator["stall_seconds"] + 10)
            verdict = Verdict(db_url, store, sim.base_url, self.secret)
            try:
                result = verdict.figures(self.accepted, stats)
                result.update(verdict.caps(self.plan.pipelines - self.accepted, self.user_cap_usd()))
                self._harness_log.flush()
                result.update(verdict.secrets(sorted(self.logs.glob("*.log")), redis.client()))
                result["provider_call_errors_seen"] = verdict.provider_errors()
            finally:
                verdict.close()
            result.update(self._extras(disruptor, stats, sim.state, drive_s))
            result.update(watch.figures())
            result["max_recovery_wait_allowed_s"] = self.plan.max_recovery_wait_s
            result["simulator_seed"] = sim_config.seed  # the fault draws; set plan.simulator["seed"] to replay
        result["wall_time_s"] = round(time.monotonic() - started, 1)
        return result

    # --- the run ---------------------------------------------------------------------------------
    def _drive(self, api: Any, disruptor: Disruptor, db_url: str, watch: RecoveryWatch) -> float:
        """Submit at a steady pace while the disruptor does its work; returns when every pipeline
        has ended or the plan's timeout has passed."""
        monitor = create_engine(db_url, poolclass=NullPool)  # a fresh connection each look: survives drops
        disruptor.start_all()
        t0 = time.monotonic()
        submitted, terminal, last_report = 0, 0, 0.0
        self.accepted = 0
        try:
            while True:
                now = time.monotonic()
                due = min(self.plan.pipelines, int((now - t0) * self.plan.submit_per_s) + 1)
                while submitted < due:
                    self.accepted += self._submit(api, submitted)
                    submitted += 1
                terminal = self._terminal(monitor, terminal)
                watch.tick(time.monotonic())
                if submitted == self.plan.pipelines and terminal >= self.accepted:
                    break
                if now - t0 > self.plan.timeout_s:
                    self.say(f"chaos: timed out after {self.plan.timeout_s:.0f}s with {terminal} ended")
                    break
                disruptor.tick(terminal, max(self.accepted, 1))
                if now - last_report >= 5:
                    last_report = now
                    kills = ", ".join(f"{k} {v}" for k, v in disruptor.kills.items() if v)
                    self.say(
                        f"chaos: {now - t0:6.1f}s  ended {terminal}/{self.accepted} "
                        f"(submitted {submitted}, {submitted - self.accepted} refused at the cap)  "
                        f"{kills or 'no kills yet'}"
                    )
                time.sleep(0.25)
        finally:
            monitor.dispose()
        self.say(f"chaos: {time.monotonic() - t0:6.1f}s  ended {terminal}/{self.accepted}")
        return time.monotonic() - t0

    @staticmethod
    def _description(i: int) -> str:
        return f"Chaos product {i}: a stoneware mug, glaze number {i}."

    def _submit(self, api: Any, i: int) -> bool:
        """Submit pipeline ``i``; True if accepted, False if refused at the seller's spend cap.
        While Redis or PostgreSQL is being disrupted the same request (same idempotency key) is
        sent again, which must never make a second pipeline."""
        from genline.config.errors import SpendCapExceeded

        request = {
            "user_id": f"chaos-seller-{i % self.plan.sellers}",
            "feature": "chaos",
            "description": self._description(i),
            "image": f"https://images.example.com/products/{i}.png",
            "idempotency_key": f"chaos-{i}",
        }
        for attempt in range(60):
            try:
                api.submit(request)
                return True
            except SpendCapExceeded:
                return False
            except Exception as exc:  # noqa: BLE001  # the database or broker is being disrupted
                if attempt % 10 == 0:
                    self.say(f"chaos: submit {i} failed ({type(exc).__name__}); trying again with the same key")
                time.sleep(0.5)
        raise RuntimeError(f"pipeline {i} could not be submitted in 30 s")

    @staticmethod
    def _terminal(monitor: Any, last: int) -> int:
        try:
            with monitor.connect() as conn:
                return int(conn.execute(TERMINAL_SQL).one()[0])
        except Exception:  # noqa: BLE001  # the connection was just dropped; look again next time
            return last

    def _extras(self, disruptor: Disruptor, stats: dict[str, Any], sim_state: Any, drive_s: float) -> dict[str, Any]:
        jobs = list(sim_state.jobs.values())
        return {
            "kills": dict(disruptor.kills),
            "disruptions_missed": disruptor.unfinished(),
            "timeline": disruptor.timeline,
            "redis_data_kept": OwnRedis.data_kept,
            "redis_persistence": "--save '' --appendonly no: restarted empty (queues, unacked messages, "
            "rate limits and breakers all lost)",
            "faults": {**self.plan.faults, **self.plan.simulator},
            "faults_injected": {
                "requests_by_status": stats["requests_by_status"],
                "jobs_failing": sum(1 for j in jobs if j.outcome == "fail"),
                "jobs_stalling": sum(1 for j in jobs if j.outcome == "stall"),
                "jobs_with_short_links": sum(1 for j in jobs if j.url_ttl_s == self.plan.simulator["short_url_ttl_s"]),
                "jobs_with_poisoned_links": sum(1 for j in jobs if j.poisoned),
            },
            "provider_jobs_total": stats["jobs_total"],
            "provider_jobs_by_status": stats["jobs_by_status"],
            "settings": self.plan.settings,
            "drive_time_s": round(drive_s, 1),
            "logs": str(self.logs),
        }

    def close(self) -> None:
        self._harness_log.close()


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` runs and nothing is left behind."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_chaos(
    plan: ChaosPlan, out: Path = DEFAULT_OUT, say: Callable[[str], None] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Run the plan; write the figures to ``out``; return them with the invariants that failed."""
    say = say or (lambda line: print(line, flush=True))
    run_dir = out.parent / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    chaos = Chaos(plan, run_dir, say)
    # The harness's own log lines (the API it submits with, the nudges it sends) go to the screen
    # and to harness.log, which is searched for the key like every other log.
    configure_logging("WARNING", stream=_Tee(sys.stderr, chaos._harness_log))
    try:
        with _sigterm_as_interrupt():
            result = chaos.run()
    finally:
        chaos.close()
        configure_logging("WARNING")
    failures = invariant_failures(result)
    result = {"invariants_hold": not failures, "invariants_failed": failures, **result, "plan": asdict(plan)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result, failures
