"""The verdict of a chaos run: figures read from our rows, our storage, the simulator's own counts
and every log line, and the invariants they must satisfy.

- terminal / succeeded / failed_with_reason / failed_without_reason: the ``pipelines`` table.
- duplicate_paid_jobs: the simulator's ``/_sim/stats``: jobs created beyond the first for one
  idempotency key, plus jobs created by a submit that carried no key at all.
- stored_objects_verified / lost_outputs: each succeeded pipeline's video is read back from S3,
  hashed, and compared with its ``stored_objects`` row and with the sha256 the simulator reports
  for the task the video step completed (``/_sim/tasks/{task_id}``).
- spend_recorded_usd (sum of the audit log) against spend_billed_by_provider_usd (the simulator's
  bill, read once no job is still rendering): they may differ by less than $0.001 (SPEND_TOLERANCE_USD).
  A chat whose answer was lost is booked at its most, marked estimated, and set to the truth when
  the same request is answered (``pipelines/spend.py`` ``reconcile``).
- the per-user spend cap (``caps``): no seller's audit spend, nor any ledger row's spent + reserved,
  passes the cap; the cap refused some pipelines at submit; nothing is left reserved at the end.
  A pipeline the cap stopped mid-way (a costlier fallback it could not top up) fails with
  ``spend_cap_exceeded``: a reason of its own, not counted against the provider's faults.
- secrets_found_in_logs: occurrences of the API key in every line of every log (children, Redis,
  the harness's own output), every row of every table, and every key left in Redis.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

CENT = Decimal("0.01")
RUNNING_JOB_STATES = ("pending", "processing", "submitted", "queued", "running")
# Log events worth counting: the recoveries (and the alarms) the disruptions caused.
EVENTS = (
    "step_renudged",
    "step_will_retry",
    "step_failed",
    "nudge_failed",
    "provider_retry",
    "model_fallback",
    "orphan_suspected",
    "poller_round_failed",
    "poll_crashed",
    "copy_at_risk",
)


def settled_stats(sim_url: str, wait_s: float) -> dict[str, Any]:
    """``/_sim/stats`` once no provider job is still rendering (a job is billed when it completes,
    so an orphan still running would be missing from the bill), or after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        stats: dict[str, Any] = httpx.get(f"{sim_url}/_sim/stats", timeout=30).json()
        running = sum(n for status, n in stats["jobs_by_status"].items() if status in RUNNING_JOB_STATES)
        stats["jobs_still_running_at_bill"] = running
        if running == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(1.0)


def cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


