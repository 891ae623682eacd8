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

Every read draws on the provider key's request budget (``provider.stages.RequestBudget``), as
many tokens as it holds in one shared-state round trip, and again as it refills, for at most
``PACE_S`` a round: the round's jobs are read as far as the budget goes (earliest expected
finish first, ``plan_reads``), and the rest keep their place in line for the next round, so when
the budget
cannot cover every poll due the cadence stretches evenly (logged as ``poll_cadence_stretched``,
and held in the shared state under ``STRETCH_KEY`` for ``genline`` status readers). A 429 or a low
``x-ratelimit-remaining`` among a round's answers tightens the budget for every process.

When a job is read is planned by ``plan_delay`` and ``first_poll_at`` (``GENLINE_POLL_SCHEDULE``):
with ``expected`` (as shipped) a job's first read comes near its expected finish (the provider's
estimate, else the model's recent median render time from our own rows, else the cadence), its
progress then tells when it will finish, and past that it is read every
``GENLINE_POLL_INTERVAL_S``; with ``fixed``, every ``GENLINE_POLL_INTERVAL_S`` from the submit on.
A job whose first poll is not near yet is not read: the round only moves its poll time (no request).

Rounds are as large as the due jobs make them: a poller behind schedule claims full rounds back
to back (the next while this one is read), and one that has caught up looks for when the next
job falls due and sleeps until then, but never claims again within ``COALESCE_S`` of its last
claim, so that in a busy spell the jobs falling due close together are read in one round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
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
from genline.config.errors import AccountError, ProviderError, ProviderNotFound, RateLimited
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
from genline.provider.stages import PAUSE_KEY, POLL_FLOOR, STRETCH_KEY, pause_paid_work
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


class NotYet(Exception):  # noqa: N818  # not an error: a job not read this round
    """The answer for a claimed job that was not read: its first poll is not near yet (``DEFERRED``)
    or the request budget did not cover it this round (``UNFUNDED``); no request was made."""


DEFERRED = NotYet("first poll not near yet")
UNFUNDED = NotYet("not covered by the request budget this round")
LEAD = 0.8  # a job's first read comes at this share of its expected render time
FINISH_MARGIN_S = 0.25  # read this long after the finish its progress points to
PROGRESS_MIN = 5  # below this a job's progress says too little to extrapolate from
LONGEST_WAIT_S = 600.0  # no planned wait between two reads of a job is longer
DEFER_SLOTS = 20  # claimed beyond the budget's tokens each round: first polls only move, free
# A round keeps drawing on the budget as it refills for at most this long: one draw a round left
# the poller waiting a whole refill between small rounds (~55 reads/s against a 90/s budget).
PACE_S = 0.5
MIN_DRAW_WAIT_S = 0.005
MEDIAN_REFRESH_S = 60.0
MEDIAN_MIN_SAMPLES = 5
STRETCH_LOG_EVERY_S = 10.0
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
        WHERE status IN ({_POLLED_SQL}) AND next_poll_at <= %(due_by)s
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
        j.polls, p.user_id, p.feature, p.id, p.priority
"""

# PostgreSQL: when the earliest job not leased falls due, as epoch seconds.
_NEXT_DUE_PG = f"""
    SELECT CAST(EXTRACT(EPOCH FROM min(next_poll_at)) AS float8) FROM provider_jobs
    WHERE status IN ({_POLLED_SQL}) AND (lease_until IS NULL OR lease_until < %(now)s)
"""

# PostgreSQL: every routine answer of a round in one statement. NULL keeps the column as it is;
# a job whose status changed meanwhile (cancelled, say) is left alone. The columns other than the
# ids travel as comma-separated text (statuses are JobStatus words, the rest numbers; '' is NULL):
# joining strings costs a fraction of what psycopg's list dumper costs a value.
_ROUTINE_PG = f"""
    UPDATE provider_jobs AS j SET
        lease_until = NULL,
        polls = j.polls + v.bump,
        status = COALESCE(v.status, j.status),
        progress = COALESCE(v.progress, j.progress),
        estimated_time_s = COALESCE(v.estimated_time_s, j.estimated_time_s),
        next_poll_at = to_timestamp(v.next_s) AT TIME ZONE 'UTC'
    FROM unnest(
        CAST(%(ids)s AS text[]),
        string_to_array(%(statuses)s, ',', ''),
        CAST(string_to_array(%(progress)s, ',', '') AS integer[]),
        CAST(string_to_array(%(estimates)s, ',', '') AS integer[]),
        CAST(string_to_array(%(next_s)s, ',') AS float8[]),
        CAST(string_to_array(%(bumps)s, ',') AS integer[])
    ) AS v(id, status, progress, estimated_time_s, next_s, bump)
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
        polls=_JOBS.c.polls + bindparam("b_bump", type_=Integer()),
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
    bumps: list[int] = field(default_factory=list)  # 1: a read (counted in ``polls``); 0: none made
    ended: list[tuple[Claimed, TaskState | BaseException]] = field(default_factory=list)

    def routine_params(self) -> dict[str, Any]:
        """``_ROUTINE_PG``'s parameters."""
        return {
            "ids": self.ids,
            "statuses": ",".join(["" if s is None else s for s in self.statuses]),
            "progress": ",".join(["" if p is None else str(p) for p in self.progress]),
            "estimates": ",".join(["" if e is None else str(e) for e in self.estimates]),
            "next_s": ",".join(map(repr, self.next_s)),
            "bumps": ",".join(map(str, self.bumps)),
        }


