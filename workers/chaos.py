"""``genline chaos``: the production footprint under fire, and the invariants that must survive it.

Starts its own Redis (on a free port, so it can restart it), a fresh PostgreSQL database, moto's
S3 server and the simulator injecting faults (429 with Retry-After, 500/503, timeouts, failed and
stalled jobs, result links that expire in 60 s); runs two worker processes and a poller; submits
the pipelines; and while they run, SIGKILLs a worker every few seconds (and restarts it), kills the
poller, restarts Redis (its data is lost: it keeps nothing on disk) and drops every PostgreSQL
connection. At the end it checks, from the simulator's own counts and our rows, that every pipeline
ended, none was charged twice, every stored video is byte-identical to the provider's, spend matches
the provider's bill to the cent, and the API key is in no log line and no database column.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import func, select, text

from config.constants import PIPELINE_TERMINAL
from config.settings import load_settings
from workers.processes import ProcessGroup

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@dataclass
class ChaosPlan:
    pipelines: int = 300
    worker_kill_every_s: float = 5.0
    poller_kills: int = 2
    redis_restarts: int = 1
    pg_drops: int = 1
    timeout_s: float = 900.0
    faults: dict[str, float] = field(
        default_factory=lambda: {
            "rate_429": 0.10,
            "rate_500": 0.025,
            "rate_503": 0.025,
            "rate_timeout": 0.02,
            "job_failure_rate": 0.01,
            "job_stall_rate": 0.01,
            "short_url_ttl_rate": 0.05,
        }
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A Redis of the run's own, so restarting it disturbs nothing else on the machine."""

    def __init__(self, log_dir: Path) -> None:
        self.port = _free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with (self.log_dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Chaos:
    def __init__(self, plan: ChaosPlan, out_dir: Path, say: Any = print) -> None:
        self.plan, self.say = plan, say
        self.var = out_dir / f"run-{uuid.uuid4().hex[:8]}"
        self.logs = self.var / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.key = "chaos-" + uuid.uuid4().hex
        self.db_name = f"genline_chaos_{uuid.uuid4().hex[:8]}"
        self.kills: dict[str, int] = {
            "worker_sigkill": 0,
            "poller_kill": 0,
            "redis_restart": 0,
            "pg_connections_dropped": 0,
            "exited_by_itself": 0,
        }
        self.rng = random.Random(7)

    def _env(self, redis_url: str, s3_endpoint: str, sim_url: str) -> dict[str, str]:
        return {
            "GENLINE_VAR_DIR": str(self.var),
            "GENLINE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db_name}",
            "GENLINE_BROKER_URL": redis_url,
            "GENLINE_STORAGE_URL": "s3://genline-chaos/outputs",
            "GENLINE_S3_ENDPOINT_URL": s3_endpoint,
            "APIMART_BASE_URL": sim_url,
            "APIMART_API_KEY": self.key,
            "GENLINE_POLL_INTERVAL_S": "0.5",
            "GENLINE_SWEEP_AFTER_S": "3",
            "GENLINE_VISIBILITY_TIMEOUT_S": "20",
            "GENLINE_HTTP_TIMEOUT_S": "2",
            "GENLINE_PROVIDER_BACKOFF_S": "0.2",
            "GENLINE_PROVIDER_BACKOFF_CAP_S": "2",
            "GENLINE_LEASE_S": "5",
            "GENLINE_STEP_MAX_ATTEMPTS": "30",
            "GENLINE_BREAKER_THRESHOLD": "25",
            "GENLINE_BREAKER_COOLDOWN_S": "2",
            "GENLINE_LOG_LEVEL": "INFO",
            "AWS_ACCESS_KEY_ID": "chaos",
            "AWS_SECRET_ACCESS_KEY": "chaos",
        }

    def run(self) -> dict[str, Any]:
        from provider.simulator import SimConfig, start_simulator
        from storage.objects import open_store
        from tests.support.moto_server import MotoServer

        redis = OwnRedis(self.logs)
        redis.start()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        sim_config = SimConfig(
            api_key=self.key,
            image_seconds=1.0,
            video_seconds=2.0,
            video_bytes=100_000,
            retry_after_s=0.5,
            timeout_hang_s=4.0,
            stall_seconds=20.0,
            short_url_ttl_s=60.0,
            seed=11,
        )
        sim_config.update(dict(self.plan.faults))
        started = time.monotonic()
        try:
            with MotoServer() as moto, start_simulator(sim_config) as sim:
                env = self._env(redis.url, moto.endpoint_url, sim.base_url)
                for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # moto's; for our own S3 client
                    os.environ.setdefault(name, env[name])
                settings = load_settings({k: v for k, v in env.items() if not k.startswith("AWS_")})
                from storage.migrate import upgrade

                upgrade(settings.database_url)
                store = open_store(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
                store.ensure_bucket()  # type: ignore[attr-defined]
                with ProcessGroup(log_dir=self.logs, env=env) as group:
                    self._drive(group, redis, settings)
                    group.stop()
                result = self._verify(settings, store, sim.base_url)
        finally:
            redis.stop()
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        result["wall_time_s"] = round(time.monotonic() - started, 1)
        return result

    # --- the run -------------------------------------------------------------------------------
    def _drive(self, group: ProcessGroup, redis: OwnRedis, settings: Any) -> None:
        from pipelines.api import Genline

        workers = ["worker-a", "worker-b"]
        for name in workers:
            group.start_worker(name, concurrency=2)
        group.start_poller()
        with Genline(settings) as api:
            for i in range(self.plan.pipelines):
                self._submit(api, i)
            self.say(f"chaos: submitted {self.plan.pipelines} pipelines; now breaking things")
            t0 = time.monotonic()
            events = self._schedule()
            next_kill = t0 + self.plan.worker_kill_every_s
            last_report = 0.0
            while True:
                now = time.monotonic()
                terminal = self._terminal(api)
                if terminal >= self.plan.pipelines:
                    break
                if now - t0 > self.plan.timeout_s:
                    self.say(f"chaos: timed out with {terminal}/{self.plan.pipelines} ended")
                    break
                if now >= next_kill:
                    self._kill(group, self.rng.choice(workers), restart=True)
                    self.kills["worker_sigkill"] += 1
                    next_kill = now + self.plan.worker_kill_every_s
                while events and now - t0 >= events[0][0]:
                    _, what = events.pop(0)
                    self._event(what, group, redis)
                if now - last_report > 5:
                    last_report = now
                    self.say(f"chaos: {terminal}/{self.plan.pipelines} ended, kills {self.kills}")
                self._restart_dead(group)
                time.sleep(0.25)
            for _, what in events:  # anything the schedule had not reached yet still happens
                self._event(what, group, redis)

    def _submit(self, api: Any, i: int) -> None:
        request = {
            "user_id": f"chaos-{i % 7}",
            "feature": "chaos",
            "description": f"Chaos product {i}.",
            "image": "https://images.example.com/product.png",
            "idempotency_key": f"chaos-{i}",
        }
        for _ in range(20):
            try:
                api.submit(request)
                return
            except Exception:  # noqa: BLE001  # the broker or database is being restarted: try again
                time.sleep(0.5)
        raise RuntimeError(f"could not submit pipeline {i}")

    def _schedule(self) -> list[tuple[float, str]]:
        events = [(4.0 + 9.0 * n, "poller") for n in range(self.plan.poller_kills)]
        events += [(8.0 + 10.0 * n, "redis") for n in range(self.plan.redis_restarts)]
        events += [(12.0 + 10.0 * n, "pg") for n in range(self.plan.pg_drops)]
        return sorted(events)

    def _event(self, what: str, group: ProcessGroup, redis: OwnRedis) -> None:
        if what == "poller":
            self._kill(group, "poller", restart=True)
            self.kills["poller_kill"] += 1
        elif what == "redis":
            redis.stop()
            time.sleep(1.0)
            redis.start()
            self.kills["redis_restart"] += 1
            self.say("chaos: Redis restarted (its data was not kept)")
        elif what == "pg":
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                    "AND pid <> pg_backend_pid()",
                    (self.db_name,),
                )
            self.kills["pg_connections_dropped"] += 1
            self.say("chaos: every PostgreSQL connection dropped")

    def _kill(self, group: ProcessGroup, name: str, *, restart: bool) -> None:
        for child in list(group.children):
            if child.name == name and child.alive():
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait(10)
        group.children[:] = [c for c in group.children if c.name != name]
        if restart:
            if name == "poller":
                group.start_poller()
            else:
                group.start_worker(name, concurrency=2)

    def _restart_dead(self, group: ProcessGroup) -> None:
        """A child that died by itself (not killed here) is restarted too, and counted."""
        for child in list(group.children):
            if not child.alive():
                self.say(f"chaos: {child.name} exited with {child.proc.returncode}; restarting it")
                self.kills["exited_by_itself"] += 1
                self._kill(group, child.name, restart=True)

    @staticmethod
    def _terminal(api: Any) -> int:
        from storage.models import Pipeline

        try:
            with api.runtime.db.transaction() as s:
                return int(
                    s.scalar(
                        select(func.count())
                        .select_from(Pipeline)
                        .where(Pipeline.status.in_([str(p) for p in PIPELINE_TERMINAL]))
                    )
                    or 0
                )
        except Exception:  # noqa: BLE001  # connections were just dropped
            return 0

    # --- the verdict ---------------------------------------------------------------------------
    def _verify(self, settings: Any, store: Any, sim_url: str) -> dict[str, Any]:
        from storage.db import Database
        from storage.models import Pipeline, ProviderCall, ProviderJob, Step

        db = Database(settings.database_url)
        stats = httpx.get(f"{sim_url}/_sim/stats", timeout=30).json()
        with db.transaction() as s:
            pipelines = s.scalars(select(Pipeline)).all()
            videos = dict(
                s.execute(
                    select(Step.pipeline_id, ProviderJob.task_id)
                    .join(ProviderJob, ProviderJob.step_id == Step.id)
                    .where(Step.kind == "video", ProviderJob.status == "completed")
                ).all()
            )
            spend = s.scalar(select(func.coalesce(func.sum(ProviderCall.cost_usd), 0))) or Decimal(0)
            unknown_jobs = (
                s.scalar(select(func.count()).select_from(ProviderJob).where(ProviderJob.status == "unknown")) or 0
            )
            db_text = " ".join(
                str(row)
                for table in ("pipelines", "steps", "provider_jobs", "stored_objects", "provider_calls")
                for row in s.execute(text(f"SELECT * FROM {table}"))
            )  # noqa: S608
        db.dispose()
        succeeded = [p for p in pipelines if p.status == "succeeded"]
        failed = [p for p in pipelines if p.status == "failed"]
        verified = lost = 0
        for p in succeeded:
            try:
                data = store.read_bytes(f"outputs/{p.id}/video.mp4")
                task = httpx.get(f"{sim_url}/_sim/tasks/{videos[p.id]}", timeout=30).json()
                ok = hashlib.sha256(data).hexdigest() in {item["sha256"] for item in task.get("items", [])}
            except Exception:  # noqa: BLE001  # a missing object or task counts as lost
                ok = False
            verified += ok
            lost += not ok
        logs = "".join(p.read_text(errors="replace") for p in self.logs.glob("*.log"))
        by_code: dict[str, int] = {}
        for p in failed:
            by_code[p.error_code or "none"] = by_code.get(p.error_code or "none", 0) + 1
        billed = Decimal(str(stats["billed_usd"]))
        return {
            "pipelines": self.plan.pipelines,
            "terminal": sum(1 for p in pipelines if p.status in PIPELINE_TERMINAL),
            "succeeded": len(succeeded),
            "failed_with_reason": sum(1 for p in failed if p.error_code and p.error_message),
            "failed_without_reason": sum(1 for p in failed if not (p.error_code and p.error_message)),
            "failed_by_code": by_code,
            "duplicate_paid_jobs": int(stats["duplicate_jobs"]) + int(stats["keyless"]["jobs_created"]),
            "provider_jobs_total": stats["jobs_total"],
            "submits_of_unknown_outcome": unknown_jobs,
            "stored_objects_verified": verified,
            "lost_outputs": lost,
            "spend_recorded_usd": float(round(Decimal(spend), 6)),
            "spend_billed_by_provider_usd": float(round(billed, 6)),
            "secrets_found_in_logs": logs.count(self.key) + db_text.count(self.key),
            "kills": dict(self.kills),
            "redis_data_kept": False,
            "faults": self.plan.faults,
            "provider_requests_by_status": stats["requests_by_status"],
        }


def invariant_failures(result: dict[str, Any]) -> list[str]:
    checks = [
        (result["terminal"] == result["pipelines"], "every pipeline ended"),
        (result["failed_without_reason"] == 0, "no pipeline failed without a reason"),
        (result["duplicate_paid_jobs"] == 0, "no paid job was started twice"),
        (result["stored_objects_verified"] == result["succeeded"], "every stored video matches the provider's"),
        (result["lost_outputs"] == 0, "no output was lost"),
        (
            round(result["spend_recorded_usd"], 2) == round(result["spend_billed_by_provider_usd"], 2),
            "recorded spend matches the provider's bill to the cent",
        ),
        (result["secrets_found_in_logs"] == 0, "the API key is in no log line or database column"),
    ]
    return [what for ok, what in checks if not ok]


def run_chaos(plan: ChaosPlan, out: Path, say: Any = print) -> tuple[dict[str, Any], list[str]]:
    result = Chaos(plan, out.parent, say).run()
    failures = invariant_failures(result)
    result["invariants_failed"] = failures
    result["plan"] = asdict(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result, failures
