"""The copy step's response cache (pipelines/cache.py), through the real step path: drain mode on
SQLite (and PostgreSQL where it matters), the simulator over real HTTP, Redis on the test's own server.

A repeated copy request is answered from the cache: no chat request reaches the provider, the copy
step costs nothing, and the audit log keeps a row that says it was a hit."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, select
from structlog.testing import capture_logs

import genline.pipelines.cache as cache_module
from genline.config.clock import utcnow
from genline.config.errors import ConfigError
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.audit import write_audit_many
from genline.pipelines.cache import (
    COPY_CACHE_PREFIX,
    CachedCopy,
    DatabaseCopyCache,
    RedisCopyCache,
    copy_key,
)
from genline.pipelines.engine import run_step
from genline.pipelines.prompts import COPY_PROMPT, copy_messages
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext, CallRecord
from genline.provider.simulator import SimulatorHandle
from genline.storage.db import Database
from genline.storage.migrate import upgrade
from genline.storage.models import CopyCacheEntry, Pipeline, ProviderCall, Step
from genline.workers.drain import drain
from genline.workers.sweeper import sweep
from tests.conftest import require_program
from tests.support.clock import ManualClock
from tests.support.drive import faults, output_of, sim_stats, step_row
from tests.support.redis_server import OwnRedis

RequestFn = Callable[..., dict[str, Any]]


def submit(rt: Runtime, fields: dict[str, Any], *, no_cache: bool = False) -> str:
    """Submit a pipeline (nothing runs yet: drain mode); ``no_cache`` written into its row as the
    submit would write the request's field."""
    pid = Genline(runtime=rt).submit(fields).pipeline_id
    if no_cache:
        with rt.db.transaction() as s:
            s.get_one(Pipeline, pid).no_cache = True
    return pid


def run_pipeline(rt: Runtime, fields: dict[str, Any], *, no_cache: bool = False) -> str:
    pid = submit(rt, fields, no_cache=no_cache)
    drain(rt)
    status = Genline(runtime=rt).status(pid)
    assert status["status"] == "succeeded", status
    return pid


def chat_calls(sim: SimulatorHandle) -> int:
    return int(sim_stats(sim)["chat_calls"])


def copy_step_calls(rt: Runtime, pipeline_id: str) -> list[ProviderCall]:
    step_id = step_row(rt, pipeline_id, "copy").id
    with rt.db.transaction() as s:
        return list(s.scalars(select(ProviderCall).where(ProviderCall.step_id == step_id)))


def cache_rows(rt: Runtime) -> list[CopyCacheEntry]:
    with rt.db.transaction() as s:
        return list(s.scalars(select(CopyCacheEntry)))


