"""The gateway's cross-cutting stages, shared by every worker through ``SharedState``:

- ``AccountGuard``: a 401 or 402 pauses every paid call to the provider (not only the one step)
  for ``pause_s``, and raises an alert; calls during the pause are refused before they are sent.
- ``RateLimiter``: one token bucket per provider (every worker draws from it, unlike Celery's
  per-worker ``rate_limit``), which also slows down when ``x-ratelimit-remaining`` runs low.
- ``CircuitBreaker``: per model; opens after ``threshold`` provider failures in a row, refuses
  calls while open (the step moves to its next model), then lets one probe through (half-open).

Polls are not limited or broken here: the poller paces itself and a poll costs nothing.

Before a paid call the three read shared state together: each ``plan``s its part into one
``Admission`` and the gateway asks the store once (one Redis round trip, a Lua script), then each
``decide``s on the answers in turn, as its ``before`` would have. ``before`` alone is a batch of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
from genline.provider.shared_state import Admission, Admitted, SharedState

log = get_logger("genline.stages")
PAID = ("chat", "submit")
PAUSE_KEY = "paused:apimart"
_BREAKS = (ProviderUnavailable, ProviderTimeout, ProviderConnectionError)


def alert(state: SharedState, event: str, **fields: object) -> None:
    """An alert is an error-level log event marked ``alert`` plus a shared counter."""
    state.incr(f"alerts:{event}", 7 * 24 * 3600)
    log.error(event, alert=True, **fields)


def pause_paid_work(state: SharedState, error: AccountError, pause_s: float, **fields: object) -> None:
    """A 401 or 402: every paid call of every process is refused for ``pause_s`` (or until an
    operator's ``genline provider resume``), and the operators are alerted."""
    state.set(PAUSE_KEY, error.code, pause_s)
    alert(state, "provider_paused", code=error.code, pause_s=pause_s, **fields)


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

    def plan(self, ctx: CallContext, operation: str, batch: Batch | None) -> Batch:
        """Add this stage's reads to ``batch``; a new batch when they cannot join it."""
        if operation not in PAID:  # nothing to read: any batch will do
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


class RateLimiter(_SharedStage):
    part = "rate"

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

    def ask(self, ctx: CallContext, admission: Admission) -> None:
        admission.rate_keys, admission.rate_per_s, admission.burst = (self.slow_key, self.key), self.rate, self.burst

    def decide(self, ctx: CallContext, operation: str, answers: Admitted) -> None:
        if operation not in PAID:
            return
        if not answers.rate_checked:  # not looked at in the batch: read now
            answers = self.plan(ctx, operation, None).run()
        # The slow-down: the provider said we are nearly out; then the bucket's own wait.
        wait = max(answers.slow_s, answers.token_wait_s)
        if wait > self.max_wait_s:
            err = RateLimited(f"Our own rate limit asks to wait {wait:.1f} s.", retry_after=wait)
            err.nothing_sent = True
            raise err
        if wait > 0:
            self.sleep(wait)

    def after(self, record: CallRecord, error: ProviderError | None) -> None:
        remaining = record.ratelimit_remaining
        if remaining is not None and remaining <= self.low_water:
            # Spread what is left of the provider's window instead of running into 429s.
            self.state.set(self.slow_key, "0.5", 1.0)


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