# A job is claimed this long before it is due, and an idle poller wakes this long before the
# next job is due: about what the wake, the claim and the budget's draw take, so its read goes out
# when it is due rather than that much after (a lone job's read came 4-9 ms late).
EARLY_S = 0.004
# A round of at most this many jobs is written before the next claim (``Poller.run``): next to
# nothing is due, and a write that shares the CPU with that claim sends the next steps' nudges
# later. A larger round is written while the next is claimed and read: under a request budget,
# waiting for every write left the budget unspent (docs/PERFORMANCE.md, 2026-12-03 evening).
QUIET_ROUND = 4
# After a quiet round that took every job due, the next claim waits until this long after that
# round's claim (or half the cadence, if that is shorter). In a busy spell of small rounds the
# jobs falling due meanwhile then share one round's fixed costs (a claim, a look for the next due
# job, a transaction, a write, a budget draw). Only a job falling due within this long of the last
# claim waits, and for at most this long (on the 2 s cadence, 2.5% of it); a poller behind
# schedule takes full rounds, which never wait. Measured in docs/PERFORMANCE.md (2026-12-03,
# night): the poller's CPU a pipeline about halved, pipelines/s up by a fifth.
COALESCE_S = 0.05


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


def plan_delay(
    interval: float, elapsed_s: float, estimated_s: float | None, progress: int | None, *, schedule: str = "expected"
) -> float:
    """Seconds to a running job's next read, planned from what its last answer said.

    ``fixed``: the cadence, as genline always polled (``next_delay``: stretched only early in a
    render far longer than the cadence, and once a job runs past twice its estimate).
    ``expected``: where its progress points to a finish (a job ``p``% through after ``elapsed_s``
    finishes by ``elapsed_s * 100 / p``, progress being rounded down), read just after it; with no
    progress to go by, at ``LEAD`` of its expected time; a job past twice its estimate is read less
    often (``next_delay``); otherwise the cadence. Never sooner than the cadence, never later than
    ``LONGEST_WAIT_S``."""
    if schedule == "fixed":
        return next_delay(interval, elapsed_s, int(estimated_s) if estimated_s else None)
    if progress is not None and PROGRESS_MIN <= progress < 99 and elapsed_s > 0:
        finish = elapsed_s * 100.0 / progress + FINISH_MARGIN_S
        return min(LONGEST_WAIT_S, max(interval, finish - elapsed_s))
    if estimated_s and elapsed_s < LEAD * estimated_s:
        return min(LONGEST_WAIT_S, max(interval, LEAD * estimated_s - elapsed_s))
    return next_delay(interval, elapsed_s, int(estimated_s) if estimated_s else None)


