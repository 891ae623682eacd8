"""The poller: one asyncio process that watches every in-flight provider job.

Waiting costs nothing: a job in flight is a row with a ``next_poll_at``. Each round the poller
claims the due rows (a lease, with ``SKIP LOCKED`` on PostgreSQL, so several pollers never poll
one job twice), reads their states concurrently through the gateway, and applies all answers in
one transaction, audit rows included. Finished jobs move their pipelines on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from config.clock import utcnow
from config.constants import PIPELINE_TERMINAL, JobStatus
from config.errors import AccountError, ProviderError, ProviderNotFound
from config.logging import get_logger
from pipelines.audit import write_audit
from pipelines.engine import Effects, apply_effects, complete_step, fail_step, pipeline_cost
from pipelines.runtime import Runtime
from pipelines.sweeper import sweep
from pipelines.wakeup import Doorbell
from provider.gateway import CallContext, CallRecord, Gateway, MemoryAuditSink, TaskReader, gather_limited
from provider.poll_client import AiohttpTaskReader
from provider.wire import TaskState
from storage.models import Pipeline, ProviderJob, Step

log = get_logger("genline.poller")
POLLED = (JobStatus.PENDING.value, JobStatus.PROCESSING.value)


@dataclass(frozen=True)
class Claimed:
    job_id: str
    task_id: str
    kind: str
    step_id: str
    ctx: CallContext
    units: float
    estimated_time_s: int | None
    submitted_at: datetime | None
    due_at: datetime


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


class Poller:
    def __init__(self, rt: Runtime, *, client: TaskReader | None = None) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.audit = MemoryAuditSink()
        self._client = client
        self.gateway: Gateway | None = None
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.lateness_s: list[float] = []  # due → applied, for the benchmark

    async def _gateway(self) -> Gateway:
        if self.gateway is None:
            client = self._client or AiohttpTaskReader(self.settings, max_connections=self.settings.poller_concurrency)
            self.gateway = Gateway(self.rt.catalog, self.audit, async_client=client, retry=self.rt.retry_policy)
        return self.gateway

    # --- claim ---------------------------------------------------------------------------------
    def claim(self) -> list[Claimed]:
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.lease_s)
        with self.rt.db.transaction() as s:
            due = (
                select(ProviderJob.id)
                .where(
                    ProviderJob.status.in_(POLLED),
                    ProviderJob.next_poll_at <= now,
                    (ProviderJob.lease_until.is_(None)) | (ProviderJob.lease_until < now),
                )
                .order_by(ProviderJob.next_poll_at)
                .limit(self.settings.poller_batch)
            )
            if self.rt.db.is_postgres:
                due = due.with_for_update(skip_locked=True)
            ids = list(s.scalars(due))
            if not ids:
                return []
            s.execute(update(ProviderJob).where(ProviderJob.id.in_(ids)).values(lease_until=lease))
            rows = s.execute(
                select(ProviderJob, Pipeline.user_id, Pipeline.feature, Pipeline.id)
                .join(Step, Step.id == ProviderJob.step_id)
                .join(Pipeline, Pipeline.id == Step.pipeline_id)
                .where(ProviderJob.id.in_(ids))
            ).all()
            return [
                Claimed(
                    job_id=job.id,
                    task_id=job.task_id or "",
                    kind=job.kind,
                    step_id=job.step_id,
                    ctx=CallContext(user_id, feature, pipeline_id, job.step_id, job.model),
                    units=job.units,
                    estimated_time_s=job.estimated_time_s,
                    submitted_at=job.submitted_at,
                    due_at=job.next_poll_at or now,
                )
                for job, user_id, feature, pipeline_id in rows
            ]

    def seconds_to_next_due(self) -> float:
        """How long until the earliest job is due (an idle poller sleeps just that long)."""
        with self.rt.db.transaction() as s:
            due = s.scalar(select(func.min(ProviderJob.next_poll_at)).where(ProviderJob.status.in_(POLLED)))
        return float("inf") if due is None else (due - utcnow()).total_seconds()

    # --- poll ----------------------------------------------------------------------------------
    async def poll(self, claimed: list[Claimed]) -> list[TaskState | BaseException]:
        gateway = await self._gateway()
        return await gather_limited(
            self.settings.poller_concurrency, [gateway.poll(c.ctx, c.task_id, units=c.units) for c in claimed]
        )

    # --- apply ---------------------------------------------------------------------------------
    def apply(
        self, claimed: list[Claimed], answers: list[TaskState | BaseException], records: list[CallRecord] | None = None
    ) -> Effects:
        """All answers of a round in one transaction: one SELECT for the jobs, updates flushed
        together at commit, the audit rows inserted in bulk; steps are loaded only for the jobs
        that finished."""
        effects = Effects()
        now = utcnow()
        with self.rt.db.transaction() as s, s.no_autoflush:
            write_audit(s, self.audit.drain() if records is None else records)
            jobs = {
                j.id: j for j in s.scalars(select(ProviderJob).where(ProviderJob.id.in_([c.job_id for c in claimed])))
            }
            for c, answer in zip(claimed, answers, strict=True):
                job = jobs.get(c.job_id)
                if job is None or job.status not in POLLED:
                    continue
                job.lease_until = None
                job.polls += 1
                elapsed = (now - c.submitted_at).total_seconds() if c.submitted_at else 0.0
                if isinstance(answer, BaseException):
                    effects.merge(self._on_error(s, c, job, answer, now))
                    continue
                effects.merge(self._on_state(s, c, job, answer, now, elapsed))
        done = time.time()
        self.lateness_s.extend(done - c.due_at.timestamp() for c in claimed)
        return effects

    def _on_error(self, s: Any, c: Claimed, job: ProviderJob, err: BaseException, now: datetime) -> Effects:
        interval = self.settings.poll_interval_s
        if isinstance(err, ProviderNotFound):
            job.status = JobStatus.FAILED
            job.error_code, job.error_message = err.code, err.message
            return fail_step(
                s,
                s.get_one(Step, c.step_id),
                err.code,
                "the provider no longer knows this job, so its result cannot be fetched.",
            )
        if isinstance(err, AccountError):
            log.error("provider_account_problem", code=err.code, task_id=c.task_id)
            job.next_poll_at = now + timedelta(seconds=max(30.0, interval))
            return Effects()
        code = err.code if isinstance(err, ProviderError) else type(err).__name__
        if not isinstance(err, ProviderError):
            log.error("poll_crashed", task_id=c.task_id, error=repr(err))
        job.next_poll_at = now + timedelta(seconds=min(60.0, interval * 2 ** min(job.polls % 6, 5)))
        log.info("poll_failed_will_retry", task_id=c.task_id, code=code)
        return Effects()

    def _on_state(
        self, s: Any, c: Claimed, job: ProviderJob, state: TaskState, now: datetime, elapsed: float
    ) -> Effects:
        if state.status == JobStatus.COMPLETED:
            completed = state.completed_at or now
            default_expiry = completed + timedelta(seconds=self.settings.result_ttl_s)
            assets = [{"url": a.url, "expires_at": (a.expires_at or default_expiry).isoformat()} for a in state.assets]
            job.status = JobStatus.COMPLETED
            job.progress = 100
            job.result = assets
            job.completed_at = completed
            job.cost_usd = self.rt.catalog.model(job.model).media_cost(job.units)
            job.next_poll_at = None
            step = s.get_one(Step, c.step_id)
            if step.pipeline.status in PIPELINE_TERMINAL:  # cancelled meanwhile: record what it cost
                step.pipeline.cost_usd = pipeline_cost(s, step.pipeline_id)
                return Effects()
            return complete_step(s, step, {"model": job.model, "task_id": job.task_id, "assets": assets})
        if state.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            job.status = state.status
            job.error_code = state.error_code or "provider_job_failed"
            job.error_message = state.error_message
            job.next_poll_at = None
            reason = state.error_message or f"the job ended {state.status}"
            step = s.get_one(Step, c.step_id)
            return fail_step(s, step, "provider_job_failed", f"the provider could not make the {c.kind}: {reason}")
        if not state.known_status:
            log.warning("unknown_job_status", task_id=c.task_id, status=state.status)
        else:
            job.status = state.status
        job.progress = state.progress
        if state.estimated_time_s:
            job.estimated_time_s = state.estimated_time_s
        job.next_poll_at = now + timedelta(
            seconds=next_delay(self.settings.poll_interval_s, elapsed, job.estimated_time_s)
        )
        return Effects()

    # --- loop ----------------------------------------------------------------------------------
    async def run_once(self) -> int:
        claimed = await asyncio.to_thread(self.claim)
        if not claimed:
            return 0
        answers = await self.poll(claimed)
        await asyncio.to_thread(self._apply_and_move_on, claimed, answers, self.audit.drain())
        return len(claimed)

    def _apply_and_move_on(
        self, claimed: list[Claimed], answers: list[TaskState | BaseException], records: list[CallRecord]
    ) -> None:
        apply_effects(self.rt, self.apply(claimed, answers, records))

    async def run(self, stop: asyncio.Event, *, sweep_every_s: float = 5.0, idle_s: float = 0.25) -> None:
        """Rounds overlap: while one round's answers are being written, the next is claimed and
        polled (its jobs are leased, so the two never touch the same rows)."""
        log.info("poller_started", owner=self.owner, interval_s=self.settings.poll_interval_s)
        last_sweep = 0.0
        writing: asyncio.Task[None] | None = None
        doorbell = Doorbell(self.rt.db.url) if self.rt.db.is_postgres else None
        if doorbell is not None:
            doorbell.start()
        try:
            while not stop.is_set():
                count = 0
                try:
                    claimed = await asyncio.to_thread(self.claim)
                    count = len(claimed)
                    answers = await self.poll(claimed) if claimed else []
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
        finally:
            if doorbell is not None:
                await doorbell.aclose()
            await self.aclose()
            log.info("poller_stopped", owner=self.owner)

    async def aclose(self) -> None:
        if self.gateway is not None:
            await self.gateway.aclose()
            self.gateway = None
