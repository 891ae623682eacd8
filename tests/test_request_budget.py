"""One request budget per provider key: priorities, a round's tokens at once, what 429s and low
quota do to it, and that every process sharing the state shares the budget."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from genline.config.clock import utcnow
from genline.config.errors import RateLimited
from genline.provider.gateway import CallContext, CallRecord
from genline.provider.shared_state import DatabaseSharedState, LocalSharedState, RedisSharedState, SharedState
from genline.provider.stages import DOWNLOAD_FLOOR, POLL_FLOOR, RequestBudget
from genline.storage.db import Database
from genline.storage.migrate import upgrade


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "database", pytest.param("redis", marks=pytest.mark.integration)])
def state(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[SharedState]:
    if request.param == "local":
        yield LocalSharedState(clock=Clock())
        return
    if request.param == "database":
        url = f"sqlite:///{tmp_path}/shared.db"
        upgrade(url)
        db_state = DatabaseSharedState(Database(url))
        yield db_state
        db_state.close()
        return
    redis_state = RedisSharedState(request.getfixturevalue("redis_url"))
    yield redis_state
    redis_state.close()


def test_polls_leave_the_floor_for_interactive_calls_which_may_empty_the_bucket(state: SharedState) -> None:
    waits: list[float] = []
    budget = RequestBudget(state, rate_per_s=0.001, burst=10, sleep=waits.append, provider="floor")
    drawn = budget.draw_polls(1000)  # a poller with a thousand polls due
    assert drawn.granted == int(10 * (1 - POLL_FLOOR)) and drawn.wait_s > 0
    assert budget.draw_polls(5).granted == 0  # what is left is the floor, not the poller's
    for _ in range(3):  # a submit still gets its token at once, three times
        budget.before(CallContext(model="m"), "submit")
    assert waits == []


def test_batch_work_comes_after_polls() -> None:
    state = LocalSharedState(clock=Clock())
    waits: list[float] = []
    budget = RequestBudget(state, rate_per_s=1.0, burst=10, sleep=waits.append, max_wait_s=100)
    budget.draw_polls(5)  # 5 of 10 left: above the polls' floor (3), below batch's (6)
    budget.before(CallContext(model="m", batch=True), "submit")
    assert waits and waits[0] == pytest.approx(2.0)  # a batch submit waits for the bucket to refill
    budget.before(CallContext(model="m"), "submit")  # an interactive one goes at once
    assert waits == [pytest.approx(2.0)]


def test_tokens_not_used_go_back_and_never_past_the_burst() -> None:
    state = LocalSharedState(clock=Clock())
    budget = RequestBudget(state, rate_per_s=0.001, burst=10)
    assert budget.draw_polls(4).granted == 4
    budget.give_back(4)
    assert budget.draw_polls(100).granted == 7  # 10 less the floor of 3
    budget.give_back(1000)
    assert budget.draw_polls(100).granted == 7


def test_a_429_stops_every_call_for_its_retry_after_and_lowers_the_rate() -> None:
    clock = Clock()
    state = LocalSharedState(clock=clock)
    budget = RequestBudget(state, rate_per_s=10, burst=10)
    refused = RateLimited("slow down", retry_after=5.0)
    budget.after(CallRecord(ctx=CallContext(), operation="submit", ts=utcnow(), status_code=429), refused)
    assert budget.draw_polls(5).granted == 0  # the poller reads nothing while it lasts
    with pytest.raises(RateLimited) as info:  # and a submit is refused before it is sent
        budget.before(CallContext(model="m"), "chat")
    assert info.value.nothing_sent
    assert float(state.get(budget.keys.cap) or 0) == pytest.approx(7.5)
    clock.now += 6  # the Retry-After is over: calls go on at the lower rate
    budget.before(CallContext(model="m"), "chat")


def test_a_429_whose_headers_say_our_window_has_room_is_the_providers_bad_minute_not_our_rate() -> None:
    """Only a 429 about our key's window tightens everyone's budget; a busy provider's 429 (its
    x-ratelimit-remaining far from zero) is left to the refused call's own backoff."""
    state = LocalSharedState(clock=Clock())
    budget = RequestBudget(state, rate_per_s=10, burst=10)
    busy = RateLimited("the provider is busy", retry_after=5.0)
    record = CallRecord(ctx=CallContext(), operation="submit", ts=utcnow(), status_code=429, ratelimit_remaining=900)
    budget.after(record, busy)
    assert state.get(budget.keys.cap) is None and state.get(budget.slow_key) is None
    assert budget.draw_polls(5).granted == 5
    spent = CallRecord(ctx=CallContext(), operation="submit", ts=utcnow(), status_code=429, ratelimit_remaining=0)
    budget.after(spent, RateLimited("slow down", retry_after=5.0))
    assert float(state.get(budget.keys.cap) or 0) == pytest.approx(7.5)