class Verdict:
    def __init__(self, db_url: str, store: Any, sim_url: str, secret: str) -> None:
        self.engine = create_engine(db_url, poolclass=NullPool)
        self.store, self.sim_url, self.secret = store, sim_url, secret

    def rows(self, sql: str) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql)).all())

    def figures(self, pipelines_planned: int, stats: dict[str, Any]) -> dict[str, Any]:
        pipelines = self.rows("SELECT id, status, error_code, error_message FROM pipelines")
        by_status = Counter(p.status for p in pipelines)
        failed = [p for p in pipelines if p.status == "failed"]
        with_reason = [p for p in failed if p.error_code and (p.error_message or "").strip()]
        succeeded = [p.id for p in pipelines if p.status == "succeeded"]
        outputs = self.outputs(succeeded)
        keyless = int(stats["keyless"]["jobs_created"])
        return {
            "pipelines": pipelines_planned,
            "pipelines_in_db": len(pipelines),
            "terminal": sum(by_status[s] for s in ("succeeded", "failed", "cancelled")),
            "succeeded": by_status["succeeded"],
            "failed_with_reason": len(with_reason),
            "failed_without_reason": len(failed) - len(with_reason),
            "cancelled": by_status["cancelled"],
            "not_terminal_by_status": {
                s: n for s, n in by_status.items() if s not in ("succeeded", "failed", "cancelled")
            },
            "failed_by_code": dict(Counter(p.error_code or "(none)" for p in failed).most_common()),
            "duplicate_paid_jobs": int(stats["duplicate_jobs"]) + keyless,
            "duplicate_jobs_by_key": int(stats["duplicate_jobs"]),
            "jobs_created_without_key": keyless,
            **outputs,
            **self.spend(stats),
        }

    # --- outputs ---------------------------------------------------------------------------------
    def outputs(self, succeeded: list[str]) -> dict[str, Any]:
        objects = {
            (r.pipeline_id, r.kind): r
            for r in self.rows("SELECT pipeline_id, kind, key, sha256, size FROM stored_objects")
        }
        tasks = {
            (r.pipeline_id, r.kind): r.task_id
            for r in self.rows(
                "SELECT s.pipeline_id, s.kind, j.task_id FROM steps s JOIN provider_jobs j ON j.step_id = s.id "
                "WHERE s.kind IN ('image', 'video') AND j.status = 'completed'"
            )
        }
        verified = {"video": 0, "image": 0}
        lost: list[dict[str, str]] = []
        for pid in succeeded:
            for kind in ("video", "image"):
                why = self._check_one(objects.get((pid, kind)), tasks.get((pid, kind)))
                if why is None:
                    verified[kind] += 1
                elif kind == "video":
                    lost.append({"pipeline_id": pid, "why": why})
        return {
            "stored_objects_verified": verified["video"],
            "stored_images_verified": verified["image"],
            "lost_outputs": len(lost),
            "lost_output_examples": lost[:10],
        }

    def _check_one(self, obj: Any, task_id: str | None) -> str | None:
        """None when the stored bytes are exactly what the provider produced; else why not."""
        if obj is None:
            return "no stored_objects row"
        if task_id is None:
            return "no completed provider job"
        try:
            data = self.store.read_bytes(obj.key)
        except Exception as exc:  # noqa: BLE001  # missing object: lost
            return f"cannot read {obj.key}: {type(exc).__name__}"
        digest = hashlib.sha256(data).hexdigest()
        produced = httpx.get(f"{self.sim_url}/_sim/tasks/{task_id}", timeout=30).json()
        theirs = {item["sha256"] for item in produced.get("items", [])}
        if digest != obj.sha256 or len(data) != obj.size:
            return "stored bytes differ from the stored_objects row"
        if digest not in theirs:
            return "stored bytes differ from what the provider produced"
        return None

    # --- money -----------------------------------------------------------------------------------
    def spend(self, stats: dict[str, Any]) -> dict[str, Any]:
        (total,) = self.rows("SELECT COALESCE(SUM(cost_usd), 0) FROM provider_calls")[0]
        by_op = {
            r.operation: (Decimal(r.cost), int(r.costed))
            for r in self.rows(
                "SELECT operation, COALESCE(SUM(cost_usd), 0) AS cost, "
                "COUNT(*) FILTER (WHERE cost_usd > 0) AS costed FROM provider_calls GROUP BY operation"
            )
        }
        recorded, billed = Decimal(total), Decimal(str(stats["billed_usd"]))
        our_tasks = {r.task_id for r in self.rows("SELECT task_id FROM provider_jobs WHERE task_id IS NOT NULL")}
        billed_tasks = set(stats.get("billed_by_task", {}))
        (chat_timeouts,) = self.rows(
            "SELECT COUNT(*) FROM provider_calls WHERE operation = 'chat' AND error_code = 'provider_timeout'"
        )[0]
        booked_twice = self.rows(
            "SELECT step_id FROM provider_calls WHERE operation = 'poll' AND cost_usd > 0 "
            "GROUP BY step_id HAVING COUNT(*) > 1"
        )
        return {
            "spend_recorded_usd": float(recorded),
            "spend_billed_by_provider_usd": float(billed),
            "spend_matches_to_the_cent": cents(recorded) == cents(billed),
            "spend_difference_usd": float(recorded - billed),
            "spend_detail": {
                "chat_recorded_usd": float(by_op.get("chat", (Decimal(0), 0))[0]),
                "chat_billed_usd": stats["billed_chat_usd"],
                "chat_calls_recorded_with_cost": by_op.get("chat", (Decimal(0), 0))[1],
                "chat_calls_billed": stats["chat_calls"],
                # a chat answer that hangs past our timeout was still billed: we record no cost for it
                "chat_calls_timed_out": int(chat_timeouts),
                "media_recorded_usd": float(by_op.get("poll", (Decimal(0), 0))[0]),
                "media_billed_usd": stats["billed_media_usd"],
                "media_jobs_recorded_with_cost": by_op.get("poll", (Decimal(0), 0))[1],
                "media_jobs_billed": len(billed_tasks),
                "billed_jobs_unknown_to_us": len(billed_tasks - our_tasks),
                "steps_with_media_cost_booked_twice": len(booked_twice),
                "provider_jobs_still_running_at_bill": stats["jobs_still_running_at_bill"],
            },
        }

    # --- the spend cap ---------------------------------------------------------------------------
    def caps(self, refused: int, limit_usd: Decimal) -> dict[str, Any]:
        """Each seller's spend against the per-user cap: from the audit log (what was billed to
        them) and from the cap's ledger rows (spent + still reserved), after every process stopped."""
        by_user = {
            r.user_id: Decimal(r.cost)
            for r in self.rows(
                "SELECT user_id, COALESCE(SUM(cost_usd), 0) AS cost FROM provider_calls "
                "WHERE user_id IS NOT NULL GROUP BY user_id"
            )
        }
        ledger = self.rows("SELECT subject, reserved_micros, spent_micros, limit_micros FROM spend_caps")
        over = sorted(u for u, cost in by_user.items() if cost > limit_usd)
        ledger_over = [r.subject for r in ledger if r.reserved_micros + r.spent_micros > r.limit_micros]
        return {
            "user_cap_usd": float(limit_usd),
            "refused_at_cap": refused,
            "highest_user_spend_usd": float(max(by_user.values(), default=Decimal(0))),
            "users_over_cap": len(over) + len(ledger_over),
            "cap_reserved_left_usd": float(sum(Decimal(r.reserved_micros) for r in ledger) / 1_000_000),
        }

    # --- secrets ---------------------------------------------------------------------------------
    def secrets(self, log_files: list[Path], redis_client: Any) -> dict[str, Any]:
        found: Counter[str] = Counter()
        events: Counter[str] = Counter()
        lines = rows = keys = 0
        for path in log_files:
            with path.open(errors="replace") as fh:
                for line in fh:
                    lines += 1
                    found[f"log:{path.name}"] += line.count(self.secret)
                    if line.startswith("{") and '"event"' in line:
                        events[_event_of(line)] += 1
        with self.engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                for row in conn.execute(text(f'SELECT * FROM "{table}"')):  # noqa: S608  # names from the catalog
                    rows += 1
                    found[f"table:{table}"] += str(tuple(row)).count(self.secret)
        if redis_client is not None:
            for key in redis_client.scan_iter(count=500):
                keys += 1
                found["redis"] += _redis_value(redis_client, key).count(self.secret.encode())
        return {
            "secrets_found_in_logs": sum(found.values()),
            "secrets_found_where": {k: v for k, v in found.items() if v},
            "secret_search": {"log_files": len(log_files), "log_lines": lines, "db_rows": rows, "redis_keys": keys},
            "log_events": {name: events[name] for name in EVENTS if events[name]},
        }

    def provider_errors(self) -> dict[str, int]:
        """Failed provider calls by error code, as the audit log saw them (timeouts included)."""
        return {
            r.error_code: int(r.n)
            for r in self.rows(
                "SELECT error_code, COUNT(*) AS n FROM provider_calls WHERE error_code IS NOT NULL "
                "GROUP BY error_code ORDER BY n DESC"
            )
        }

    def close(self) -> None:
        self.engine.dispose()