def first_poll_at(submitted_s: float | None, expected_s: float | None, now_s: float, interval: float) -> float | None:
    """When a job not read yet should first be read, if that is more than a cadence away: at
    ``LEAD`` of its expected render time. None: read it now."""
    if submitted_s is None or not expected_s:
        return None
    at = submitted_s + min(LONGEST_WAIT_S, LEAD * expected_s)
    return at if at - now_s > interval else None


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
        self.budget = rt.budget
        self.expected = self.settings.poll_schedule == "expected"
        # Each model's median render time (submit to completion) over its recent jobs.
        self.medians: dict[str, float] = {}
        self._medians_at = -MEDIAN_REFRESH_S
        self.stretched_since: float | None = None
        self._stretch_logged = 0.0

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
        if self.expected and time.monotonic() - self._medians_at > MEDIAN_REFRESH_S:
            self.refresh_medians()
        deadline = time.monotonic() + self.settings.lease_s / 2  # half the lease: room to write
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.lease_s)
        due_by = now + timedelta(seconds=EARLY_S)
        with self.rt.db.transaction() as s:
            if self.rt.db.is_postgres:
                params = {"now": _naive(now), "due_by": _naive(due_by), "lease": _naive(lease), "n": limit}
                rows: Sequence[Any] = s.connection().exec_driver_sql(_CLAIM_PG, params).all()
            else:
                rows = self._claim_simple(s, now, due_by, lease, limit)
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
                CallContext(user_id, feature, pipeline_id, step_id, model, batch=priority == "batch"),
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
                priority,
            ) in rows
        ]
        claimed.sort(key=lambda c: c.due_s)
        return claimed

    def _claim_simple(self, s: Session, now: datetime, due_by: datetime, lease: datetime, limit: int) -> Sequence[Any]:
        """SQLite: no SKIP LOCKED and no RETURNING from a join, but ``BEGIN IMMEDIATE`` makes the
        transaction the only writer, so a select, an update and a select are as good."""
        jobs = _JOBS.c
        due = (
            select(jobs.id)
            .where(
                jobs.status.in_(POLLED),
                jobs.next_poll_at <= due_by,
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
                _PIPELINES.c.priority,
            )
            .join(_STEPS, _STEPS.c.id == jobs.step_id)
            .join(_PIPELINES, _PIPELINES.c.id == _STEPS.c.pipeline_id)
            .where(jobs.id.in_(ids))
        ).all()
        return [(*r[:7], _epoch(r[7]), _epoch(r[8]), *r[9:]) for r in rows]

    def refresh_medians(self) -> None:
        """Each model's median render time over its jobs completed in the last day (at most the
        latest 5,000): the expected time of a job whose provider gave no estimate."""
        self._medians_at = time.monotonic()
        since = utcnow() - timedelta(days=1)
        jobs = _JOBS.c
        query = (
            select(jobs.model, jobs.submitted_at, jobs.completed_at)
            .where(jobs.status == JobStatus.COMPLETED.value, jobs.completed_at > since, jobs.submitted_at.is_not(None))
            .order_by(jobs.completed_at.desc())
            .limit(5000)
        )
        times: dict[str, list[float]] = {}
        with self.rt.db.transaction() as s:
            for model, submitted, completed in s.execute(query):
                times.setdefault(model, []).append(max(0.0, (completed - submitted).total_seconds()))
        self.medians = {m: statistics.median(t) for m, t in times.items() if len(t) >= MEDIAN_MIN_SAMPLES}

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
            if self.rt.db.is_postgres:  # as the driver takes it: half the CPU of the ORM's query
                due_s = s.connection().exec_driver_sql(_NEXT_DUE_PG, {"now": _naive(now)}).scalar()
                return math.inf if due_s is None else float(due_s) - now.timestamp()
            due = s.scalar(
                select(func.min(ProviderJob.next_poll_at)).where(
                    ProviderJob.status.in_(POLLED),
                    (ProviderJob.lease_until.is_(None)) | (ProviderJob.lease_until < now),
                )
            )
        return math.inf if due is None else (due - now).total_seconds()

    # --- poll ----------------------------------------------------------------------------------
    async def poll(self, claimed: list[Claimed]) -> list[TaskState | BaseException]:
        """Read every claimed job's state through the gateway, at most ``poller_concurrency`` at
        once, in the order given (earliest due first); a fixed set of readers walks the list (no
        task or semaphore per poll). A failed read is returned, not raised. A claim held past
        half its lease (a provider slow enough to hold a round that long) is not read: its
        answer is a ``LeaseLost`` and the job is left to the next claim."""
        gateway = await self._gateway()
        answers: list[TaskState | BaseException] = [LEASE_LOST] * len(claimed)
        reads = self.plan_reads(claimed, answers)
        if not reads:
            self.note_stretch(claimed, 0, 0)
            return answers
        work: asyncio.Queue[int | None] = asyncio.Queue()
        monotonic = time.monotonic
        readers = min(self.settings.poller_concurrency, len(reads))

        async def reader() -> None:
            while (i := await work.get()) is not None:
                c = claimed[i]
                if monotonic() > c.lease_deadline:
                    continue
                try:
                    answers[i] = await gateway.poll(c.ctx, c.task_id, units=c.units)
                except Exception as exc:  # noqa: BLE001  # an answer like any other: _on_error decides
                    answers[i] = exc

        async def feed() -> int:
            """Hand the readers as many reads as the budget covers, drawing again as it refills
            (for at most ``PACE_S``); the rest are ``UNFUNDED`` and keep their place in line."""
            pending, granted, give_up = reads, 0, monotonic() + PACE_S
            while pending:
                drawn = await asyncio.to_thread(self.budget.draw_polls, len(pending))
                for i in pending[: drawn.granted]:
                    work.put_nowait(i)
                granted += drawn.granted
                pending = pending[drawn.granted :]
                wait = max(drawn.wait_s, MIN_DRAW_WAIT_S)
                if not pending or monotonic() + wait > give_up:
                    break
                await asyncio.sleep(wait)
            for i in pending:
                answers[i] = UNFUNDED
            for _ in range(readers):
                work.put_nowait(None)
            return granted

        results = await asyncio.gather(feed(), *(reader() for _ in range(readers)))
        self.note_stretch(claimed, len(reads), cast(int, results[0]))
        self.watch_rate_limit(answers)
        return answers

    def plan_reads(self, claimed: list[Claimed], answers: list[TaskState | BaseException]) -> list[int]:
        """Which claimed jobs are read this round (their indexes), in the order the budget
        funds them. ``fixed``: all, earliest due first. ``expected``: a job never read whose
        expected finish is far off is ``DEFERRED`` (its first poll moves there; no request), and
        the rest go earliest expected finish first: a read due now because its job should just
        have finished comes before a first read that only learns how far a longer job has got,
        so when the budget runs short the reads that find finished jobs are the last to wait."""
        if not self.expected:
            return list(range(len(claimed)))
        now_s, interval = time.time(), self.settings.poll_interval_s
        finish: dict[int, float] = {}
        for i, c in enumerate(claimed):
            if c.polls == 0:
                expected = c.estimated_time_s or self.medians.get(c.ctx.model or "")
                if first_poll_at(c.submitted_s, expected, now_s, interval) is not None:
                    answers[i] = DEFERRED
                    continue
                if expected and c.submitted_s is not None:
                    finish[i] = max(c.due_s, c.submitted_s + expected)
                    continue
            finish[i] = c.due_s  # read before: its reads are planned at its expected finish
        return sorted(finish, key=finish.__getitem__)

    def note_stretch(self, claimed: list[Claimed], wanted: int, granted: int) -> None:
        """Make a stretched cadence visible: a log event (at most every ``STRETCH_LOG_EVERY_S``),
        and ``STRETCH_KEY`` in the shared state while it lasts; and when it ends."""
        now = time.monotonic()
        if granted >= wanted:
            if self.stretched_since is not None:
                log.info("poll_cadence_restored", stretched_s=round(now - self.stretched_since, 1))
                self.stretched_since = None
                self.rt.shared.delete(STRETCH_KEY)
            return
        if self.stretched_since is None:
            self.stretched_since = now
        if now - self._stretch_logged >= STRETCH_LOG_EVERY_S:
            self._stretch_logged = now
            behind = max(0.0, time.time() - claimed[0].due_s) if claimed else 0.0
            info = {"due": wanted, "read": granted, "behind_s": round(behind, 2), "rate_per_s": self.budget.rate}
            log.warning("poll_cadence_stretched", **info)
            self.rt.shared.set(STRETCH_KEY, json.dumps(info), STRETCH_LOG_EVERY_S * 2)

    def watch_rate_limit(self, answers: list[TaskState | BaseException]) -> None:
        """What a round's answers said of the provider's limit, told to the budget once a round: a
        429 tightens it for every process; a low ``x-ratelimit-remaining`` slows everyone down."""
        refused = [
            a
            for a in answers
            if isinstance(a, RateLimited)
            and not a.nothing_sent
            and self.budget.about_our_key(a.answer.ratelimit_remaining if a.answer is not None else None)
        ]
        if refused:
            self.budget.provider_refused(max((a.retry_after or 1.0) for a in refused), count=len(refused))
            return
        remaining = [r.ratelimit_remaining for r in self.audit.records if r.ratelimit_remaining is not None]
        if remaining:
            self.budget.saw_remaining(min(remaining))

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
                out.bumps.append(1)
                expected = estimate or c.estimated_time_s or self.medians.get(c.ctx.model or "")
                delay = plan_delay(interval, elapsed, expected, answer.progress, schedule=self.settings.poll_schedule)
                out.next_s.append(next_poll_s(c.due_s, now_s, delay))
            elif answer is LEASE_LOST:
                continue
            elif isinstance(answer, NotYet):  # no request made: only the poll time moves
                out.ids.append(c.job_id)
                out.statuses.append(None)
                out.progress.append(None)
                out.estimates.append(None)
                out.bumps.append(0)
                if answer is DEFERRED:
                    expected = c.estimated_time_s or self.medians.get(c.ctx.model or "")
                    out.next_s.append(first_poll_at(c.submitted_s, expected, now_s, interval) or now_s)
                else:  # its place in line (its due time) is kept for the next round
                    out.next_s.append(c.due_s)
            elif isinstance(answer, ProviderNotFound):
                out.ended.append((c, answer))
            else:
                out.ids.append(c.job_id)
                out.statuses.append(None)
                out.progress.append(None)
                out.estimates.append(None)
                out.bumps.append(1)
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
            self.on_applied(
                [done - c.due_s for c, a in zip(claimed, answers, strict=True) if not isinstance(a, LeaseLost | NotYet)]
            )
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
                    "b_bump": bump,
                }
                for job_id, status, progress, estimate, next_s, bump in zip(
                    todo.ids, todo.statuses, todo.progress, todo.estimates, todo.next_s, todo.bumps, strict=True
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
                "b_cost": self.rt.catalog.model(model, now).media_cost(c.units, batch=c.ctx.batch),
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
        if isinstance(err, RateLimited):  # the budget waits it out for everyone (``watch_rate_limit``)
            return max(interval, err.retry_after or interval)
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
        delay = plan_delay(
            self.settings.poll_interval_s,
            elapsed,
            job.estimated_time_s,
            state.progress,
            schedule=self.settings.poll_schedule,
        )
        job.next_poll_at = datetime.fromtimestamp(next_poll_s(c.due_s, now.timestamp(), delay), UTC)
        return Effects()

    # --- the provider account ------------------------------------------------------------------
    def round_limit(self) -> int:
        """How many jobs this round may read: all that are due, or while the poller holds after a
        401/402 one probe every ``ACCOUNT_PROBE_S`` (none in between). An operator's
        ``genline provider resume`` ends the hold at once."""
        if self.held_since is None:
            return self.batch_limit()
        if self.rt.shared.get(PAUSE_KEY) is None:
            log.info("poller_account_hold_lifted", held_s=round(time.monotonic() - self.held_since, 1))
            self.held_since = None
            return self.batch_limit()
        if time.monotonic() - self._last_probe < ACCOUNT_PROBE_S:
            return 0
        self._last_probe = time.monotonic()
        return 1

    def batch_limit(self) -> int:
        """``poller_batch``; while the budget stretches the cadence, about what it covers in one
        round (what the polls may take of its burst, and its refill over ``PACE_S``): claiming
        more would only give the rest back. With ``expected`` polling twice that, and a few first
        polls that only move, so the reads funded can be chosen by expected finish."""
        if self.stretched_since is None:
            return self.settings.poller_batch
        covered = int(self.budget.burst * (1 - POLL_FLOOR) + self.budget.rate * PACE_S) + 1
        # with ``expected`` polling, twice that: the reads funded are chosen by expected finish
        return max(1, min(self.settings.poller_batch, covered * 2 + DEFER_SLOTS if self.expected else covered))

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
        claim. A quiet round (``QUIET_ROUND``) that took every job due is written first, and then
        the poller looks for the next due job rather than claiming again (that claim would come
        back empty); it claims no sooner than ``COALESCE_S`` after the last claim."""
        log.info("poller_started", owner=self.owner, interval_s=self.settings.poll_interval_s)
        last_sweep = 0.0
        claimed_at = 0.0
        coalesce_s = min(COALESCE_S, self.settings.poll_interval_s / 2)
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
                count, caught_up = 0, False
                try:
                    if ahead is not None:
                        claimed, ahead = await ahead, None
                        limit = self.settings.poller_batch
                    else:
                        limit = await asyncio.to_thread(self.round_limit)
                        claimed_at = time.monotonic()
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
                        write = asyncio.to_thread(self._apply_and_move_on, claimed, answers, records)
                        if count <= QUIET_ROUND:  # written first: its next steps' nudges go out sooner
                            await write
                            # fewer than asked for: every job due at the claim was taken, and
                            # these are written; a claim now would come back empty, so look for
                            # when the next one falls due instead (one transaction, not two)
                            caught_up = count < limit
                        else:  # written while the next round is claimed and read
                            writing = asyncio.create_task(write)
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
                if count == 0 or caught_up:
                    due_in = await asyncio.to_thread(self.seconds_to_next_due)
                    gap = coalesce_s - (time.monotonic() - claimed_at) if caught_up else 0.0
                    if gap > 0:
                        await asyncio.sleep(gap)
                        due_in -= gap
                    if caught_up and due_in <= EARLY_S:
                        continue  # one fell due meanwhile: claim it now
                    nap = max(0.005, min(idle_s, due_in - EARLY_S))
                    if doorbell is not None:  # a new job rings it: its first poll is then on time
                        await doorbell.wait(stop, nap, early_s=EARLY_S)
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
