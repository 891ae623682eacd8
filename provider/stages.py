"""The gateway's cross-cutting stages, shared by every worker through ``SharedState``:

- ``AccountGuard``: a 401 or 402 pauses every paid call to the provider (not only the one step)
  for ``pause_s``, and raises an alert; calls during the pause are refused before they are sent.
- ``RequestBudget`` (also known by its old name ``RateLimiter``): one token bucket per provider
  key that every call draws from, in every worker and poller alike (unlike Celery's per-worker
  ``rate_limit``): chats, submits, cancels and result downloads one token each through this
  stage, the poller's reads a whole round's worth at once (``draw_polls``). Priorities are floors:
  interactive work may empty the bucket (and take a token on credit, waiting for it), polls must
  leave ``POLL_FLOOR`` of the burst in it, batch work ``BATCH_FLOOR``, so a poller with thousands
  due never takes the token a submit needs. The provider's own signals tighten it for everyone:
  a 429 about our key's window (its ``x-ratelimit-remaining`` at or near zero, or absent) stops
  every call for its ``Retry-After`` and lowers the rate (``cap``) for a minute; a 429 whose window
  has room is the provider's busy minute, left to the refused call's own backoff; a low
  ``x-ratelimit-remaining`` slows everyone down briefly.
- ``CircuitBreaker``: per model; opens after ``threshold`` provider failures in a row, refuses
  calls while open (the step moves to its next model), then lets one probe through (half-open).

Polls are not held or broken here, and one poll at a time is not budgeted here either: the
poller draws its rounds' tokens in bulk (one shared-state round trip a round, not one a poll).

Before a paid call the three read shared state together: each ``plan``s its part into one
``Admission`` and the gateway asks the store once (one Redis round trip, a Lua script), then each
``decide``s on the answers in turn, as its ``before`` would have. ``before`` alone is a batch of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from genline.config.errors import (
    AccountError,
    CircuitOpen,
    ProviderConnectionError,
    ProviderError,
    ProviderPaused,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from genline.config.logging import get_logger
from genline.provider.gateway import CallContext, CallRecord
from genline.provider.shared_state import Admission, Admitted, BudgetKeys, Drawn, SharedState

log = get_logger("genline.stages")
PAID = ("chat", "submit")
BUDGETED = ("chat", "submit", "cancel", "download")  # one token a call through ``RequestBudget``
POLL_FLOOR = 0.3  # of the burst: what the poller's reads leave in the bucket for interactive work
BATCH_FLOOR = 0.6  # of the burst: what batch work leaves (it comes last)
# Result downloads come after polls: a copy can wait seconds (its link lasts hours), while a poll
# that waits delays the copy it would start. A download takes a token only above this floor, never
# on credit (see ``RequestBudget.before``).
DOWNLOAD_FLOOR = 0.45
# The bucket runs below the provider's limit: at most burst + rate requests fall in any one second
# of a fixed window, so rate + burst stays at the limit.
RATE_SHARE, BURST_SHARE = 0.9, 0.1
CAP_AFTER_429 = 0.75  # a 429 lowers the rate to this share of what it was, for CAP_TTL_S
CAP_TTL_S = 60.0
STRETCH_KEY = "polls:stretched"  # set while the poller's cadence is stretched by the budget
PAUSE_KEY = "paused:apimart"
PAUSE_UNTIL_KEY = "paused:apimart:until"  # when the pause ends by itself (epoch seconds), beside it
ALERTS = ("provider_paused", "copy_at_risk")  # the alerts `genline provider status` counts
_BREAKS = (ProviderUnavailable, ProviderTimeout, ProviderConnectionError)


def alert(state: SharedState, event: str, **fields: object) -> None:
    """An alert is an error-level log event marked ``alert`` plus a shared counter, and a webhook
    to the operators' URL (GENLINE_ALERT_WEBHOOK_URL): only queued here, in the shared state, and
    sent by the sweeper, so no provider call waits on that URL (pipelines/callbacks.py)."""
    from genline.pipelines.callbacks import queue_alert

    state.incr(f"alerts:{event}", 7 * 24 * 3600)
    log.error(event, alert=True, **fields)
    queue_alert(state, event, fields)


def pause_paid_work(state: SharedState, error: AccountError, pause_s: float, **fields: object) -> None:
    """A 401 or 402: every paid call of every process is refused for ``pause_s`` (or until an
    operator's ``genline provider resume``), and the operators are alerted. When it ends is kept
    beside it (``PAUSE_UNTIL_KEY``, the same lifetime), for ``read_pause``."""
    state.set(PAUSE_UNTIL_KEY, f"{time.time() + pause_s:.3f}", pause_s)
    state.set(PAUSE_KEY, error.code, pause_s)
    alert(state, "provider_paused", code=error.code, pause_s=pause_s, **fields)


class KeyReader(Protocol):
    """What reading a pause needs of a store: any ``SharedState``, or a stricter reader that raises
    instead of failing open (cli/provider.py), so "not paused" is never a guess."""

    def get(self, key: str) -> str | None: ...

    def delete_existing(self, *keys: str) -> list[str]: ...


@dataclass(frozen=True)
class Pause:
    reason: str  # the error code that paused paid work (provider_auth_failed, ...)
    until: datetime | None  # when it ends by itself (UTC); None for a pause an older genline set


def read_pause(state: KeyReader) -> Pause | None:
    """The pause of paid work, with when it ends; None when paid work is not paused."""
    reason = state.get(PAUSE_KEY)
    if not reason:
        return None
    until = state.get(PAUSE_UNTIL_KEY)
    try:
        ends = datetime.fromtimestamp(float(until), UTC) if until else None
    except ValueError:
        ends = None
    return Pause(reason, ends)


def lift_pause(state: KeyReader) -> bool:
    """End the pause now (`genline provider resume`); True when paid work was paused."""
    return PAUSE_KEY in state.delete_existing(PAUSE_KEY, PAUSE_UNTIL_KEY)


def alert_counts(state: KeyReader) -> dict[str, int]:
    """How many of each alert were raised in the last week (their counters' lifetime)."""
    return {name: int(state.get(f"alerts:{name}") or 0) for name in ALERTS}


class Batch:
    """One paid call's reads of shared state, made in one go by ``run``."""

    def __init__(self, state: SharedState) -> None:
        self.state, self.admission = state, Admission()

    def run(self) -> Admitted:
        return self.state.admit(self.admission)


class _SharedStage:
    """A stage whose ``before`` reads shared state as a part of a ``Batch``."""

    state: SharedState
    part: str  # an ``Admission`` part: pause | rate | breaker
    operations: tuple[str, ...] = PAID  # the operations this stage looks at

    def plan(self, ctx: CallContext, operation: str, batch: Batch | None) -> Batch:
        """Add this stage's reads to ``batch``; a new batch when they cannot join it."""
        if operation not in self.operations:  # nothing to read: any batch will do
            return batch if batch is not None else Batch(self.state)
        if batch is None or batch.state is not self.state or not batch.admission.can_add(self.part):
            batch = Batch(self.state)
        self.ask(ctx, batch.admission)
        return batch

    def ask(self, ctx: CallContext, admission: Admission) -> None:
        raise NotImplementedError

    def decide(self, ctx: CallContext, operation: str, answers: Admitted) -> None:
        raise NotImplementedError

    def before(self, ctx: CallContext, operation: str) -> None:
        self.decide(ctx, operation, self.plan(ctx, operation, None).run())


class AccountGuard(_SharedStage):
    part = "pause"

    def __init__(self, state: SharedState, *, pause_s: float = 300.0) -> None:
        self.state, self.pause_s, self.key = state, pause_s, PAUSE_KEY

    def ask(self, ctx: CallContext, admission: Admission) -> None:
        admission.pause_key = self.key

    def decide(self, ctx: CallContext, operation: str, answers: Admitted) -> None:
        if operation in PAID and (reason := answers.paused):
            raise ProviderPaused(
                f"Paid work with the provider is paused ({reason}); it resumes by itself once the "
                "account is fixed, or an operator runs `genline provider resume`."
            )

    def after(self, record: CallRecord, error: ProviderError | None) -> None:
        if isinstance(error, AccountError):
            pause_paid_work(self.state, error, self.pause_s, model=record.ctx.model)


class RequestBudget(_SharedStage):
    """One request budget per provider key (see the module's notes)."""

    part = "rate"
    operations = BUDGETED

    def __init__(
        self,
        state: SharedState,
        *,
        rate_per_s: float,
        burst: float | None = None,
        max_wait_s: float = 2.0,
        low_water: int = 2,
        sleep: Callable[[float], None] = time.sleep,
        provider: str = "apimart",
    ) -> None:
        self.state, self.rate, self.burst = state, rate_per_s, burst or max(1.0, rate_per_s)
        self.max_wait_s, self.low_water, self.sleep = max_wait_s, low_water, sleep
        self.key, self.slow_key = f"rate:{provider}", f"rate:{provider}:slow"
        self.keys = BudgetKeys(slow=self.slow_key, bucket=self.key, cap=f"rate:{provider}:cap")

    @classmethod
    def for_limit(
        cls, state: SharedState, limit_per_s: float, *, sleep: Callable[[float], None] = time.sleep
    ) -> RequestBudget:
        """The budget for a provider that allows ``limit_per_s`` requests a second per key
        (``GENLINE_PROVIDER_RATE_PER_S``): refilled at 90% of it, with a burst of 10%."""
        rate, burst = RATE_SHARE * limit_per_s, max(1.0, BURST_SHARE * limit_per_s)
        return cls(state, rate_per_s=rate, burst=burst, sleep=sleep)

    def floor(self, ctx: CallContext) -> float:
        return BATCH_FLOOR * self.burst if ctx.batch else 0.0

    def before(self, ctx: CallContext, operation: str) -> None:
        if operation != "download":
            super().before(ctx, operation)
            return
        # Polls draw only what lies above their floor and never on credit; a download taking
        # its token on credit would go ahead of them. So a download waits for a token above
        # ``DOWNLOAD_FLOOR`` (or the batch floor), up to ``max_wait_s``, then is refused.
        waited = 0.0
        while True:
            batch = self.plan(ctx, operation, None)
            batch.admission.rate_floor = max(batch.admission.rate_floor, DOWNLOAD_FLOOR * self.burst)
            batch.admission.rate_max_wait_s = 0.0
            answers = batch.run()
            wait = max(answers.slow_s, answers.token_wait_s)
            if wait <= 0:
                return
            taken = answers.token_wait_s <= 0  # only the provider's slow-down asks to wait: the token is ours
            if waited + wait > self.max_wait_s:
                err = RateLimited(f"Our own rate limit asks to wait {wait:.1f} s.", retry_after=wait)
                err.nothing_sent = True
                raise err
            wait = max(wait, 0.001)  # a wait rounded to nothing would ask again at once, forever
            self.sleep(wait)
            if taken:
                return
            waited += wait

    def ask(self, ctx: CallContext, admission: Admission) -> None:
        admission.rate_keys, admission.rate_per_s, admission.burst = (self.slow_key, self.key), self.rate, self.burst
        admission.rate_cap_key, admission.rate_floor = self.keys.cap, self.floor(ctx)
        admission.rate_max_wait_s = self.max_wait_s

    def decide(self, ctx: CallContext, operation: str, answers: Admitted) -> None:
        if operation not in self.operations:
            return
        if not answers.rate_checked:  # not looked at in the batch: read now
            answers = self.plan(ctx, operation, None).run()
        # The slow-down: the provider said we are nearly out (or sent a 429); then the bucket's
        # own wait (a token this close was taken on credit).
        wait = max(answers.slow_s, answers.token_wait_s)
        if wait > self.max_wait_s:
            err = RateLimited(f"Our own rate limit asks to wait {wait:.1f} s.", retry_after=wait)
            err.nothing_sent = True
            raise err
        if wait > 0:
            self.sleep(wait)

    def after(self, record: CallRecord, error: ProviderError | None) -> None:
        if isinstance(error, RateLimited) and not error.nothing_sent:
            if self.about_our_key(record.ratelimit_remaining):
                self.provider_refused(error.retry_after)
            return
        self.saw_remaining(record.ratelimit_remaining)

    def about_our_key(self, remaining: int | None) -> bool:
        """Is a 429 about our key's request window? Not when its own ``x-ratelimit-remaining``
        says the window has room: the provider is busy, and the refused call's own backoff (the
        gateway's retry, honouring ``Retry-After``) is the answer; slowing every process for it
        would turn a provider's bad minute into ours. Without the header: assume it is."""
        return remaining is None or remaining <= self.low_water

    # --- what the provider's answers say ---------------------------------------------------------
    def saw_remaining(self, remaining: int | None) -> None:
        if remaining is not None and remaining <= self.low_water:
            # Spread what is left of the provider's window instead of running into 429s.
            self.state.set(self.slow_key, "0.5", 1.0)

    def provider_refused(self, retry_after: float | None, count: int = 1) -> None:
        """A 429 (``count`` of them in a poller's round): every call of every process waits out
        ``Retry-After``, and the rate drops to ``CAP_AFTER_429`` of what it was for a minute."""
        pause = max(0.5, min(60.0, retry_after or 1.0))
        self.state.set(self.slow_key, repr(pause), pause)
        current = float(self.state.get(self.keys.cap) or self.rate)
        cap = max(self.rate / 20, min(current, self.rate) * CAP_AFTER_429)
        self.state.set(self.keys.cap, repr(cap), CAP_TTL_S)
        log.warning("provider_rate_limited", refused=count, wait_s=pause, rate_per_s=round(cap, 2))

    # --- the poller's rounds -------------------------------------------------------------------
    def draw_polls(self, n: int) -> Drawn:
        """Up to ``n`` tokens for one round of polls, in one shared-state round trip; polls
        leave ``POLL_FLOOR`` of the burst for interactive work."""
        if n <= 0:
            return Drawn(0)
        return self.state.take_up_to(self.keys, n, self.rate, self.burst, POLL_FLOOR * self.burst)

    def give_back(self, n: int) -> None:
        """Tokens drawn for polls that were not sent."""
        if n > 0:
            self.state.give_back(self.key, n, self.burst)


RateLimiter = RequestBudget  # its name before every call drew from it


class CircuitBreaker(_SharedStage):
    part = "breaker"

    def __init__(self, state: SharedState, *, threshold: int = 5, cooldown_s: float = 30.0) -> None:
        self.state, self.threshold, self.cooldown_s = state, threshold, cooldown_s

    def _keys(self, model: str | None) -> tuple[str, str, str, str]:
        base = f"breaker:{model or 'any'}"
        return f"{base}:failures", f"{base}:open", f"{base}:tripped", f"{base}:probe"

    def ask(self, ctx: CallContext, admission: Admission) -> None:
        _, open_key, tripped, probe = self._keys(ctx.model)
        admission.breaker_keys, admission.probe_ttl_s = (open_key, tripped, probe), self.cooldown_s

    def decide(self, ctx: CallContext, operation: str, answers: Admitted) -> None:
        if operation not in PAID:
            return
        if not answers.breaker_checked:  # the rate limit waited first: read now, after the wait
            answers = self.plan(ctx, operation, None).run()
        if answers.breaker_open:
            raise CircuitOpen(f"{ctx.model} has been failing; it is not being called for now.")
        if answers.tripped and not answers.probe_granted:  # the probe is claimed set-if-absent
            raise CircuitOpen(f"{ctx.model} is being probed after failures; it is not being called meanwhile.")

    def after(self, record: CallRecord, error: ProviderError | None) -> None:
        if record.operation not in PAID:
            return
        failures, open_key, tripped, probe = self._keys(record.ctx.model)
        if error is None:  # one round trip, and no write unless something was counted or tripped
            if tripped in self.state.delete_existing(failures, tripped, probe):
                log.info("circuit_closed", model=record.ctx.model)
            return
        if not isinstance(error, _BREAKS):
            return
        count = self.state.incr(failures, self.cooldown_s * 4)
        if count >= self.threshold or self.state.get(tripped):
            self.state.set(open_key, "1", self.cooldown_s)
            self.state.set(tripped, "1", self.cooldown_s * 20)
            self.state.delete(probe, failures)
            log.warning("circuit_opened", model=record.ctx.model, failures=count, cooldown_s=self.cooldown_s)