def _event_of(line: str) -> str:
    try:
        return str(json.loads(line).get("event", ""))
    except ValueError:
        return ""


def _redis_value(client: Any, key: bytes) -> bytes:
    """A key's name and content as bytes, whatever its type (never DUMP: it may compress)."""
    kind = client.type(key)
    if kind == b"string":
        value: Any = client.get(key)
    elif kind == b"list":
        value = client.lrange(key, 0, -1)
    elif kind == b"hash":
        value = client.hgetall(key)
    elif kind == b"set":
        value = client.smembers(key)
    elif kind == b"zset":
        value = client.zrange(key, 0, -1)
    else:
        value = b""
    return key + repr(value).encode()


SPEND_TOLERANCE_USD = 0.001  # |recorded - billed|, whatever the run's size


def invariant_failures(result: dict[str, Any]) -> list[str]:
    """Plain sentences for every invariant that does not hold; empty when the run passed."""
    checks = [
        (
            result["terminal"] == result["pipelines"],
            f"terminal {result['terminal']} != pipelines {result['pipelines']}",
        ),
        (result["failed_without_reason"] == 0, f"{result['failed_without_reason']} pipelines failed without a reason"),
        (result["duplicate_paid_jobs"] == 0, f"{result['duplicate_paid_jobs']} provider jobs were paid twice"),
        (
            result["stored_objects_verified"] == result["succeeded"],
            f"stored_objects_verified {result['stored_objects_verified']} != succeeded {result['succeeded']}",
        ),
        (result["lost_outputs"] == 0, f"{result['lost_outputs']} outputs were lost"),
        (
            abs(result["spend_difference_usd"]) < SPEND_TOLERANCE_USD,
            f"spend recorded ${result['spend_recorded_usd']} differs from billed "
            f"${result['spend_billed_by_provider_usd']} by ${result['spend_difference_usd']:.6f} "
            f"(allowed: under ${SPEND_TOLERANCE_USD})",
        ),
        (result.get("users_over_cap", 0) == 0, f"{result.get('users_over_cap')} sellers spent past their cap"),
        (result.get("refused_at_cap", 1) > 0, "the spend cap never refused a pipeline: it was not tested"),
        (
            result.get("cap_reserved_left_usd", 0) == 0,
            f"${result.get('cap_reserved_left_usd')} is still reserved after every pipeline ended",
        ),
        (result["secrets_found_in_logs"] == 0, f"the API key was found {result['secrets_found_in_logs']} times"),
        (not result["disruptions_missed"], f"planned disruptions did not happen: {result['disruptions_missed']}"),
        (
            result["max_recovery_wait_s"] is not None
            and result["max_recovery_wait_s"] <= result["max_recovery_wait_allowed_s"],
            f"a killed worker's step waited {result['max_recovery_wait_s']} s to run again "
            f"(allowed: {result['max_recovery_wait_allowed_s']} s)",
        ),
        (
            result["failed_with_reason"] - result["failed_by_code"].get("spend_cap_exceeded", 0)
            <= _faulted_jobs(result),
            f"{result['failed_with_reason']} pipelines failed ({result['failed_by_code']}), more than the "
            f"{_faulted_jobs(result)} jobs the "
            "provider was made to fail (failed jobs, short-lived and dead result links)",
        ),
        (
            result["steps_of_killed_workers_never_run_again"] == 0,
            f"{result['steps_of_killed_workers_never_run_again']} steps of killed workers never ran again",
        ),
    ]
    return [what for ok, what in checks if not ok]


