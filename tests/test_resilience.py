"""Faults the provider and the machine throw at genline, and what people see: breakers that fail
over, a shared rate limit, a paused account, cancellation, lost messages recovered, copies run
by deadline and degraded copy. Over real HTTP against the simulator, in drain mode."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from genline.config.catalog import load_catalog
from genline.config.clock import utcnow
from genline.config.errors import CircuitOpen, InvalidState, NotFound, ProviderPaused, ProviderUnavailable, RateLimited
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext, CallRecord, Gateway, MemoryAuditSink, Stage
from genline.provider.shared_state import Admission, Admitted, LocalSharedState, RedisSharedState, SharedState
from genline.provider.simulator import SimulatorHandle
from genline.provider.stages import PAUSE_KEY, AccountGuard, CircuitBreaker, RateLimiter
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, Step
from genline.workers.drain import drain
from genline.workers.poller import Poller, next_poll_s
from genline.workers.sweeper import sweep
from tests.support.drive import faults, sim_config

RequestFn = Callable[..., dict[str, Any]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def strict_rt(sim: SimulatorHandle, make_settings: Callable[..., Settings]) -> Runtime:
    """One provider try per call and a breaker that opens after two failures. The shared state's
    clock only moves when the test says so, so the request budget never refills: it is made large."""
    settings = make_settings(
        sim.base_url,
        GENLINE_PROVIDER_MAX_ATTEMPTS="1",
        GENLINE_BREAKER_THRESHOLD="2",
        GENLINE_BREAKER_COOLDOWN_S="30",
        GENLINE_PROVIDER_RATE_PER_S="100000",
    )
    upgrade(settings.database_url)
    rt = Runtime.from_settings(settings)
    rt.shared = LocalSharedState(clock=Clock())  # a clock the test moves
    return rt


def _submits(rt: Runtime, pipeline_id: str, model: str) -> int:
    with rt.db.transaction() as s:
        return len(
            s.scalars(
                select(ProviderCall).where(
                    ProviderCall.pipeline_id == pipeline_id,
                    ProviderCall.operation == "submit",
                    ProviderCall.model == model,
                )
            ).all()
        )


def test_an_open_breaker_fails_over_without_calling_the_failing_model(
    strict_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    rt, api = strict_rt, Genline(runtime=strict_rt)
    ids = []
    for n in range(3):
        if n < 2:  # the preferred video model answers 503 (the fault hits the next video submit)
            faults(sim, {"method": "POST", "path": "/v1/videos/generations", "status": 503, "times": 1})
        ids.append(api.submit(request_fields()).pipeline_id)
        drain(rt)
    assert [api.status(p)["status"] for p in ids] == ["succeeded"] * 3
    assert [api.status(p)["steps"][2]["model"] for p in ids] == ["kling-v3-omni"] * 3
    assert _submits(rt, ids[0], "minimax-hailuo-2.3") == 1
    assert _submits(rt, ids[1], "minimax-hailuo-2.3") == 1  # second failure in a row: the breaker opens
    assert _submits(rt, ids[2], "minimax-hailuo-2.3") == 0  # open: not called at all
    rt.close()


def test_after_the_cooldown_one_probe_closes_the_breaker(
    strict_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    rt, api = strict_rt, Genline(runtime=strict_rt)
    for _ in range(2):
        faults(sim, {"method": "POST", "path": "/v1/videos/generations", "status": 503, "times": 1})
        api.submit(request_fields())
        drain(rt)
    rt.shared._clock.now += 31  # type: ignore[attr-defined]  # past the cooldown: half-open
    probe = api.submit(request_fields()).pipeline_id
    drain(rt)
    assert api.status(probe)["steps"][2]["model"] == "minimax-hailuo-2.3"  # the probe went through
    again = api.submit(request_fields()).pipeline_id
    drain(rt)
    assert api.status(again)["steps"][2]["model"] == "minimax-hailuo-2.3"  # and the breaker is closed
    rt.close()


def test_the_rate_limit_is_one_bucket_for_every_worker() -> None:
    clock = Clock()
    waits: list[float] = []
    state = LocalSharedState(clock=clock)
    workers = [RateLimiter(state, rate_per_s=2, burst=2, sleep=waits.append) for _ in range(2)]
    ctx = CallContext(model="gpt-4o-mini")
    workers[0].before(ctx, "chat")
    workers[1].before(ctx, "chat")
    workers[0].before(ctx, "chat")  # the bucket both share is empty: wait half a second
    assert waits == [pytest.approx(0.5)]
    workers[1].before(ctx, "poll")  # polls are free and not limited
    assert len(waits) == 1


def test_low_remaining_quota_slows_everyone_down_before_a_429() -> None:
    state = LocalSharedState(clock=Clock())
    waits: list[float] = []
    limiter = RateLimiter(state, rate_per_s=1000, sleep=waits.append)
    limiter.after(CallRecord(ctx=CallContext(), operation="chat", ts=utcnow(), ratelimit_remaining=1), None)
    RateLimiter(state, rate_per_s=1000, sleep=waits.append).before(CallContext(), "submit")
    assert waits and waits[0] >= 0.5


def test_a_402_pauses_paid_work_for_every_pipeline_and_says_why(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    faults(sim, {"method": "POST", "path": "/v1/images/generations", "status": 402, "times": 1})
    first = api.submit(request_fields()).pipeline_id
    drain(rt)
    status = api.status(first)
    assert status["status"] == "failed" and status["error"]["code"] == "provider_insufficient_balance"
    assert "run out of balance" in status["error"]["message"]
    assert rt.shared.get(PAUSE_KEY) == "provider_insufficient_balance"
    second = api.submit(request_fields(description="A walnut cutting board, oiled, 40 cm.")).pipeline_id
    drain(rt)
    held = api.status(second)
    assert held["status"] == "running"  # waiting, not failed, and not charged an attempt
    assert held["steps"][0]["status"] == "queued" and held["steps"][0]["error"]["code"] == "provider_paused"
    assert held["steps"][0]["attempts"] == 0
    rt.shared.delete(PAUSE_KEY)  # `genline provider resume`
    with rt.db.transaction() as s:
        step = s.get_one(
            Step,
            held["steps"] and s.scalars(select(Step.id).where(Step.pipeline_id == second, Step.position == 0)).one(),
        )
        step.updated_at = step.not_before = utcnow() - timedelta(hours=1)  # its wait is over
    sweep(rt)
    drain(rt)
    assert api.status(second)["status"] == "succeeded"


def test_cancel_stops_the_provider_job_and_no_later_step_starts(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    sim_config(sim, image_seconds=600)
    pid = api.submit(request_fields()).pipeline_id
    run_step(rt, rt.dispatcher.pop())  # type: ignore[attr-defined]  # pop is MemoryDispatcher's: the copy
    run_step(rt, rt.dispatcher.pop())  # type: ignore[attr-defined]  # pop is MemoryDispatcher's: image submitted
    result = api.cancel(pid)
    assert result == {
        "pipeline_id": pid,
        "status": "cancelled",
        "provider_jobs_cancelled": 1,
        "provider_jobs_left_running": 0,
    }
    drain(rt)
    status = api.status(pid)
    assert status["status"] == "cancelled"
    assert [s["status"] for s in status["steps"]] == ["succeeded", "cancelled", "cancelled", "cancelled"]
    stats = httpx.get(f"{sim.base_url}/_sim/stats").json()
    assert stats["jobs_total"] == 1 and stats["jobs_by_status"] == {"cancelled": 1}
    assert stats["billed_media_usd"] == 0


def test_a_job_the_provider_would_not_cancel_is_polled_to_its_end_and_its_cost_recorded(
    either_rt: Runtime, request_fields: RequestFn
) -> None:
    rt = either_rt
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    run_step(rt, rt.dispatcher.pop())  # type: ignore[attr-defined]  # pop is MemoryDispatcher's: the copy
    run_step(rt, rt.dispatcher.pop())  # type: ignore[attr-defined]  # pop is MemoryDispatcher's: image, done at once
    result = api.cancel(pid)  # the provider refuses: the job has already ended there
    assert (result["provider_jobs_cancelled"], result["provider_jobs_left_running"]) == (0, 1)
    with rt.db.transaction() as s:
        cost_at_cancel = s.get_one(Pipeline, pid).cost_usd
    drain(rt)  # the poller reads the job's end
    with rt.db.transaction() as s:
        job = s.scalars(select(ProviderJob).where(ProviderJob.kind == "image")).one()
        assert (job.status, job.next_poll_at, job.lease_until) == ("completed", None, None)
        assert job.cost_usd > 0
        spent = sum(c.cost_usd for c in s.scalars(select(ProviderCall).where(ProviderCall.pipeline_id == pid)))
        pipeline = s.get_one(Pipeline, pid)
        assert pipeline.status == "cancelled"
        assert pipeline.cost_usd == spent == cost_at_cancel + job.cost_usd  # the image's cost is on the pipeline
    assert [step["status"] for step in api.status(pid)["steps"]] == ["succeeded", "cancelled", "cancelled", "cancelled"]
    assert rt.dispatcher.pop() is None  # type: ignore[attr-defined]  # no later step was nudged


def test_cancelling_a_finished_or_unknown_pipeline_is_a_clear_error(rt: Runtime, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    drain(rt)
    with pytest.raises(InvalidState) as info:
        api.cancel(pid)
    assert info.value.code == "pipeline_finished" and "already succeeded" in info.value.message
    with pytest.raises(NotFound):
        api.cancel("pl_nope")


def test_a_lost_message_is_sent_again_by_the_sweeper(rt: Runtime, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    assert rt.dispatcher.pop()  # type: ignore[attr-defined]  # the broker lost the nudge
    drain(rt, max_rounds=3)
    assert api.status(pid)["status"] == "pending"
    with rt.db.transaction() as s:
        for step in s.scalars(select(Step).where(Step.pipeline_id == pid)):
            step.updated_at = utcnow() - timedelta(seconds=rt.settings.sweep_after_s + 1)
    assert sweep(rt) == 1
    drain(rt)
    assert api.status(pid)["status"] == "succeeded"


def _run_all_but_copies(rt: Runtime, copies: int) -> list[str]:
    """Drain until ``copies`` copy steps are queued, holding back their nudges; returns their ids."""
    held: list[str] = []
    poller = Poller(rt)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(200):
            while (step_id := rt.dispatcher.pop()) is not None:  # type: ignore[attr-defined]
                with rt.db.transaction() as s:
                    kind = s.get_one(Step, step_id).kind
                held.append(step_id) if kind == "store" else run_step(rt, step_id)
            if len(held) == copies:
                break
            if not loop.run_until_complete(poller.run_once()):
                loop.run_until_complete(asyncio.sleep(0.01))  # the next poll is not due yet
        loop.run_until_complete(poller.aclose())
    finally:
        loop.close()
    return held


def test_copies_run_earliest_deadline_first_and_late_ones_raise_an_alert(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    ids = [api.submit(request_fields()).pipeline_id for _ in range(2)]
    held = _run_all_but_copies(rt, copies=2)
    assert len(held) == 2
    with rt.db.transaction() as s:
        late, urgent = (s.get_one(Step, step_id) for step_id in held)
        urgent.deadline_at = utcnow() + timedelta(seconds=60)
        late.deadline_at = utcnow() + timedelta(hours=20)
        urgent_pipeline, late_step = urgent.pipeline_id, late.id
    sweep(rt)
    assert int(rt.shared.get("alerts:copy_at_risk") or 0) == 1  # 60 s left is inside the margin
    run_step(rt, late_step)  # the late copy's nudge runs the urgent copy first
    assert api.status(urgent_pipeline)["status"] == "succeeded"
    assert sorted(api.status(p)["status"] for p in ids) == ["running", "succeeded"]
    run_step(rt, held[1])
    assert [api.status(p)["status"] for p in ids] == ["succeeded", "succeeded"]


def test_copy_degrades_to_plain_text_when_every_chat_model_is_down(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    faults(sim, {"method": "POST", "path": "/v1/chat/completions", "status": 503, "times": 100})
    pid = api.submit(request_fields(profile="draft")).pipeline_id
    step_id = rt.dispatcher.pop()  # type: ignore[attr-defined]
    run_step(rt, step_id)  # first try: every model down -> queued again
    assert api.status(pid)["steps"][0]["status"] == "queued"
    with rt.db.transaction() as s:
        step = s.get_one(Step, step_id)
        step.updated_at = step.not_before = utcnow() - timedelta(hours=1)  # its backoff is over
    sweep(rt)
    drain(rt)
    status = api.status(pid)
    assert status["status"] == "succeeded"
    with rt.db.transaction() as s:
        output = s.get_one(Step, step_id).output
    assert output and output["degraded"] is True and output["text"].startswith("Hand-thrown stoneware mug")


def test_a_poll_answer_that_is_not_json_is_retried_not_fatal(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    faults(
        sim,
        {"method": "GET", "path": "/v1/tasks/*", "status": "non_json", "times": 2},
        {"method": "GET", "path": "/v1/tasks/*", "status": "missing_fields", "times": 1},
    )
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    rt.settings = rt.settings.with_overrides(poll_interval_s=0.001)
    drain(rt)
    assert api.status(pid)["status"] == "succeeded"
    with rt.db.transaction() as s:
        errors = s.scalars(select(ProviderCall.error_code).where(ProviderCall.operation == "poll")).all()
    assert errors.count("provider_bad_response") == 3
    with rt.db.transaction() as s:
        assert all(j.task_id for j in s.scalars(select(ProviderJob)))


def test_a_submit_that_never_answered_is_recorded_not_forgotten(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, make_settings: Callable[..., Settings]
) -> None:
    """Every try of the image submit times out: the provider may have made the job. When the step
    gives up, its job is recorded as of unknown outcome (and alerted), never silently dropped."""
    rt.settings = rt.settings.with_overrides(step_max_attempts=1, http_timeout_s=0.2)
    rt.__dict__.pop("gateway", None)
    sim_config(sim, timeout_hang_s=1.0)
    faults(sim, {"method": "POST", "path": "/v1/images/generations", "status": "timeout", "times": 10})
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    drain(rt)
    status = api.status(pid)
    assert status["status"] == "failed" and status["error"]["code"] == "provider_timeout"
    with rt.db.transaction() as s:
        jobs = s.scalars(select(ProviderJob)).all()
    assert [(j.status, j.error_code) for j in jobs] == [("unknown", "submit_outcome_unknown")]


# --- the stages' reads in one round trip (``SharedState.admit``) --------------------------------
BREAKER = ("breaker:m:open", "breaker:m:tripped", "breaker:m:probe")


def _admission(**changes: Any) -> Admission:
    values: dict[str, Any] = {
        "pause_key": PAUSE_KEY,
        "rate_keys": ("rate:t:slow", "rate:t"),
        "rate_per_s": 0.001,  # no refill to speak of during a test
        "burst": 2,
        "breaker_keys": BREAKER,
        "probe_ttl_s": 30,
    }
    values.update(changes)
    return Admission(**values)


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.integration)])
def any_state(request: pytest.FixtureRequest) -> Iterator[SharedState]:
    if request.param == "local":
        yield LocalSharedState()
        return
    state = RedisSharedState(request.getfixturevalue("redis_url"))  # the session's own redis-server
    yield state
    state.close()


def test_admit_reads_pause_rate_and_breaker_in_order_and_stops_where_a_stage_would(any_state: SharedState) -> None:
    state = any_state
    clear = state.admit(_admission())  # nothing set: a token taken, breaker closed
    assert clear == Admitted(rate_checked=True, breaker_checked=True)
    state.set(PAUSE_KEY, "provider_insufficient_balance", 60)
    paused = state.admit(_admission())
    assert paused == Admitted(paused="provider_insufficient_balance")  # nothing after the pause is read
    state.delete(PAUSE_KEY)
    state.set(BREAKER[0], "1", 30)
    opened = state.admit(_admission())  # the second and last token
    assert opened.breaker_checked and opened.breaker_open and not opened.probe_granted
    empty = state.admit(_admission())  # no token left: the breaker is not read (it is, after the wait)
    assert empty.rate_checked and empty.token_wait_s > 0 and not empty.breaker_checked
    state.delete(BREAKER[0])
    state.set(BREAKER[1], "1", 600)  # tripped, cooldown over: half-open
    half_open = _admission(rate_keys=None)
    assert state.admit(half_open) == Admitted(breaker_checked=True, tripped=True, probe_granted=True)
    assert state.admit(half_open) == Admitted(breaker_checked=True, tripped=True, probe_granted=False)  # once
    assert state.get(BREAKER[2]) == "1"
    state.set("rate:t:slow", "0.5", 60)  # the provider's quota is low: slow down
    slowed = state.admit(_admission(pause_key=None, rate_keys=("rate:t:slow", "rate:other"), breaker_keys=None))
    assert slowed == Admitted(rate_checked=True, slow_s=0.5)
    assert state.admit(Admission()) == Admitted()


def test_delete_existing_deletes_and_names_only_what_is_there(any_state: SharedState) -> None:
    state = any_state
    assert state.delete_existing("breaker:m:failures", *BREAKER) == []
    state.set(BREAKER[1], "1", 60)
    state.incr("breaker:m:failures", 60)
    assert state.delete_existing("breaker:m:failures", *BREAKER) == ["breaker:m:failures", BREAKER[1]]
    assert state.get(BREAKER[1]) is None and state.get("breaker:m:failures") is None


def test_an_unreachable_redis_fails_open_for_the_batched_reads() -> None:
    state = RedisSharedState("redis://127.0.0.1:1/9")  # nothing listens on port 1
    with capture_logs() as logs:
        assert state.admit(_admission()) == Admitted(rate_checked=True, breaker_checked=True)  # no pause, no wait
        assert state.delete_existing(*BREAKER) == []
        gateway = Gateway(load_catalog(), MemoryAuditSink(), stages=_stages(state))
        gateway._before(CallContext(model="m"), "chat")  # every stage lets the call through
        gateway._before(CallContext(model="m"), "chat")  # no bucket, so no wait either
        for stage in gateway.stages:
            stage.after(_record(), None)  # a success writes nothing, and fails open too
    assert [e["event"] for e in logs if e["event"] == "shared_state_unreachable"] == ["shared_state_unreachable"]
    state.close()


def _stages(state: SharedState, sleep: Callable[[float], None] = lambda s: None) -> list[Stage]:
    return [
        AccountGuard(state),
        RateLimiter(state, rate_per_s=2, burst=2, sleep=sleep),
        CircuitBreaker(state, threshold=2, cooldown_s=30),
    ]


def _record(model: str = "m") -> CallRecord:
    return CallRecord(ctx=CallContext(model=model), operation="chat", ts=utcnow())


def test_the_stages_through_the_gateway_keep_their_rules(any_state: SharedState) -> None:
    state = any_state
    waits: list[float] = []
    stages = _stages(state, sleep=waits.append)
    gateway, ctx = Gateway(load_catalog(), MemoryAuditSink(), stages=stages), CallContext(model="m")
    state.set(PAUSE_KEY, "provider_authentication_failed", 60)
    with pytest.raises(ProviderPaused):
        gateway._before(ctx, "submit")
    gateway._before(ctx, "poll")  # polls are never held, limited or broken
    state.delete(PAUSE_KEY)
    gateway._before(ctx, "chat")
    gateway._before(ctx, "chat")  # the pause took no token: two calls, no wait
    assert waits == []
    breaker = CircuitBreaker(state, threshold=2, cooldown_s=30)
    fast = RateLimiter(state, rate_per_s=1000, burst=1000, provider="fast", sleep=waits.append)
    gateway = Gateway(load_catalog(), MemoryAuditSink(), stages=[stages[0], fast, breaker])
    for _ in range(2):  # two failures in a row open the breaker
        breaker.after(_record(), ProviderUnavailable("down"))
    assert state.get("breaker:m:open") == "1"
    with pytest.raises(CircuitOpen):
        gateway._before(ctx, "chat")
    gateway._before(CallContext(model="other"), "chat")  # per model
    state.delete("breaker:m:open")  # the cooldown is over: one probe
    gateway._before(ctx, "chat")
    with pytest.raises(CircuitOpen, match="probed"):
        gateway._before(ctx, "chat")
    breaker.after(_record(), None)  # the probe succeeded: closed, counters gone
    assert state.get("breaker:m:tripped") is None and state.get("breaker:m:probe") is None
    gateway._before(ctx, "chat")
    breaker.after(_record(), ProviderUnavailable("down"))
    breaker.after(_record(), None)  # a success breaks the run of failures
    breaker.after(_record(), ProviderUnavailable("down"))
    assert state.get("breaker:m:open") is None
    gateway._before(ctx, "chat")
    assert waits == []  # every decision above came from the one batched read


def test_after_a_rate_limit_wait_the_breaker_is_read_after_the_wait(any_state: SharedState) -> None:
    state = any_state

    def sleep(seconds: float) -> None:  # meanwhile another worker's failures open the breaker
        state.set("breaker:m:open", "1", 30)

    gateway = Gateway(load_catalog(), MemoryAuditSink(), stages=_stages(state, sleep=sleep))
    state.set("rate:apimart:slow", "0.5", 60)
    with pytest.raises(CircuitOpen):
        gateway._before(CallContext(model="m"), "chat")


def test_a_wait_longer_than_allowed_is_refused_before_the_breaker_claims_a_probe(any_state: SharedState) -> None:
    state = any_state
    gateway = Gateway(load_catalog(), MemoryAuditSink(), stages=_stages(state))
    state.set("rate:apimart:slow", "5", 60)  # more than max_wait_s
    state.set("breaker:m:tripped", "1", 600)
    with pytest.raises(RateLimited):
        gateway._before(CallContext(model="m"), "chat")
    assert state.get("breaker:m:probe") is None  # still free for the call that gets through


@pytest.mark.parametrize(
    ("due_s", "applied_s", "expected_s"),
    [
        (100.0, 100.3, 102.0),  # applied 0.3 s late: still read 2 s after it was due
        (100.0, 100.0, 102.0),
        (100.0, 101.5, 102.5),  # far behind: not sooner than half a cadence after this answer
        (100.0, 109.0, 110.0),
    ],
)
def test_a_job_is_read_one_cadence_after_its_poll_was_due_not_after_its_answer_landed(
    due_s: float, applied_s: float, expected_s: float
) -> None:
    assert next_poll_s(due_s, applied_s, 2.0) == pytest.approx(expected_s)
