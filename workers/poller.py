"""The poller: one asyncio process that watches every in-flight provider job.

Waiting costs nothing: a job in flight is a row with a ``next_poll_at``. Each round the poller
claims the due rows (a lease, with ``SKIP LOCKED`` on PostgreSQL, so several pollers never poll
one job twice), reads their states concurrently through the gateway, and applies all answers in
one transaction, audit rows included. Finished jobs move their pipelines on.

The hot path is written for thousands of polls a second from one process (one interpreter lock
shared by the HTTP reads, the claims and the writes), so the database side stays out of the ORM
and costs a few microseconds of Python a job: on PostgreSQL the claim is one ``UPDATE …
RETURNING`` (lease and audit context together), the routine answers (still pending or
processing, or a failed read to retry) are one ``UPDATE … FROM unnest(arrays)`` and the audit rows
go in by ``COPY``. A completed job is finished by Core statements too (the job's row, then the
engine's ``finish_step``, which the worker's completions use); only the rare endings (failed,
cancelled, unknown to the provider) load ORM objects and go through ``fail_step``, in the same
transaction. The reads go through the gateway on ``provider.poll_client.make_task_reader``'s reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Integer, String, Table, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from genline.config.clock import utcnow
from genline.config.constants import PIPELINE_TERMINAL, JobStatus
from genline.config.errors import AccountError, ProviderError, ProviderNotFound
from genline.config.logging import get_logger
from genline.pipelines.audit import write_audit_many
from genline.pipelines.engine import (
    PIPELINE_COST,
    Effects,
    apply_effects,
    fail_step,
    finish_from_rows,
    finish_step,
    pipeline_rows,
)
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext, CallRecord, Gateway, MemoryAuditSink, TaskReader
from genline.provider.poll_client import make_task_reader
from genline.provider.stages import PAUSE_KEY, pause_paid_work
from genline.provider.wire import TaskState
from genline.storage.models import Pipeline, ProviderJob, Step, UTCDateTime
from genline.workers.sweeper import sweep
from genline.workers.wakeup import Doorbell

log = get_logger("genline.poller")
POLLED = (JobStatus.PENDING.value, JobStatus.PROCESSING.value)
ENDED = frozenset({JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value})
ACCOUNT_PROBE_S = 10.0  # while the account is refused, one read this often tells when it works again


class LeaseLost(Exception):  # noqa: N818  # not an error: a job skipped
    """The answer for a claimed job that was not read: its claim was held past half its lease."""


LEASE_LOST = LeaseLost("claim held past half its lease; left to the next claim")
_POLLED_SQL = ", ".join(f"'{s}'" for s in POLLED)  # constants, not input
_JOBS = cast(Table, ProviderJob.__table__)
_STEPS = cast(Table, Step.__table__)
_PIPELINES = cast(Table, Pipeline.__table__)

# PostgreSQL: lease the due jobs and read what their polls need, audit context included, in one
# statement. Times come back as epoch seconds (the columns hold naive UTC). Written in psycopg's
# parameter style: the hot statements go to the driver as they are (``exec_driver_sql``).
_CLAIM_PG = f"""
    WITH due AS (
        SELECT id FROM provider_jobs
        WHERE status IN ({_POLLED_SQL}) AND next_poll_at <= %(now)s
          AND (lease_until IS NULL OR lease_until < %(now)s)
        ORDER BY next_poll_at
        LIMIT %(n)s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE provider_jobs AS j SET lease_until = %(lease)s
    FROM due, steps AS st, pipelines AS p
    WHERE j.id = due.id AND st.id = j.step_id AND p.id = st.pipeline_id
    RETURNING j.id, j.task_id, j.kind, j.step_id, j.model, j.units, j.estimated_time_s,
        CAST(EXTRACT(EPOCH FROM j.submitted_at) AS float8), CAST(EXTRACT(EPOCH FROM j.next_poll_at) AS float8),
        j.polls, p.user_id, p.feature, p.id
"""

# PostgreSQL: every routine answer of a round in one statement. NULL keeps the column as it is;
# a job whose status changed meanwhile (cancelled, say) is left alone. The columns other than the
# ids travel as comma-separated text (statuses are JobStatus words, the rest numbers; '' is NULL):
# joining strings costs a fraction of what psycopg's list dumper costs a value.
_ROUTINE_PG = f"""
    UPDATE provider_jobs AS j SET
        lease_until = NULL,
        polls = j.polls + 1,
        status = COALESCE(v.status, j.status),
        progress = COALESCE(v.progress, j.progress),
        estimated_time_s = COALESCE(v.estimated_time_s, j.estimated_time_s),
        next_poll_at = to_timestamp(v.next_s) AT TIME ZONE 'UTC'
    FROM unnest(
        CAST(%(ids)s AS text[]),
        string_to_array(%(statuses)s, ',', ''),
        CAST(string_to_array(%(progress)s, ',', '') AS integer[]),
        CAST(string_to_array(%(estimates)s, ',', '') AS integer[]),
        CAST(string_to_array(%(next_s)s, ',') AS float8[])
    ) AS v(id, status, progress, estimated_time_s, next_s)
    WHERE j.id = v.id AND j.status IN ({_POLLED_SQL})
"""

# A completed job's row, if it is still being polled (a cancel meanwhile wins).
_JOB_COMPLETED = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.status.in_(POLLED))
    .values(
        status=JobStatus.COMPLETED.value,
        progress=100,
        result=bindparam("b_result", type_=_JOBS.c.result.type),
        completed_at=bindparam("b_completed", type_=UTCDateTime()),
        cost_usd=bindparam("b_cost", type_=_JOBS.c.cost_usd.type),
        next_poll_at=None,
        lease_until=None,
        polls=_JOBS.c.polls + 1,
    )
)

# Elsewhere (SQLite): the same update, one parameter set per job.
_ROUTINE_ANY = (
    update(_JOBS)
    # Two comparisons, not ``IN``: SQLAlchemy expands an ``IN`` list at execution, which an
    # executemany (several routine answers in one round on SQLite) refuses.
    .where(_JOBS.c.id == bindparam("b_id"), or_(*(_JOBS.c.status == status for status in POLLED)))
    .values(
        lease_until=None,
        polls=_JOBS.c.polls + 1,
        status=func.coalesce(bindparam("b_status", type_=String()), _JOBS.c.status),
        progress=func.coalesce(bindparam("b_progress", type_=Integer()), _JOBS.c.progress),
        estimated_time_s=func.coalesce(bindparam("b_estimate", type_=Integer()), _JOBS.c.estimated_time_s),
        next_poll_at=bindparam("b_next", type_=UTCDateTime()),
    )
)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs more to make, per job and round
class Claimed:
    job_id: str
    task_id: str
    kind: str
    step_id: str
    ctx: CallContext
    units: float
    estimated_time_s: int | None
    submitted_s: float | None  # epoch seconds
    due_s: float  # epoch seconds: when this poll was due
    polls: int  # polls before this one
    lease_deadline: float  # time.monotonic() after which this claim is no longer trusted


@dataclass(slots=True)
class Sorted:
    """A round's answers, sorted: the routine ones as columns for one bulk update (NULL: keep
    the column), and those that end a job."""

    ids: list[str] = field(default_factory=list)
    statuses: list[str | None] = field(default_factory=list)
    progress: list[int | None] = field(default_factory=list)
    estimates: list[int | None] = field(default_factory=list)
    next_s: list[float] = field(default_factory=list)
    ended: list[tuple[Claimed, TaskState | BaseException]] = field(default_factory=list)

    def routine_params(self) -> dict[str, Any]:
        """``_ROUTINE_PG``'s parameters."""
        return {
            "ids": self.ids,
            "statuses": ",".join(["" if s is None else s for s in self.statuses]),
            "progress": ",".join(["" if p is None else str(p) for p in self.progress]),
            "estimates": ",".join(["" if e is None else str(e) for e in self.estimates]),
            "next_s": ",".join(map(repr, self.next_s)),
        }