# --- the database backend (the zero-setup default) -----------------------------------------------
def test_a_repeated_copy_request_is_a_free_cache_hit_audited_as_a_hit(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    assert isinstance(rt.copy_cache, DatabaseCopyCache)  # SQLite, no Redis broker: the database
    first = run_pipeline(rt, request_fields())
    assert chat_calls(sim) == 1
    billed_chat = Decimal(str(sim_stats(sim)["billed_chat_usd"]))
    second = run_pipeline(rt, request_fields(user_id="seller-2"))
    assert chat_calls(sim) == 1  # no chat request reached the provider
    assert Decimal(str(sim_stats(sim)["billed_chat_usd"])) == billed_chat

    paid, hit = output_of(rt, first, "copy"), output_of(rt, second, "copy")
    assert hit["cached"] is True and "cached" not in paid
    assert {k: v for k, v in hit.items() if k != "cached"} == paid  # the same answer, the same shape
    assert hit["prompt"] == COPY_PROMPT

    [row] = copy_step_calls(rt, second)
    assert row.cache_hit is True and row.cost_usd == 0 and row.operation == "chat"
    assert row.user_id == "seller-2" and row.pipeline_id == second and row.model == paid["model"]
    assert row.status_code is None and row.request_id is None  # nothing was sent
    assert row.prompt_tokens is not None and row.prompt_tokens + (row.completion_tokens or 0) == paid["tokens"]
    [paid_row] = copy_step_calls(rt, first)
    assert paid_row.cache_hit is False and paid_row.cost_usd > 0

    with rt.db.transaction() as s:
        costs = {p.id: p.cost_usd for p in s.scalars(select(Pipeline))}
    assert costs[first] - costs[second] == paid_row.cost_usd  # the second pipeline paid nothing for copy


def test_no_cache_forces_a_paid_call_and_refreshes_the_entry(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    run_pipeline(rt, request_fields())
    fresh = run_pipeline(rt, request_fields(), no_cache=True)
    assert chat_calls(sim) == 2
    [row] = copy_step_calls(rt, fresh)
    assert row.cache_hit is False and row.cost_usd > 0 and row.status_code == 200
    assert "cached" not in output_of(rt, fresh, "copy")
    [entry] = cache_rows(rt)  # the fresh answer replaced the entry under the same key
    assert entry.text == output_of(rt, fresh, "copy")["text"]
    run_pipeline(rt, request_fields())
    assert chat_calls(sim) == 2


def test_an_expired_entry_is_a_miss_and_is_overwritten(
    sim: SimulatorHandle,
    make_settings: Callable[..., Settings],
    request_fields: RequestFn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = ManualClock()
    clock.drive(monkeypatch, cache_module)
    settings = make_settings(sim.base_url, GENLINE_COPY_CACHE_TTL_S="60")
    upgrade(settings.database_url)
    rt = Runtime.from_settings(settings)
    try:
        run_pipeline(rt, request_fields())
        clock.advance(59)
        run_pipeline(rt, request_fields())
        assert chat_calls(sim) == 1  # still live
        clock.advance(2)
        late = run_pipeline(rt, request_fields())
        assert chat_calls(sim) == 2  # 61 s after it was written: expired, so a paid call
        assert copy_step_calls(rt, late)[0].cache_hit is False
        [entry] = cache_rows(rt)
        assert entry.expires_at == clock.utcnow() + timedelta(seconds=60)  # overwritten, live again
        run_pipeline(rt, request_fields())
        assert chat_calls(sim) == 2
    finally:
        rt.close()


def test_a_different_max_tokens_model_or_prompt_version_is_a_miss(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_pipeline(rt, request_fields())
    assert chat_calls(sim) == 1
    # another model for the copy step
    run_pipeline(rt, request_fields(copy_model="claude-haiku"))
    assert chat_calls(sim) == 2
    # another max_tokens (the profile's copy budget)
    standard = rt.catalog.profiles["standard"]
    monkeypatch.setitem(rt.catalog.profiles, "standard", dataclasses.replace(standard, copy_max_tokens=250))
    run_pipeline(rt, request_fields())
    assert chat_calls(sim) == 3
    monkeypatch.setitem(rt.catalog.profiles, "standard", standard)
    # another prompt version
    monkeypatch.setattr(cache_module, "COPY_PROMPT", "copy.v2-test")
    bumped = run_pipeline(rt, request_fields())
    assert chat_calls(sim) == 4
    assert output_of(rt, bumped, "copy")["prompt"] == "copy.v2-test"
    assert len(cache_rows(rt)) == 4
    # and each of them is a hit when asked again
    run_pipeline(rt, request_fields())
    monkeypatch.setattr(cache_module, "COPY_PROMPT", COPY_PROMPT)
    run_pipeline(rt, request_fields())
    run_pipeline(rt, request_fields(copy_model="claude-haiku"))
    assert chat_calls(sim) == 4


def test_the_key_covers_model_messages_parameters_and_prompt_version() -> None:
    messages = copy_messages("A blue mug.")

    def key(model: str = "gpt-4o-mini", text: str = "A blue mug.", **changes: Any) -> str:
        parameters: dict[str, Any] = {"max_tokens": 300, "prompt": "copy.v1", **changes}
        return copy_key(model, copy_messages(text), **parameters)

    first = key()
    assert len(first) == 64 and int(first, 16) >= 0
    assert first == copy_key("gpt-4o-mini", [dict(m) for m in messages], max_tokens=300, prompt="copy.v1")
    others = {
        key("claude-haiku"),
        key(text="A red mug."),
        key(max_tokens=301),
        key(prompt="copy.v2"),
        key(temperature=0.2),
    }
    assert first not in others and len(others) == 5


def test_the_database_backend_costs_the_copy_step_no_transaction_of_its_own(
    rt: Runtime, sim: SimulatorHandle, make_settings: Callable[..., Settings], request_fields: RequestFn
) -> None:
    """The lookup rides the claim, the paid answer the completion: a copy step commits no more
    often with the cache than without it, on a miss or on a hit."""

    def copy_step_commits(runtime: Runtime) -> int:
        submit(runtime, request_fields())
        step_id = runtime.dispatcher.pop()  # type: ignore[attr-defined]
        commits = [0]

        def count(conn: Any) -> None:
            commits[0] += 1

        event.listen(runtime.db.engine, "commit", count)
        try:
            run_step(runtime, step_id)
        finally:
            event.remove(runtime.db.engine, "commit", count)
        drain(runtime)
        return commits[0]

    miss, hit = copy_step_commits(rt), copy_step_commits(rt)
    assert chat_calls(sim) == 1 and len(cache_rows(rt)) == 1
    off_settings = make_settings(sim.base_url, GENLINE_COPY_CACHE_TTL_S="0")
    off = Runtime.from_settings(off_settings)  # the same database, no cache
    try:
        assert off.copy_cache is None
        without = copy_step_commits(off)
        assert miss == without and hit <= without  # a hit skips the paid call's own bookkeeping too
    finally:
        off.close()


def test_a_ttl_of_zero_turns_the_cache_off(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], request_fields: RequestFn
) -> None:
    settings = make_settings(sim.base_url, GENLINE_COPY_CACHE_TTL_S="0")
    upgrade(settings.database_url)
    rt = Runtime.from_settings(settings)
    try:
        assert rt.copy_cache is None
        run_pipeline(rt, request_fields())
        run_pipeline(rt, request_fields())
        assert chat_calls(sim) == 2 and cache_rows(rt) == []
    finally:
        rt.close()


@pytest.mark.parametrize("raw", ["-1", "soon", "nan", "inf"])
def test_a_bad_ttl_is_refused_at_start_up_naming_the_variable(make_settings: Callable[..., Settings], raw: str) -> None:
    with pytest.raises(ConfigError, match="GENLINE_COPY_CACHE_TTL_S"):
        make_settings(GENLINE_COPY_CACHE_TTL_S=raw)


def test_the_default_ttl_is_a_week(make_settings: Callable[..., Settings]) -> None:
    assert make_settings().copy_cache_ttl_s == 7 * 86400


def test_a_degraded_copy_is_never_cached(rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    faults(sim, {"method": "POST", "path": "/v1/chat/completions", "status": 503, "times": 100})
    pid = api.submit(request_fields(profile="draft")).pipeline_id
    step_id = rt.dispatcher.pop()  # type: ignore[attr-defined]
    run_step(rt, step_id)  # first try: every model down -> queued again
    with rt.db.transaction() as s:
        step = s.get_one(Step, step_id)
        step.updated_at = step.not_before = utcnow() - timedelta(hours=1)  # its backoff is over
    sweep(rt)
    drain(rt)
    assert api.status(pid)["status"] == "succeeded"
    assert output_of(rt, pid, "copy")["degraded"] is True
    assert cache_rows(rt) == []


def test_the_database_backend_upserts_and_ignores_expired_rows_on_either_database(either_rt: Runtime) -> None:
    cache = DatabaseCopyCache(either_rt.db)
    key = copy_key("gpt-4o-mini", copy_messages("A mug."), max_tokens=300, prompt=COPY_PROMPT)
    assert cache.get(key) is None
    cache.put(key, CachedCopy("gpt-4o-mini", "first", 10, 20), 60)
    assert cache.get(key) == CachedCopy("gpt-4o-mini", "first", 10, 20)
    cache.put(key, CachedCopy("gpt-4o-mini", "second ünïcode", 11, 21), 60)  # ON CONFLICT DO UPDATE
    assert cache.get(key) == CachedCopy("gpt-4o-mini", "second ünïcode", 11, 21)
    with either_rt.db.transaction() as s:
        s.get_one(CopyCacheEntry, key).expires_at = utcnow() - timedelta(seconds=1)
    assert cache.get(key) is None
    cache.put(key, CachedCopy("gpt-4o-mini", "third", 12, 22), 60)
    assert cache.get(key) == CachedCopy("gpt-4o-mini", "third", 12, 22)
    assert len(cache_rows(either_rt)) == 1


def test_an_unreachable_database_cache_is_a_miss_not_an_error(tmp_path: Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'no-tables.db'}")  # no copy_cache table: every query fails
    cache = DatabaseCopyCache(db)
    try:
        cache.put("k" * 64, CachedCopy("gpt-4o-mini", "text", 1, 2), 60)
        assert cache.get("k" * 64) is None
    finally:
        db.dispose()


@pytest.mark.integration
def test_hit_and_estimate_flags_reach_postgresql_through_the_binary_copy(pg_url: str) -> None:
    upgrade(pg_url)
    db = Database(pg_url)
    try:
        ctx = CallContext("seller-1", "launch", None, None, "gpt-4o-mini")
        records = [
            CallRecord(ctx=ctx, operation="chat", ts=utcnow(), cache_hit=True),
            CallRecord(ctx=ctx, operation="poll", ts=utcnow(), cost_usd=Decimal("0.15"), cost_estimated=True),
        ]
        with db.transaction() as s:
            write_audit_many(s, records)
        with db.transaction() as s:
            rows = s.execute(select(ProviderCall.operation, ProviderCall.cache_hit, ProviderCall.cost_estimated)).all()
        assert sorted(tuple(r) for r in rows) == [("chat", True, False), ("poll", False, True)]
    finally:
        db.dispose()


# --- the Redis backend (the production footprint) ------------------------------------------------
@pytest.fixture
def redis_prefix(own_redis: OwnRedis) -> Iterator[str]:
    """A key prefix of this test's own on the session's Redis; its keys are deleted afterwards."""
    prefix = f"test-copy-cache-{uuid.uuid4().hex[:8]}:"
    yield prefix
    with own_redis.client() as client:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)


def test_with_a_redis_broker_the_cache_is_in_redis(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], redis_url: str
) -> None:
    settings = make_settings(sim.base_url, GENLINE_BROKER_URL=redis_url)
    rt = Runtime.from_settings(settings)
    try:
        assert isinstance(rt.copy_cache, RedisCopyCache) and rt.copy_cache.prefix == COPY_CACHE_PREFIX
    finally:
        rt.close()


def test_the_redis_backend_answers_repeats_under_its_prefix_with_the_ttl(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, own_redis: OwnRedis, redis_prefix: str
) -> None:
    rt.copy_cache = RedisCopyCache(own_redis.url, prefix=redis_prefix)
    first = run_pipeline(rt, request_fields())
    second = run_pipeline(rt, request_fields())
    assert chat_calls(sim) == 1
    assert copy_step_calls(rt, second)[0].cache_hit is True
    assert output_of(rt, second, "copy")["text"] == output_of(rt, first, "copy")["text"]
    assert cache_rows(rt) == []  # not in the database
    with own_redis.client() as client:
        [key] = list(client.scan_iter(match=redis_prefix + "*"))
        ttl_ms = client.pttl(key)
    assert 0 < ttl_ms <= rt.settings.copy_cache_ttl_s * 1000


def test_redis_going_away_mid_run_never_fails_the_copy_step(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    require_program("redis-server", "this test starts and stops a Redis of its own")
    with OwnRedis() as server:  # this test's own server, so stopping it disturbs nobody
        rt.copy_cache = RedisCopyCache(server.url, prefix="test-copy-cache:")
        run_pipeline(rt, request_fields())
        hit = run_pipeline(rt, request_fields())
        assert chat_calls(sim) == 1 and copy_step_calls(rt, hit)[0].cache_hit is True
        server.stop()  # Redis goes away
        with capture_logs() as logs:
            repeat = run_pipeline(rt, request_fields())  # the lookup fails: the provider answers
            new = run_pipeline(rt, request_fields(description="A walnut cutting board, oiled, 40 cm."))  # put fails
        assert chat_calls(sim) == 3
        gaps = [e for e in logs if e["event"] == "copy_cache_unreachable"]
        assert len(gaps) == 1 and gaps[0]["backend"] == "redis"  # once per outage, not once per call
        assert "stoneware" not in str(logs) and "walnut" not in str(logs)  # never the messages
        for pid in (repeat, new):
            [row] = copy_step_calls(rt, pid)
            assert row.cache_hit is False and row.status_code == 200
        server.start()  # back, empty (no persistence): the next answer is kept again
        run_pipeline(rt, request_fields())
        run_pipeline(rt, request_fields())
        assert chat_calls(sim) == 4


# --- the bench's money section ---------------------------------------------------------------------
def test_the_money_bench_counts_hits_and_the_estimate_error(tmp_path: Any) -> None:
    from lab.bench_money import TARGETS, run_money_section

    figures = run_money_section(10, log_dir=tmp_path, log=lambda line: None)
    assert figures["money_pipelines_succeeded"] == figures["copy_steps"] == 10
    assert figures["copy_cache_hits"] == 6 and figures["provider_chat_calls"] == 4  # 6 of 10 repeat one
    assert figures["cache_hit_rate"] == 0.6 >= TARGETS["cache_hit_rate"][1]
    assert 0 <= figures["estimate_error_p95"] <= TARGETS["estimate_error_p95"][1]
