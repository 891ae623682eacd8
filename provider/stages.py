"""The gateway's cross-cutting stages, shared by every worker through ``SharedState``:

- ``AccountGuard``: a 401 or 402 pauses every paid call to the provider (not only the one step)
  for ``pause_s``, and raises an alert; calls during the pause are refused before they are sent.
- ``RateLimiter``: one token bucket per provider (every worker draws from it, unlike Celery's
  per-worker ``rate_limit``), which also slows down when ``x-ratelimit-remaining`` runs low.
- ``CircuitBreaker``: per model; opens after ``threshold`` provider failures in a row, refuses
  calls while open (the step moves to its next model), then lets one probe through (half-open).

Polls are not limited or broken here: the poller paces itself and a poll costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from config.errors import (
    AccountError,
    CircuitOpen,
    ProviderConnectionError,
    ProviderError,
    ProviderPaused,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from config.logging import get_logger
from provider.gateway import CallContext, CallRecord
from provider.shared_state import SharedState

log = get_logger("genline.stages")
PAID = ("chat", "submit")
PAUSE_KEY = "paused:apimart"
_BREAKS = (ProviderUnavailable, ProviderTimeout, ProviderConnectionError)


def alert(state: SharedState, event: str, **fields: object) -> None:
    """An alert is an error-level log event marked ``alert`` plus a shared counter."""
    state.incr(f"alerts:{event}", 7 * 24 * 3600)
    log.error(event, alert=True, **fields)


class AccountGuard:
    def __init__(self, state: SharedState, *, pause_s: float = 300.0) -> None:
        self.state, self.pause_s, self.key = state, pause_s, PAUSE_KEY

    def before(self, ctx: CallContext, operation: str) -> None:
        if operation in PAID and (reason := self.state.get(self.key)):
            raise ProviderPaused(
                f"Paid work with the provider is paused ({reason}); it resumes by itself once the "
                "account is fixed, or an operator runs `genline provider resume`."
            )

    def after(self, record: CallRecord, error: ProviderError | None) -> None:
        if isinstance(error, AccountError):
            self.state.set(self.key, error.code, self.pause_s)
            alert(self.state, "provider_paused", code=error.code, pause_s=self.pause_s, model=record.ctx.model)


class RateLimiter:
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

    def before(self, ctx: CallContext, operation: str) -> None:
        if operation not in PAID:
            return
        wait = float(self.state.get(self.slow_key) or 0.0)  # the provider said we are nearly out
        wait = max(wait, self.state.take_token(self.key, self.rate, self.burst))
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


class CircuitBreaker:
    def __init__(self, state: SharedState, *, threshold: int = 5, cooldown_s: float = 30.0) -> None:
        self.state, self.threshold, self.cooldown_s = state, threshold, cooldown_s

    def _keys(self, model: str | None) -> tuple[str, str, str, str]:
        base = f"breaker:{model or 'any'}"
        return f"{base}:failures", f"{base}:open", f"{base}:tripped", f"{base}:probe"

    def before(self, ctx: CallContext, operation: str) -> None:
        if operation not in PAID:
            return
        _, open_key, tripped, probe = self._keys(ctx.model)
        if self.state.get(open_key):
            raise CircuitOpen(f"{ctx.model} has been failing; it is not being called for now.")
        if self.state.get(tripped) and not self.state.set_if_absent(probe, "1", self.cooldown_s):
            raise CircuitOpen(f"{ctx.model} is being probed after failures; it is not being called meanwhile.")

    def after(self, record: CallRecord, error: ProviderError | None) -> None:
        if record.operation not in PAID:
            return
        failures, open_key, tripped, probe = self._keys(record.ctx.model)
        if error is None:
            if self.state.get(tripped):
                log.info("circuit_closed", model=record.ctx.model)
            self.state.delete(failures, tripped, probe)
            return
        if not isinstance(error, _BREAKS):
            return
        count = self.state.incr(failures, self.cooldown_s * 4)
        if count >= self.threshold or self.state.get(tripped):
            self.state.set(open_key, "1", self.cooldown_s)
            self.state.set(tripped, "1", self.cooldown_s * 20)
            self.state.delete(probe, failures)
            log.warning("circuit_opened", model=record.ctx.model, failures=count, cooldown_s=self.cooldown_s)
