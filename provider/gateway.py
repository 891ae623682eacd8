"""The one gateway every provider call passes through, in this order:

    budget reservation → global rate limit → circuit breaker      (``Stage.before``, pluggable)
    → the HTTP call with timeouts                                   (``provider.client``)
    → error classification                                          (``provider.wire``)
    → retry decision                                                (``RetryPolicy``)
    → audit row + cost from the price catalog                       (``AuditSink``)
    → budget commit/release, breaker bookkeeping                    (``Stage.after``, pluggable)

Stages are the hook points for budgets, shared rate limits and circuit breakers; a stage may
raise a ``GenlineError`` from ``before`` to stop the call. Task bodies never retry, audit or
price anything themselves.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from genline.config.catalog import Catalog
from genline.config.clock import utcnow
from genline.config.constants import JobStatus
from genline.config.errors import ProviderError, ProviderNotFound, ProviderRejected, RateLimited, RetryableProviderError
from genline.config.logging import get_logger
from genline.provider.client import Answer, ProviderClient
from genline.provider.metrics import observe_call
from genline.provider.pricing import call_cost_bound, payload_units, prompt_tokens
from genline.provider.wire import ChatResult, SubmitResult, TaskState

log = get_logger("genline.gateway")
T = TypeVar("T")


@dataclass(frozen=True)
class CallContext:
    """Who a call is for: every audit row and every budget is keyed on this."""

    user_id: str | None = None
    feature: str | None = None
    pipeline_id: str | None = None
    step_id: str | None = None
    model: str | None = None
    batch: bool = False  # overnight batch work: priced and submitted at the provider's batch rate
    # The most this call can cost (set by the gateway from the catalog before the stages run): what
    # the budget stage checks against the pipeline's reservation.
    cost_bound_usd: Decimal | None = None
    # The step ran before, or this call's earlier try lost its answer: there may be a chat booked
    # as an estimate for ``spend.reconcile`` to correct. A first try of a first attempt has none.
    retried: bool = False


@dataclass
class CallRecord:
    """One provider call as the audit log keeps it."""

    ctx: CallContext
    operation: str  # chat | submit | poll
    ts: datetime
    latency_ms: float = 0.0
    status_code: int | None = None
    request_id: str | None = None
    error_code: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    units: float | None = None
    cost_usd: Decimal = field(default_factory=Decimal)
    ratelimit_remaining: int | None = None
    cache_hit: bool = False  # answered from the copy cache: no provider call was made, cost 0
    cost_estimated: bool = False  # the cost is an estimate (the call's outcome was never learned)


class Stage(Protocol):
    """A cross-cutting concern wrapped around every call (budget, rate limit, circuit breaker).

    A stage may also offer ``plan(ctx, operation, batch) -> batch`` and ``decide(ctx, operation,
    answers)``: neighbouring such stages put their reads of shared state into one batch (``plan``
    returns a new one when they cannot join), ``batch.run()`` reads them in one go, and each then
    ``decide``s in turn exactly as its ``before`` would (see ``provider.stages``).
    """

    def before(self, ctx: CallContext, operation: str) -> None: ...

    def after(self, record: CallRecord, error: ProviderError | None) -> None: ...


class TaskReader(Protocol):
    """What the poller reads job states with (``poll_client.HttpTaskReader``, or its
    ``AiohttpTaskReader`` when a proxy is configured). A ``ProviderError`` it raises after an HTTP
    answer carries that answer (``error.answer``), for the audit."""

    async def get_task(self, task_id: str) -> tuple[TaskState, Answer]: ...

    async def aclose(self) -> None: ...


class AuditSink(Protocol):
    def record(self, record: CallRecord) -> None: ...


class MemoryAuditSink:
    """Collects records; the poller flushes them inside its own batched transaction."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def record(self, record: CallRecord) -> None:
        self.records.append(record)

    def drain(self) -> list[CallRecord]:
        out, self.records = self.records, []
        return out


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, honouring Retry-After; only retryable errors."""

    max_attempts: int = 4
    base_s: float = 0.5
    cap_s: float = 8.0

    def delay(self, attempt: int, error: ProviderError, rng: random.Random) -> float | None:
        """Seconds to wait before try ``attempt + 1``, or None to give up."""
        if not isinstance(error, RetryableProviderError) or attempt >= self.max_attempts:
            return None
        backoff = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        wait = rng.uniform(backoff / 2, backoff)
        if isinstance(error, RateLimited) and error.retry_after is not None:
            if error.retry_after > self.cap_s * 4:
                return None  # the provider asks for longer than a worker should hold a slot
            wait = max(wait, error.retry_after)
        return wait


class Gateway:
    def __init__(
        self,
        catalog: Catalog,
        audit: AuditSink,
        *,
        client: ProviderClient | None = None,
        async_client: TaskReader | None = None,
        stages: Sequence[Stage] = (),
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.catalog = catalog
        self.audit = audit
        self._client = client
        self._async_client = async_client
        self.stages = list(stages)
        self.retry = retry
        self._sleep = sleep
        self._rng = rng or random.Random()

    # --- blocking calls (workers) --------------------------------------------------------------
    def chat(self, ctx: CallContext, messages: list[dict[str, str]], *, max_tokens: int) -> ChatResult:
        assert self._client is not None and ctx.model
        model = ctx.model
        bound = call_cost_bound(self.catalog.model(model), messages=messages, max_tokens=max_tokens, batch=ctx.batch)
        ctx = dataclasses.replace(ctx, cost_bound_usd=bound)

        def call() -> tuple[ChatResult, Answer]:
            assert self._client is not None
            return self._client.chat(model, messages, max_tokens=max_tokens)

        lost: list[CallRecord] = []

        def account(record: CallRecord, result: ChatResult) -> None:
            if lost:  # an earlier try's answer was lost: this answer is its truth (spend.reconcile)
                record.ctx = dataclasses.replace(record.ctx, retried=True)
            record.prompt_tokens = result.prompt_tokens
            record.completion_tokens = result.completion_tokens
            price = self.catalog.model(model, record.ts)  # the rates in effect when the call was made
            record.cost_usd = price.chat_cost(result.prompt_tokens, result.completion_tokens, batch=ctx.batch)

        def unknown(record: CallRecord) -> None:
            # Sent, answer lost: the provider may have billed it. Booked at the most it can cost
            # (marked estimated) until an answer to the same request tells the truth (spend.reconcile).
            record.prompt_tokens, record.completion_tokens = prompt_tokens(messages), max_tokens
            record.cost_estimated = True
            price = self.catalog.model(model, record.ts)
            record.cost_usd = price.chat_cost(record.prompt_tokens, max_tokens, batch=ctx.batch)
            lost.append(record)

        return self._with_retries(ctx, "chat", call, account, unknown)

    def submit(self, ctx: CallContext, kind: str, payload: dict[str, Any], idempotency_key: str) -> SubmitResult:
        """Start a paid job. Retries reuse ``idempotency_key``, so the provider returns the same job."""
        assert self._client is not None
        model = ctx.model or str(payload.get("model", ""))
        if model:  # the most the job can cost, for the budget stage
            units = payload_units(kind, payload)
            bound = call_cost_bound(self.catalog.model(model), units=units, batch=ctx.batch)
            ctx = dataclasses.replace(ctx, cost_bound_usd=bound)

        def call() -> tuple[SubmitResult, Answer]:
            assert self._client is not None
            return self._client.submit(kind, payload, idempotency_key)

        return self._with_retries(ctx, "submit", call, lambda record, result: None)

    def cancel(self, ctx: CallContext, task_id: str) -> bool:
        """Stop a provider job. False when the provider says it cannot (it has ended already)."""
        assert self._client is not None

        def call() -> tuple[bool, Answer]:
            assert self._client is not None
            return self._client.cancel(task_id)

        try:
            return self._with_retries(ctx, "cancel", call, lambda record, result: None)
        except (ProviderRejected, ProviderNotFound):
            return False

    def _with_retries(
        self,
        ctx: CallContext,
        operation: str,
        call: Callable[[], tuple[T, Answer]],
        account: Callable[[CallRecord, T], None],
        unknown: Callable[[CallRecord], None] | None = None,
    ) -> T:
        attempt = 0
        while True:
            attempt += 1
            self._before(ctx, operation)
            record = CallRecord(ctx=ctx, operation=operation, ts=utcnow())
            started = time.perf_counter()
            try:
                result, answer = call()
            except ProviderError as error:
                if error.outcome_unknown and unknown is not None:
                    unknown(record)
                self._finish(record, started, error.answer, error)
                wait = self.retry.delay(attempt, error, self._rng)
                if wait is None:
                    raise
                log.info(
                    "provider_retry",
                    operation=operation,
                    model=ctx.model,
                    attempt=attempt,
                    code=error.code,
                    wait_s=round(wait, 3),
                    step_id=ctx.step_id,
                )
                self._sleep(wait)
                continue
            account(record, result)
            self._finish(record, started, answer, None)
            return result

    # --- non-blocking calls (poller) -----------------------------------------------------------
    async def poll(self, ctx: CallContext, task_id: str, *, units: float) -> TaskState:
        """Read a job's state once (the poller's next round is the retry). A completed job's
        cost (``units`` images or seconds at the model's rate) is booked on this call's record."""
        assert self._async_client is not None
        self._before(ctx, "poll")
        record = CallRecord(ctx=ctx, operation="poll", ts=utcnow())
        started = time.perf_counter()
        try:
            state, answer = await self._async_client.get_task(task_id)
        except ProviderError as error:
            self._finish(record, started, error.answer, error)
            raise
        if state.status == JobStatus.COMPLETED and ctx.model:
            record.units = units
            record.cost_usd = self.catalog.model(ctx.model, record.ts).media_cost(units, batch=ctx.batch)
        self._finish(record, started, answer, None)
        return state

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    async def aclose(self) -> None:
        if self._async_client is not None:
            await self._async_client.aclose()

    def _before(self, ctx: CallContext, operation: str) -> None:
        """Every stage's ``before``, in order; neighbours that batch their reads share one batch."""
        if not self.stages:  # the poller's gateway: thousands of calls a second, no stage
            return
        group: list[Any] = []
        batch: Any = None

        def decide_group() -> None:
            if group:
                answers = batch.run()
                for member in group:
                    member.decide(ctx, operation, answers)
                group.clear()

        for stage in self.stages:
            plan = getattr(stage, "plan", None)
            if plan is None:
                decide_group()
                batch = None
                stage.before(ctx, operation)
                continue
            joined = plan(ctx, operation, batch)
            if joined is not batch:
                decide_group()
                batch = joined
            group.append(stage)
        decide_group()

    def _finish(self, record: CallRecord, started: float, answer: Answer | None, error: ProviderError | None) -> None:
        record.latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if answer is not None:
            record.status_code = answer.status_code
            record.request_id = answer.request_id
            record.ratelimit_remaining = answer.ratelimit_remaining
        elif error is not None:
            record.status_code = error.status_code
        if error is not None:
            record.error_code = error.code
        self.audit.record(record)
        observe_call(record)  # duration, errors, rate limits, tokens, spend (provider/metrics.py)
        for stage in self.stages:
            stage.after(record, error)
