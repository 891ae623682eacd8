"""Every provider call goes through the gateway: classified, retried by class, audited, priced.

The faults are the simulator's, over real HTTP; only the sleep between retries is recorded
instead of slept, so the backoff itself can be checked."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from genline.config.catalog import load_catalog
from genline.config.errors import (
    AuthenticationFailed,
    InsufficientBalance,
    ProviderBadResponse,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from genline.config.settings import Settings
from genline.provider.client import ProviderClient
from genline.provider.gateway import CallContext, Gateway, MemoryAuditSink, RetryPolicy, Stage
from genline.provider.poll_client import HttpTaskReader
from genline.provider.shared_state import RedisSharedState
from genline.provider.simulator import SimulatorHandle
from genline.provider.stages import AccountGuard, CircuitBreaker, RateLimiter

CTX = CallContext(user_id="u1", feature="f1", pipeline_id="pl_1", step_id="st_1", model="gpt-4o-mini")
MESSAGES = [{"role": "user", "content": "A mug"}]


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def make_gateway() -> Iterator[Callable[..., tuple[Gateway, MemoryAuditSink, Sleeps]]]:
    made: list[Gateway] = []

    def make(settings: Settings, attempts: int = 4) -> tuple[Gateway, MemoryAuditSink, Sleeps]:
        audit, sleeps = MemoryAuditSink(), Sleeps()
        gateway = Gateway(
            load_catalog(),
            audit,
            client=ProviderClient(settings),
            retry=RetryPolicy(max_attempts=attempts, base_s=0.5, cap_s=8.0),
            sleep=sleeps,
            rng=random.Random(1),
        )
        made.append(gateway)
        return gateway, audit, sleeps

    yield make
    for gateway in made:
        gateway.close()


GatewayFactory = Callable[..., tuple[Gateway, MemoryAuditSink, Sleeps]]


def script(sim: SimulatorHandle, *entries: dict[str, object]) -> None:
    httpx.post(f"{sim.base_url}/_sim/faults", json={"script": list(entries)}).raise_for_status()


def test_429_is_retried_after_the_providers_retry_after(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], make_gateway: GatewayFactory
) -> None:
    gateway, audit, sleeps = make_gateway(make_settings(sim.base_url))
    script(sim, {"method": "POST", "path": "/v1/chat/completions", "status": 429, "times": 2, "retry_after": 3})
    result = gateway.chat(CTX, MESSAGES, max_tokens=50)
    assert result.text
    assert sleeps.waits == [3.0, 3.0]
    assert [r.status_code for r in audit.records] == [429, 429, 200]
    assert audit.records[0].error_code == "provider_rate_limited"


def test_5xx_backs_off_exponentially_with_jitter_and_a_cap(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], make_gateway: GatewayFactory
) -> None:
    gateway, audit, sleeps = make_gateway(make_settings(sim.base_url), attempts=6)
    script(
        sim,
        {"method": "POST", "path": "/v1/chat/completions", "status": 500, "times": 3},
        {"method": "POST", "path": "/v1/chat/completions", "status": 503, "times": 2},
    )
    gateway.chat(CTX, MESSAGES, max_tokens=50)
    assert len(sleeps.waits) == 5
    for attempt, wait in enumerate(sleeps.waits, start=1):
        ceiling = min(8.0, 0.5 * 2 ** (attempt - 1))
        assert ceiling / 2 <= wait <= ceiling


def test_retries_stop_at_the_attempt_budget(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], make_gateway: GatewayFactory
) -> None:
    gateway, audit, _ = make_gateway(make_settings(sim.base_url), attempts=3)
    script(sim, {"method": "POST", "path": "/v1/chat/completions", "status": 503, "times": 5})
    with pytest.raises(ProviderUnavailable) as info:
        gateway.chat(CTX, MESSAGES, max_tokens=50)
    assert info.value.retryable and len(audit.records) == 3


@pytest.mark.parametrize(
    ("status", "kind"), [(400, ProviderRejected), (401, AuthenticationFailed), (402, InsufficientBalance)]
)
def test_permanent_errors_are_never_retried(
    sim: SimulatorHandle,
    make_settings: Callable[..., Settings],
    make_gateway: GatewayFactory,
    status: int,
    kind: type[ProviderRejected | AuthenticationFailed | InsufficientBalance],
) -> None:
    gateway, audit, sleeps = make_gateway(make_settings(sim.base_url))
    script(sim, {"method": "POST", "path": "/v1/chat/completions", "status": status, "times": 1})
    with pytest.raises(kind) as info:
        gateway.chat(CTX, MESSAGES, max_tokens=50)
    assert not sleeps.waits and len(audit.records) == 1 and not info.value.retryable


def test_a_wrong_key_is_an_authentication_failure_that_does_not_show_the_key(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], make_gateway: GatewayFactory
) -> None:
    gateway, _, _ = make_gateway(make_settings(sim.base_url, APIMART_API_KEY="wrong-key-abcdef"))
    with pytest.raises(AuthenticationFailed) as info:
        gateway.chat(CTX, MESSAGES, max_tokens=50)
    assert "wrong-key-abcdef" not in str(info.value) and "wrong-key-abcdef" not in repr(info.value.__cause__)


def test_timeouts_are_retryable(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], make_gateway: GatewayFactory
) -> None:
    gateway, audit, _ = make_gateway(make_settings(sim.base_url, GENLINE_HTTP_TIMEOUT_S="0.3"), attempts=1)
    script(sim, {"method": "POST", "path": "/v1/chat/completions", "status": "timeout", "times": 1})
    with pytest.raises(ProviderTimeout):
        gateway.chat(CTX, MESSAGES, max_tokens=50)
    assert audit.records[0].error_code == "provider_timeout" and audit.records[0].status_code is None


def test_an_answer_that_is_not_json_is_a_bad_response(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], make_gateway: GatewayFactory
) -> None:
    gateway, _, _ = make_gateway(make_settings(sim.base_url), attempts=1)
    script(sim, {"method": "POST", "path": "/v1/chat/completions", "status": "non_json", "times": 1})
    with pytest.raises(ProviderBadResponse):
        gateway.chat(CTX, MESSAGES, max_tokens=50)


def test_chat_calls_are_priced_from_the_catalog(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], make_gateway: GatewayFactory
) -> None:
    gateway, audit, _ = make_gateway(make_settings(sim.base_url))
    result = gateway.chat(CTX, MESSAGES, max_tokens=50)
    record = audit.records[0]
    assert record.prompt_tokens == result.prompt_tokens > 0
    expected = (0.15 * result.prompt_tokens + 0.60 * result.completion_tokens) / 1e6
    assert float(record.cost_usd) == pytest.approx(expected)


def test_a_submit_and_its_poll_share_the_job_and_the_poll_books_the_cost(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], make_gateway: GatewayFactory
) -> None:
    settings = make_settings(sim.base_url)
    gateway, audit, _ = make_gateway(settings)
    ctx = CallContext("u", "f", "pl", "st", "minimax-hailuo-2.3")
    job = gateway.submit(
        ctx,
        "video",
        {"model": "minimax-hailuo-2.3", "prompt": "mug", "duration": 6, "aspect_ratio": "16:9", "resolution": "768p"},
        "key-1",
    )
    again = gateway.submit(
        ctx,
        "video",
        {"model": "minimax-hailuo-2.3", "prompt": "mug", "duration": 6, "aspect_ratio": "16:9", "resolution": "768p"},
        "key-1",
    )
    assert job.task_id == again.task_id

    async def poll() -> None:
        poller = Gateway(load_catalog(), audit, async_client=HttpTaskReader(settings))
        state = await poller.poll(ctx, job.task_id, units=6)
        assert state.status == "completed" and state.assets
        await poller.aclose()

    asyncio.run(poll())
    assert float(audit.records[-1].cost_usd) == pytest.approx(0.15)


@pytest.mark.integration
def test_a_paid_call_costs_two_redis_round_trips(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Pause, rate limit and breaker read together before the call; after a success, one more
    trip that writes nothing when nothing was counted or tripped."""
    import redis

    admin = redis.Redis.from_url(redis_url)
    state = RedisSharedState(redis_url)
    stages: list[Stage] = [AccountGuard(state), RateLimiter(state, rate_per_s=1000), CircuitBreaker(state)]
    client = ProviderClient(make_settings(sim.base_url))
    gateway = Gateway(load_catalog(), MemoryAuditSink(), client=client, stages=stages)
    sent: list[str] = []
    execute = redis.Redis.execute_command

    def counting(self: redis.Redis, *args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return execute(self, *args, **options)

    try:
        gateway.chat(CTX, MESSAGES, max_tokens=20)  # loads the scripts once
        monkeypatch.setattr(redis.Redis, "execute_command", counting)
        gateway.chat(CTX, MESSAGES, max_tokens=20)
        assert sent == ["EVALSHA", "EVALSHA"]
        sent.clear()
        payload = {"model": "minimax-hailuo-2.3", "prompt": "mug", "duration": 6, "aspect_ratio": "16:9"}
        gateway.submit(CallContext(model="minimax-hailuo-2.3"), "video", payload | {"resolution": "768p"}, "key-rt")
        assert sent == ["EVALSHA", "EVALSHA"]
        assert not admin.exists("genline:breaker:gpt-4o-mini:failures", "genline:rate:apimart:slow")
    finally:
        gateway.close()
        state.close()
        admin.close()