def test_our_own_refusal_does_not_tighten_the_budget() -> None:
    state = LocalSharedState(clock=Clock())
    budget = RequestBudget(state, rate_per_s=10, burst=10)
    ours = RateLimited("Our own rate limit asks to wait 3.0 s.", retry_after=3.0)
    ours.nothing_sent = True
    budget.after(CallRecord(ctx=CallContext(), operation="chat", ts=utcnow()), ours)
    assert state.get(budget.keys.cap) is None and state.get(budget.slow_key) is None


def test_cancels_and_downloads_draw_from_the_budget_and_single_polls_do_not() -> None:
    clock = Clock()
    state = LocalSharedState(clock=clock)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.now += seconds

    budget = RequestBudget(state, rate_per_s=1, burst=4, sleep=sleep)
    budget.before(CallContext(), "cancel")
    budget.before(CallContext(), "download")
    budget.before(CallContext(), "poll")  # the poller draws a round's polls at once (draw_polls)
    assert waits == []
    budget.before(CallContext(), "download")  # two tokens left: a download leaves DOWNLOAD_FLOOR of the burst
    assert sum(waits) == pytest.approx(DOWNLOAD_FLOOR * 4 + 1 - 2, abs=0.01)


def test_downloads_come_after_polls_and_never_take_a_token_on_credit() -> None:
    clock = Clock()
    state = LocalSharedState(clock=clock)
    waits: list[float] = []
    budget = RequestBudget(state, rate_per_s=10, burst=10, sleep=waits.append)  # the clock stands still
    assert budget.draw_polls(100).granted == 7  # polls leave POLL_FLOOR of the burst: 3 tokens
    with pytest.raises(RateLimited) as refused:
        budget.before(CallContext(), "download")  # needs more than DOWNLOAD_FLOOR (4.5) in the bucket
    assert refused.value.nothing_sent and sum(waits) <= budget.max_wait_s
    budget.before(CallContext(), "chat")  # interactive work still goes first, on credit if need be
    clock.now += 1.0  # ten tokens' refill: the poller's next round and a download both get theirs
    budget.before(CallContext(), "download")
    assert budget.draw_polls(100).granted > 0


def test_for_limit_keeps_rate_and_burst_together_within_the_providers_limit() -> None:
    budget = RequestBudget.for_limit(LocalSharedState(), 100)
    assert budget.rate + budget.burst <= 100  # at most this many requests in any one second


def test_two_processes_on_one_database_share_one_budget(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    upgrade(url)
    first, second = DatabaseSharedState(Database(url)), DatabaseSharedState(Database(url))
    try:
        a = RequestBudget(first, rate_per_s=0.001, burst=10)
        b = RequestBudget(second, rate_per_s=0.001, burst=10)
        assert a.draw_polls(5).granted == 5
        assert b.draw_polls(5).granted == 2  # what the other left above the floor
    finally:
        first.close()
        second.close()