def next_delay(interval: float, elapsed_s: float, estimated_s: int | None) -> float:
    """Seconds to the next poll: the cadence, stretched early in a long render (the provider's
    estimate says nothing is coming yet) and when a job runs far past its estimate."""
    if not estimated_s:
        return interval
    early = 0.8 * estimated_s - elapsed_s
    if early > interval:
        return min(30.0, max(interval, early / 2))
    overrun = elapsed_s / estimated_s
    if overrun > 2:
        return min(60.0, interval * min(8.0, overrun - 1))
    return interval


def next_poll_s(due_s: float, now_s: float, delay: float) -> float:
    """When a job still running is read next: one delay after this poll was due, not after its
    answer was applied, so a round that runs late does not stretch the cadence. (Counted from the
    answer, a 2 s cadence ran at 2 s plus each poll's lateness, and a poller behind schedule
    applied fewer polls than were due while looking on schedule; docs/PERFORMANCE.md.)
    Never sooner than half a delay from now: a poller far behind reads a job at most about twice
    a delay, not back to back."""
    return max(due_s + delay, now_s + delay / 2)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _naive(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


class Poller:
    def __init__(
        self,
        rt: Runtime,
        *,
        client: TaskReader | None = None,
        on_applied: Callable[[list[float]], None] | None = None,
    ) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.audit = MemoryAuditSink()
        self._client = client
        self.gateway: Gateway | None = None
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        # After the provider refused a read with 401/402 the poller holds: one probe read every
        # ACCOUNT_PROBE_S until a read succeeds again or an operator lifts the pause.
        self.held_since: float | None = None
        self._last_probe = 0.0
        # Told, after each round is written, how late each of its polls was applied (applied time
        # minus due time, in seconds): what the benchmark and the metrics read. None: not measured.
        self.on_applied = on_applied

    async def _gateway(self) -> Gateway:
        if self.gateway is None:
            # A read may take at most a third of a claim's lease, so a round's answers are written
            # while its claim still holds and no other round can have taken its jobs meanwhile.
            s = self.settings
            reads = s.with_overrides(http_timeout_s=min(s.http_timeout_s, s.lease_s / 3))
            client = self._client or make_task_reader(reads, max_connections=s.poller_concurrency)
            self.gateway = Gateway(self.rt.catalog, self.audit, async_client=client, retry=self.rt.retry_policy)
        return self.gateway

    # --- claim ---------------------------------------------------------------------------------
    def claim(self, limit: int | None = None) -> list[Claimed]:
        """Lease up to ``limit`` (``poller_batch``) due jobs; they come back earliest due first."""
        limit = self.settings.poller_batch if limit is None else limit
        deadline = time.monotonic() + self.settings.lease_s / 2  # half the lease: room to write
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.lease_s)
        with self.rt.db.transaction() as s:
            if self.rt.db.is_postgres:
                params = {"now": _naive(now), "lease": _naive(lease), "n": limit}
                rows: Sequence[Any] = s.connection().exec_driver_sql(_CLAIM_PG, params).all()
            else:
                rows = self._claim_simple(s, now, lease, limit)
        return self._claimed(rows, now, deadline)

    @staticmethod
    def _claimed(rows: Sequence[Any], now: datetime, deadline: float) -> list[Claimed]:
        fallback = now.timestamp()
        claimed = [
            Claimed(
                job_id,
                task_id or "",
                kind,
                step_id,
                CallContext(user_id, feature, pipeline_id, step_id, model),
                units,
                estimated,
                submitted_s,
                fallback if due_s is None else due_s,
                polls,
                deadline,
            )
            for (
                job_id,
                task_id,
                kind,
                step_id,
                model,
                units,
                estimated,
                submitted_s,
                due_s,
                polls,
                user_id,
                feature,
                pipeline_id,
            ) in rows
        ]
        claimed.sort(key=lambda c: c.due_s)
        return claimed

    def _claim_simple(self, s: Session, now: datetime, lease: datetime, limit: int) -> Sequence[Any]:
        """SQLite: no SKIP LOCKED and no RETURNING from a join, but ``BEGIN IMMEDIATE`` makes the
        transaction the only writer, so a select, an update and a select are as good."""
        jobs = _JOBS.c
        due = (
            select(jobs.id)
            .where(
                jobs.status.in_(POLLED),
                jobs.next_poll_at <= now,
                (jobs.lease_until.is_(None)) | (jobs.lease_until < now),
            )
            .order_by(jobs.next_poll_at)
            .limit(limit)
        )
        ids = list(s.scalars(due))
        if not ids:
            return []
        s.execute(update(_JOBS).where(jobs.id.in_(ids)).values(lease_until=lease))
        rows = s.execute(
            select(
                jobs.id,
                jobs.task_id,
                jobs.kind,
                jobs.step_id,
                jobs.model,
                jobs.units,
                jobs.estimated_time_s,
                jobs.submitted_at,
                jobs.next_poll_at,
                jobs.polls,
                _PIPELINES.c.user_id,
                _PIPELINES.c.feature,
                _PIPELINES.c.id,
            )
            .join(_STEPS, _STEPS.c.id == jobs.step_id)
            .join(_PIPELINES, _PIPELINES.c.id == _STEPS.c.pipeline_id)
            .where(jobs.id.in_(ids))
        ).all()
        return [(*r[:7], _epoch(r[7]), _epoch(r[8]), *r[9:]) for r in rows]

    def release(self, claimed: list[Claimed]) -> None:
        """End the leases of claimed jobs that will not be read, so any poller may take them now."""
        if claimed:
            with self.rt.db.transaction() as s:
                s.execute(update(_JOBS).where(_JOBS.c.id.in_([c.job_id for c in claimed])).values(lease_until=None))

    def seconds_to_next_due(self) -> float:
        """How long until the earliest job not leased is due (an idle poller sleeps just that long;
        the leased ones are being polled, and their answers move them on)."""
        now = utcnow()
        with self.rt.db.transaction() as s:
            due = s.scalar(
                select(func.min(ProviderJob.next_poll_at)).where(
                    ProviderJob.status.in_(POLLED),
                    (ProviderJob.lease_until.is_(None)) | (ProviderJob.lease_until < now),
                )
            )
        return float("inf") if due is None else (due - now).total_seconds()

    # --- poll ----------------------------------------------------------------------------------
    async def poll(self, claimed: list[Claimed]) -> list[TaskState | BaseException]:
        """Read every claimed job's state through the gateway, at most ``poller_concurrency`` at
        once, in the order given (earliest due first); a fixed set of readers walks the list (no
        task or semaphore per poll). A failed read is returned, not raised. A claim held past
        half its lease (a provider slow enough to hold a round that long) is not read: its
        answer is a ``LeaseLost`` and the job is left to the next claim."""
        gateway = await self._gateway()
        answers: list[TaskState | BaseException] = [LEASE_LOST] * len(claimed)
        work = iter(enumerate(claimed))
        monotonic = time.monotonic

        async def reader() -> None:
            for i, c in work:
                if monotonic() > c.lease_deadline:
                    continue
                try:
                    answers[i] = await gateway.poll(c.ctx, c.task_id, units=c.units)
                except Exception as exc:  # noqa: BLE001  # an answer like any other: _on_error decides
                    answers[i] = exc

        readers = min(self.settings.poller_concurrency, len(claimed))
        if readers == 1:
            await reader()
        elif readers:
            await asyncio.gather(*(reader() for _ in range(readers)))
        return answers

    # --- apply ---------------------------------------------------------------------------------
    def sort_answers(self, claimed: list[Claimed], answers: list[TaskState | BaseException], now_s: float) -> Sorted:
        """What each answer does to its job: routine (the next poll's time, and the status,
        progress and estimate the provider gave) or an ending. Failed reads are routine: the
        job is read again later (``_retry_delay``), except one the provider no longer knows."""
        interval = self.settings.poll_interval_s
        out = Sorted()
        for c, answer in zip(claimed, answers, strict=True):
            if isinstance(answer, TaskState):
                if answer.status in ENDED:
                    out.ended.append((c, answer))
                    continue
                if not answer.known_status:
                    log.warning("unknown_job_status", task_id=c.task_id, status=answer.status)
                estimate = answer.estimated_time_s or None
                elapsed = now_s - c.submitted_s if c.submitted_s is not None else 0.0
                out.ids.append(c.job_id)
                out.statuses.append(answer.status if answer.known_status else None)
                out.progress.append(answer.progress)
                out.estimates.append(estimate)
                out.next_s.append(
                    next_poll_s(c.due_s, now_s, next_delay(interval, elapsed, estimate or c.estimated_time_s))
                )
            elif answer is LEASE_LOST:
                continue
            elif isinstance(answer, ProviderNotFound):
                out.ended.append((c, answer))
            else:
                out.ids.append(c.job_id)
                out.statuses.append(None)
                out.progress.append(None)
                out.estimates.append(None)
                out.next_s.append(now_s + self._retry_delay(c.task_id, c.polls + 1, answer))
        return out

    def apply(
        self, claimed: list[Claimed], answers: list[TaskState | BaseException], records: list[CallRecord] | None = None
    ) -> Effects:
        """All answers of a round in one transaction: the audit rows in bulk, the routine answers
        in one statement, and ORM objects (steps, pipelines) only for the jobs that ended."""
        effects = Effects()
        now_s = time.time()
        todo = self.sort_answers(claimed, answers, now_s)
        records = self.audit.drain() if records is None else records
        with self.rt.db.transaction() as s, s.no_autoflush:
            self._book_each_completion_once(s, todo, records)
            write_audit_many(s, records)
            if todo.ids:
                self._write_routine(s, todo)
            if todo.ended:
                effects = self._apply_ended(s, todo.ended, now_s)
        if self.on_applied is not None:
            done = time.time()
            self.on_applied([done - c.due_s for c, a in zip(claimed, answers, strict=True) if a is not LEASE_LOST])
        return effects

    def _book_each_completion_once(self, s: Session, todo: Sorted, records: list[CallRecord]) -> None:
        """A job's cost is booked on the poll that completes it, once. If another round finished the
        job since this one claimed it (this claim's lease ran out while its reads were slow), this
        round's completed read books nothing: its jobs are locked here (PostgreSQL; SQLite's write
        transaction already runs alone), so the completions still open are the ones it applies."""
        done = {
            c.job_id: c.step_id for c, a in todo.ended if isinstance(a, TaskState) and a.status == JobStatus.COMPLETED
        }
        if not done:
            return
        query = select(_JOBS.c.id).where(_JOBS.c.id.in_(list(done)), _JOBS.c.status.in_(POLLED))
        if self.rt.db.is_postgres:
            query = query.with_for_update()
        still_open = set(s.connection().execute(query).scalars())
        finished_elsewhere = {step for job, step in done.items() if job not in still_open}
        for record in records:
            if record.operation == "poll" and record.cost_usd and record.ctx.step_id in finished_elsewhere:
                record.cost_usd, record.units = Decimal(0), None
                log.warning("completion_seen_twice", step_id=record.ctx.step_id)

    def _write_routine(self, s: Session, todo: Sorted) -> None:
        if self.rt.db.is_postgres:
            s.connection().exec_driver_sql(_ROUTINE_PG, todo.routine_params())
            return
        s.connection().execute(
            _ROUTINE_ANY,
            [
                {
                    "b_id": job_id,
                    "b_status": status,
                    "b_progress": progress,
                    "b_estimate": estimate,
                    "b_next": datetime.fromtimestamp(next_s, UTC),
                }
                for job_id, status, progress, estimate, next_s in zip(
                    todo.ids, todo.statuses, todo.progress, todo.estimates, todo.next_s, strict=True
                )
            ],
        )

    def _apply_ended(self, s: Session, ended: list[tuple[Claimed, TaskState | BaseException]], now_s: float) -> Effects:
        """The answers that end a job. A completed job by Core statements (``_completed``); the
        others through the ORM and the engine's transitions, their rows locked first on
        PostgreSQL. Either way a cancel committed meanwhile is seen, not overwritten."""
        effects = Effects()
        now = datetime.fromtimestamp(now_s, UTC)
        rare: list[tuple[Claimed, TaskState | BaseException]] = []
        for c, answer in ended:
            if isinstance(answer, TaskState) and answer.status == JobStatus.COMPLETED:
                effects.merge(self._completed(s, c, answer, now))
            else:
                rare.append((c, answer))
        if not rare:
            return effects
        ended = rare
        query = select(ProviderJob).where(ProviderJob.id.in_([c.job_id for c, _ in ended]))
        if self.rt.db.is_postgres:
            query = query.with_for_update()
        jobs = {j.id: j for j in s.scalars(query)}
        for c, answer in ended:
            job = jobs.get(c.job_id)
            if job is None or job.status not in POLLED:
                continue
            job.lease_until = None
            job.polls += 1
            if isinstance(answer, BaseException):
                effects.merge(self._on_error(s, c, job, answer, now))
            else:
                elapsed = now_s - c.submitted_s if c.submitted_s is not None else 0.0
                effects.merge(self._on_state(s, c, job, answer, now, elapsed))
        return effects

    def _completed(self, s: Session, c: Claimed, state: TaskState, now: datetime) -> Effects:
        """A completed job: its row (only if it is still being polled: on PostgreSQL the UPDATE
        waits for a cancel in progress and then sees it), then its step through the engine's
        ``finish_step``, or, if the pipeline was cancelled meanwhile, the pipeline's cost."""
        completed = state.completed_at or now
        default_expiry = completed + timedelta(seconds=self.settings.result_ttl_s)
        assets = [{"url": a.url, "expires_at": (a.expires_at or default_expiry).isoformat()} for a in state.assets]
        model = c.ctx.model
        assert model is not None  # provider_jobs.model is NOT NULL, and the claim reads it
        job = s.connection().execute(
            _JOB_COMPLETED,
            {
                "b_id": c.job_id,
                "b_result": assets,
                "b_completed": completed,
                "b_cost": self.rt.catalog.model(model).media_cost(c.units),
            },
        )
        if job.rowcount != 1:
            return Effects()  # it ended or was cancelled since the claim
        rows = pipeline_rows(s, c.step_id)
        finish = finish_from_rows(rows, c.step_id, {"model": model, "task_id": c.task_id, "assets": assets})
        if finish is None:
            return Effects()
        if rows[0].pipeline_status in PIPELINE_TERMINAL:  # cancelled meanwhile: record what it cost
            s.connection().execute(PIPELINE_COST, {"b_pipeline": finish.pipeline_id, "b_now": now})
            return Effects()
        return finish_step(s, finish, now)

    def _retry_delay(self, task_id: str, polls: int, err: BaseException) -> float:
        """Seconds until a job whose read failed is read again (``polls`` counts this one)."""
        interval = self.settings.poll_interval_s
        if isinstance(err, AccountError):  # ``watch_account`` paused paid work and holds the poller
            return max(ACCOUNT_PROBE_S, interval)
        code = err.code if isinstance(err, ProviderError) else type(err).__name__
        if not isinstance(err, ProviderError):
            log.error("poll_crashed", task_id=task_id, error=repr(err))
        log.info("poll_failed_will_retry", task_id=task_id, code=code)
        return min(60.0, interval * float(2 ** min(polls % 6, 5)))

    def _on_error(self, s: Any, c: Claimed, job: ProviderJob, err: BaseException, now: datetime) -> Effects:
        if isinstance(err, ProviderNotFound):
            job.status = JobStatus.FAILED
            job.error_code, job.error_message = err.code, err.message
            return fail_step(
                s,
                s.get_one(Step, c.step_id),
                err.code,
                "the provider no longer knows this job, so its result cannot be fetched.",
            )
        job.next_poll_at = now + timedelta(seconds=self._retry_delay(c.task_id, job.polls, err))
        return Effects()

    def _on_state(
        self, s: Any, c: Claimed, job: ProviderJob, state: TaskState, now: datetime, elapsed: float
    ) -> Effects:
        """A job that failed or was cancelled at the provider (a completed one is ``_completed``)."""
        if state.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            job.status = state.status
            job.error_code = state.error_code or "provider_job_failed"
            job.error_message = state.error_message
            job.next_poll_at = None
            reason = state.error_message or f"the job ended {state.status}"
            step = s.get_one(Step, c.step_id)
            return fail_step(s, step, "provider_job_failed", f"the provider could not make the {c.kind}: {reason}")
        # Not an ending (only reached if a caller hands one in): the routine update, one job.
        if not state.known_status:
            log.warning("unknown_job_status", task_id=c.task_id, status=state.status)
        else:
            job.status = state.status
        job.progress = state.progress
        if state.estimated_time_s:
            job.estimated_time_s = state.estimated_time_s
        delay = next_delay(self.settings.poll_interval_s, elapsed, job.estimated_time_s)
        job.next_poll_at = datetime.fromtimestamp(next_poll_s(c.due_s, now.timestamp(), delay), UTC)
        return Effects()

    # --- the provider account ------------------------------------------------------------------
    def round_limit(self) -> int:
        """How many jobs this round may read: all that are due, or while the poller holds after a
        401/402 one probe every ``ACCOUNT_PROBE_S`` (none in between). An operator's
        ``genline provider resume`` ends the hold at once."""
        if self.held_since is None:
            return self.settings.poller_batch
        if self.rt.shared.get(PAUSE_KEY) is None:
            log.info("poller_account_hold_lifted", held_s=round(time.monotonic() - self.held_since, 1))
            self.held_since = None
            return self.settings.poller_batch
        if time.monotonic() - self._last_probe < ACCOUNT_PROBE_S:
            return 0
        self._last_probe = time.monotonic()
        return 1

    def watch_account(self, answers: list[TaskState | BaseException]) -> None:
        """A 401/402 on a read pauses paid work for every process (as a worker's call does) and
        holds the poller; a successful read while it holds ends the hold."""
        refused = next((a for a in answers if isinstance(a, AccountError)), None)
        if refused is not None:
            if self.held_since is None:
                self.held_since = self._last_probe = time.monotonic()
                pause_paid_work(self.rt.shared, refused, self.settings.pause_s, source="poller")
            return
        if self.held_since is not None and any(isinstance(a, TaskState) for a in answers):
            log.info("poller_account_hold_ended", held_s=round(time.monotonic() - self.held_since, 1))
            self.held_since = None

    # --- loop ----------------------------------------------------------------------------------
    async def run_once(self) -> int:
        """One round, start to end: claim, poll, apply (drain mode and tests)."""
        limit = await asyncio.to_thread(self.round_limit)
        claimed = await asyncio.to_thread(self.claim, limit) if limit else []
        if not claimed:
            return 0
        answers = await self.poll(claimed)
        self.watch_account(answers)
        await asyncio.to_thread(self._apply_and_move_on, claimed, answers, self.audit.drain())
        return len(claimed)

    def _apply_and_move_on(
        self, claimed: list[Claimed], answers: list[TaskState | BaseException], records: list[CallRecord]
    ) -> None:
        apply_effects(self.rt, self.apply(claimed, answers, records))

    async def run(self, stop: asyncio.Event, *, sweep_every_s: float = 2.0, idle_s: float = 0.25) -> None:
        """Rounds overlap: while one round's answers are being written, the next is claimed and
        polled (its jobs are leased, so the two never touch the same rows). Behind schedule (a
        claim came back full, its earliest job a quarter of the cadence late), the round after is
        claimed while this one's reads are in flight, so the provider is never left waiting on a
        claim."""
        log.info("poller_started", owner=self.owner, interval_s=self.settings.poll_interval_s)
        last_sweep = 0.0
        writing: asyncio.Task[None] | None = None
        ahead: asyncio.Task[list[Claimed]] | None = None  # the next round's claim, taken early
        # Behind means a full claim whose earliest job is this late. On schedule, claiming early
        # would only leave the jobs that fall due during this round's reads for the round after next.
        behind_s = self.settings.poll_interval_s / 4
        doorbell = Doorbell(self.rt.db.url) if self.rt.db.is_postgres else None
        if doorbell is not None:
            doorbell.start()
        try:
            while not stop.is_set():
                count = 0
                try:
                    if ahead is not None:
                        claimed, ahead = await ahead, None
                    else:
                        limit = await asyncio.to_thread(self.round_limit)
                        claimed = await asyncio.to_thread(self.claim, limit) if limit else []
                    count = len(claimed)
                    if count >= self.settings.poller_batch and time.time() - claimed[0].due_s > behind_s:
                        ahead = asyncio.create_task(asyncio.to_thread(self.claim))
                    answers = await self.poll(claimed) if claimed else []
                    self.watch_account(answers)
                    records = self.audit.drain()
                    if writing is not None:
                        await writing
                        writing = None
                    if claimed:
                        writing = asyncio.create_task(
                            asyncio.to_thread(self._apply_and_move_on, claimed, answers, records)
                        )
                    if time.monotonic() - last_sweep > sweep_every_s:
                        last_sweep = time.monotonic()
                        await asyncio.to_thread(sweep, self.rt)
                except Exception as exc:  # noqa: BLE001  # a database hiccup must not end the loop
                    log.error("poller_round_failed", error=repr(exc)[:300])
                    writing = None
                    if ahead is not None:  # its jobs' leases run out and they are claimed again
                        ahead.cancel()
                        ahead = None
                    count = 0
                    await asyncio.sleep(1.0)
                if count == 0:
                    nap = max(0.005, min(idle_s, await asyncio.to_thread(self.seconds_to_next_due)))
                    if doorbell is not None:  # a new job rings it: its first poll is then on time
                        await doorbell.wait(stop, nap)
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=nap)
            if writing is not None:
                await writing
            if ahead is not None:  # claimed, never read: give the jobs back, not after their lease
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.release, await ahead)
        finally:
            if doorbell is not None:
                await doorbell.aclose()
            await self.aclose()
            log.info("poller_stopped", owner=self.owner)

    async def aclose(self) -> None:
        if self.gateway is not None:
            await self.gateway.aclose()
            self.gateway = None