class RecoveryWatch:
    """How long the steps a killed worker was running waited before they ran again.

    At each worker kill the steps whose lease the killed processes held (``lease_owner`` is
    ``host:pid``) are noted with their attempts; while the run goes on, each is watched until it is
    claimed again (its attempts grow) or ends. ``max_recovery_wait_s`` is the longest such wait."""

    def __init__(self, db_url: str) -> None:
        self.engine = create_engine(db_url, poolclass=NullPool)  # a fresh connection each look
        self.waiting: dict[str, tuple[float, int]] = {}  # step id -> (killed at, attempts then)
        self.waits: list[float] = []

    def killed(self, owners: list[str], at: float) -> None:
        rows = self._rows(
            "SELECT id, attempts FROM steps WHERE status = 'running' AND lease_owner = ANY(:owners)", owners=owners
        )
        for step_id, attempts in rows:
            self.waiting[step_id] = (at, attempts)

    def tick(self, now: float) -> None:
        if not self.waiting:
            return
        rows = self._rows("SELECT id, attempts, status FROM steps WHERE id = ANY(:ids)", ids=list(self.waiting))
        for step_id, attempts, status in rows:
            at, before = self.waiting[step_id]
            if attempts > before or status in ("succeeded", "failed", "cancelled"):
                self.waits.append(now - at)
                del self.waiting[step_id]

    def _rows(self, sql: str, **params: Any) -> list[Any]:
        try:
            with self.engine.connect() as conn:
                return list(conn.execute(text(sql), params))
        except Exception:  # noqa: BLE001  # the connections are being dropped: look again next tick
            return []

    def figures(self) -> dict[str, Any]:
        return {
            "max_recovery_wait_s": round(max(self.waits), 1) if self.waits else None,
            "steps_of_killed_workers": len(self.waits) + len(self.waiting),
            "steps_of_killed_workers_never_run_again": len(self.waiting),
        }

    def close(self) -> None:
        self.engine.dispose()


def _faulted_jobs(result: dict[str, Any]) -> int:
    """Provider jobs the run made fail on purpose: a pipeline may fail for each, and for nothing else."""
    injected = result["faults_injected"]
    return int(injected["jobs_failing"] + injected["jobs_with_short_links"] + injected["jobs_with_poisoned_links"])
