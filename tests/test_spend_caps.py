"""Spend caps: reserved atomically at acceptance, accrued as costs are booked, released at the end.

The race tests fire many submits at once against a cap that fits exactly 50 pipelines, and sample
the cap's ledger row while they run: exactly 50 are accepted, and reserved + spent never passes
the cap at any moment seen.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text

from genline.config.catalog import BUILTIN_CATALOG, load_catalog
from genline.config.constants import PipelineStatus
from genline.config.errors import SpendCapExceeded, UserError
from genline.config.settings import Settings, load_settings
from genline.pipelines.api import Genline
from genline.pipelines.engine import run_step
from genline.pipelines.estimate import estimate_pipeline
from genline.pipelines.runtime import Runtime
from genline.pipelines.spend import micros
from genline.provider.simulator import SimulatorHandle
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, ProviderCall, SpendCap, SpendHold
from genline.workers.drain import drain
from tests.support.drive import backoff_over, faults, next_nudge, sim_config, sim_stats
from tests.support.refusal import refused

DESCRIPTION = "Hand-thrown stoneware mug, speckled glaze, 350 ml."


def write_catalog(path: Path, caps: list[dict[str, Any]]) -> str:
    raw = json.loads(BUILTIN_CATALOG.read_text())
    raw["caps"] = caps
    path.write_text(json.dumps(raw))
    return str(path)


def estimate_of(profile: str = "standard") -> Decimal:
    return estimate_pipeline(load_catalog(), profile, description=DESCRIPTION).total_usd


def fits(n: int, profile: str = "standard") -> str:
    """A limit in dollars that fits exactly ``n`` pipelines' reservations (each rounded up to the micro-dollar)."""
    return str(Decimal(micros(estimate_of(profile)) * n) / Decimal(1_000_000))


@pytest.fixture
def capped(
    tmp_path: Path, sim: SimulatorHandle, make_settings: Callable[..., Settings]
) -> Iterator[Callable[..., Runtime]]:
    made: list[Runtime] = []

    def make(caps: list[dict[str, Any]], **env: str) -> Runtime:
        settings = make_settings(
            sim.base_url, GENLINE_CATALOG_FILE=write_catalog(tmp_path / f"catalog{len(made)}.json", caps), **env
        )
        upgrade(settings.database_url)
        runtime = Runtime.from_settings(settings)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


def submit(rt: Runtime, fields: dict[str, Any]) -> str:
    return Genline(runtime=rt).submit(fields).pipeline_id


def ledger(rt: Runtime) -> list[SpendCap]:
    with rt.db.transaction() as s:
        rows = list(s.scalars(select(SpendCap).order_by(SpendCap.id)))
        s.expunge_all()
        return rows


# --- refusals ------------------------------------------------------------------------------------
def test_a_pipeline_that_would_cross_a_users_daily_cap_is_refused_with_its_headroom_and_nothing_created(
    capped: Callable[..., Runtime], sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    rt = capped([{"scope": "user", "match": "*", "period": "day", "limit_usd": fits(2)}])
    fields = request_fields(description=DESCRIPTION)
    submit(rt, {**fields, "idempotency_key": "a"})
    submit(rt, {**fields, "idempotency_key": "b"})
    err = refused(rt, sim, lambda: submit(rt, {**fields, "idempotency_key": "c"}))
    assert isinstance(err, SpendCapExceeded)
    assert (err.code, err.field) == ("spend_cap_exceeded", "user_id")
    assert "daily cap" in err.message and "$0.00 of the cap is left today" in err.message
    # Another user has a cap of their own; the same key again answers with its pipeline, no new reservation.
    submit(rt, {**fields, "user_id": "seller-2", "idempotency_key": "a"})
    again = Genline(runtime=rt).submit({**fields, "idempotency_key": "a"})
    assert not again.created
    rows = {row.subject: row for row in ledger(rt)}
    assert rows["seller-1"].reserved_micros == 2 * micros(estimate_of())
    assert rows["seller-2"].reserved_micros == micros(estimate_of())


def test_a_global_cap_refuses_with_no_field_and_a_feature_cap_names_the_feature(
    capped: Callable[..., Runtime], sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    rt = capped(
        [
            {"scope": "global", "match": "*", "period": "month", "limit_usd": "100"},
            {"scope": "feature", "match": "listing-video", "period": "day", "limit_usd": "0.01"},
        ]
    )
    err = refused(rt, sim, lambda: submit(rt, request_fields(description=DESCRIPTION)))
    assert (err.code, err.field) == ("spend_cap_exceeded", "feature")
    assert "listing-video" in err.message
    rt2 = capped([{"scope": "global", "match": "*", "period": "day", "limit_usd": "0.01"}])
    err = refused(rt2, sim, lambda: submit(rt2, request_fields(description=DESCRIPTION)))
    assert (err.code, err.field) == ("spend_cap_exceeded", None)


# --- accrual and release -------------------------------------------------------------------------
def test_a_finished_pipeline_turns_its_reservation_into_its_actual_cost_and_releases_the_rest(
    capped: Callable[..., Runtime], request_fields: Callable[..., dict[str, Any]]
) -> None:
    rt = capped([{"scope": "user", "match": "*", "period": "day", "limit_usd": "5"}])
    pipeline_id = submit(rt, request_fields(description=DESCRIPTION))
    (row,) = ledger(rt)
    assert (row.reserved_micros, row.spent_micros) == (micros(estimate_of()), 0)
    drain(rt)
    with rt.db.transaction() as s:
        pipeline = s.get_one(Pipeline, pipeline_id)
        assert pipeline.status == PipelineStatus.SUCCEEDED
        cost = Decimal(str(pipeline.cost_usd))
        booked = sum(Decimal(str(c)) for c in s.scalars(select(ProviderCall.cost_usd)))
        hold = s.scalars(select(SpendHold)).one()
    (row,) = ledger(rt)
    assert cost > 0 and abs(cost - booked) < Decimal("0.000001")
    assert row.reserved_micros == 0 and hold.held_micros == 0
    assert abs(row.spent_micros - micros(cost)) <= 3  # each call's cost rounded to the micro-dollar


def test_a_failed_pipeline_releases_what_it_did_not_spend(
    capped: Callable[..., Runtime], sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    rt = capped([{"scope": "global", "match": "*", "period": "day", "limit_usd": "5"}])
    faults(sim, {"method": "POST", "path": "/v1/videos/generations", "status": 400, "times": 5})
    pipeline_id = submit(rt, request_fields(description=DESCRIPTION))
    drain(rt)
    with rt.db.transaction() as s:
        pipeline = s.get_one(Pipeline, pipeline_id)
        assert pipeline.status == PipelineStatus.FAILED
        cost = Decimal(str(pipeline.cost_usd))
    (row,) = ledger(rt)
    assert row.reserved_micros == 0
    assert cost > 0 and abs(row.spent_micros - micros(cost)) <= 2  # the copy and the image were paid


def test_a_cancelled_pipeline_releases_its_reservation(
    capped: Callable[..., Runtime], request_fields: Callable[..., dict[str, Any]]
) -> None:
    rt = capped([{"scope": "global", "match": "*", "period": "day", "limit_usd": "5"}])
    genline = Genline(runtime=rt)
    pipeline_id = genline.submit(request_fields(description=DESCRIPTION)).pipeline_id
    genline.cancel(pipeline_id)
    (row,) = ledger(rt)
    assert (row.reserved_micros, row.spent_micros) == (0, 0)
    assert genline.caps()[0]["headroom_usd"] == "5.000000"


# --- the gateway's guard -------------------------------------------------------------------------
def test_a_paid_call_the_reservation_cannot_cover_is_refused_at_the_cap_and_never_sent(
    capped: Callable[..., Runtime], sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    """A runaway loop: spend booked against the pipeline already eats its reservation, and the cap
    has no headroom for a top-up, so its next paid call stops here, before the provider."""
    rt = capped([{"scope": "user", "match": "*", "period": "day", "limit_usd": fits(1)}])
    pipeline_id = submit(rt, request_fields(description=DESCRIPTION))
    with rt.db.transaction() as s:  # earlier calls of this pipeline cost all it reserved
        s.add(ProviderCall(pipeline_id=pipeline_id, operation="chat", cost_usd=estimate_of(), user_id="seller-1"))
    before = sim_stats(sim)["requests_by_status"]
    drain(rt)
    with rt.db.transaction() as s:
        pipeline = s.get_one(Pipeline, pipeline_id)
        assert (pipeline.status, pipeline.error_code) == (PipelineStatus.FAILED, "spend_cap_exceeded")
    assert sim_stats(sim)["requests_by_status"] == before  # no chat, no submit reached the provider
    (row,) = ledger(rt)
    assert row.reserved_micros + row.spent_micros <= row.limit_micros


def test_a_costlier_fallback_model_tops_up_the_reservation_when_the_cap_has_room(
    capped: Callable[..., Runtime], sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    rt = capped([{"scope": "user", "match": "*", "period": "day", "limit_usd": "5"}])
    # The standard profile's first video model is down for good: its second, costlier one renders.
    faults(sim, {"method": "POST", "path": "/v1/videos/generations", "status": 404, "times": 1})
    pipeline_id = submit(rt, request_fields(description=DESCRIPTION))
    drain(rt)
    with rt.db.transaction() as s:
        pipeline = s.get_one(Pipeline, pipeline_id)
        assert pipeline.status == PipelineStatus.SUCCEEDED, pipeline.error_message
        assert Decimal(str(pipeline.reserved_usd)) > Decimal(str(pipeline.estimated_cost_usd))
        cost = Decimal(str(pipeline.cost_usd))
    assert cost > Decimal(str(estimate_of()))
    (row,) = ledger(rt)
    assert row.reserved_micros == 0 and abs(row.spent_micros - micros(cost)) <= 3


# --- the races -----------------------------------------------------------------------------------
class Sampler:
    """Reads the cap rows over and over while submits race; keeps the highest reserved + spent seen."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.highest = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.engine.connect() as conn:
                used = conn.execute(text("SELECT MAX(reserved_micros + spent_micros) FROM spend_caps")).scalar()
            self.highest = max(self.highest, int(used or 0))
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.engine.dispose()


def _fire(env: dict[str, str], fields: dict[str, Any], keys: list[str], go: Any, out: Any) -> None:
    """One process's share of the race: wait for the start, submit each key, report each outcome."""
    settings = load_settings(env)
    with Genline(runtime=Runtime.from_settings(settings)) as genline:
        go.wait()
        for key in keys:
            try:
                genline.submit({**fields, "idempotency_key": key})
                out.put("accepted")
            except UserError as err:
                out.put(err.code)


@pytest.mark.integration
def test_200_submits_from_4_processes_against_a_cap_that_fits_50_accept_exactly_50_on_postgres(
    tmp_path: Path, pg_url: str, sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    env = {
        "GENLINE_VAR_DIR": str(tmp_path / "var"),
        "GENLINE_DATABASE_URL": pg_url,
        "APIMART_BASE_URL": sim.base_url,
        "APIMART_API_KEY": "sk-test-race",
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",
        "GENLINE_CATALOG_FILE": write_catalog(
            tmp_path / "catalog.json", [{"scope": "global", "match": "*", "period": "day", "limit_usd": fits(50)}]
        ),
    }
    upgrade(pg_url)
    fields = request_fields(description=DESCRIPTION)
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_fire, args=(env, fields, [f"race-{p}-{i}" for i in range(50)], go, out)) for p in range(4)
    ]
    for worker in workers:
        worker.start()
    with Sampler(pg_url) as sampler:
        go.set()
        outcomes = [out.get(timeout=300) for _ in range(200)]
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes.count("accepted") == 50, outcomes
    assert outcomes.count("spend_cap_exceeded") == 150
    limit = micros(Decimal(fits(50)))
    assert sampler.samples > 10 and sampler.highest <= limit
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pipelines")).scalar() == 50
            assert conn.execute(text("SELECT reserved_micros FROM spend_caps")).scalar() == limit
    finally:
        engine.dispose()


def test_200_submits_from_8_threads_against_a_cap_that_fits_50_accept_exactly_50_on_sqlite(
    capped: Callable[..., Runtime], request_fields: Callable[..., dict[str, Any]]
) -> None:
    rt = capped([{"scope": "global", "match": "*", "period": "day", "limit_usd": fits(50)}])
    genline = Genline(runtime=rt)
    fields = request_fields(description=DESCRIPTION)
    go = threading.Barrier(8)

    def fire(p: int) -> list[str]:
        go.wait()
        outcomes = []
        for i in range(25):
            try:
                genline.submit({**fields, "idempotency_key": f"race-{p}-{i}"})
                outcomes.append("accepted")
            except UserError as err:
                outcomes.append(err.code)
        return outcomes

    with Sampler(rt.settings.database_url) as sampler, ThreadPoolExecutor(8) as pool:
        outcomes = [o for share in pool.map(fire, range(8)) for o in share]
    assert outcomes.count("accepted") == 50
    assert outcomes.count("spend_cap_exceeded") == 150
    assert sampler.samples > 10 and sampler.highest <= micros(Decimal(fits(50)))
    with rt.db.transaction() as s:
        assert len(list(s.scalars(select(Pipeline.id)))) == 50


# --- what operators see --------------------------------------------------------------------------
def test_caps_lists_each_cap_with_spent_reserved_and_headroom_and_alerts_once_per_threshold(
    capped: Callable[..., Runtime], request_fields: Callable[..., dict[str, Any]]
) -> None:
    rt = capped(
        [
            {"scope": "user", "match": "*", "period": "day", "limit_usd": fits(4)},
            {"scope": "feature", "match": "listing-video", "period": "month", "limit_usd": "100"},
        ]
    )
    genline = Genline(runtime=rt)
    assert [line["untouched"] for line in genline.caps()] == [True, True]
    for key in ("a", "b", "c"):
        genline.submit({**request_fields(description=DESCRIPTION), "idempotency_key": key})
    lines = {line["scope"]: line for line in genline.caps()}
    user = lines["user"]
    assert user["subject"] == "seller-1" and user["used_pct"] == 75.0
    assert Decimal(user["reserved_usd"]) == 3 * Decimal(micros(estimate_of())) / 1_000_000
    assert Decimal(user["headroom_usd"]) == Decimal(fits(4)) - Decimal(user["reserved_usd"])
    rows = {row.scope: row for row in ledger(rt)}
    assert rows["user"].alerted_pct == 50  # 75%: the 50% alert went out, the 80% one not yet
    genline.submit({**request_fields(description=DESCRIPTION), "idempotency_key": "d"})
    assert {row.scope: row for row in ledger(rt)}["user"].alerted_pct == 100


@pytest.fixture
def no_caps_rt(rt: Runtime) -> Iterator[Runtime]:
    yield rt


def test_with_no_caps_a_submit_still_stores_its_estimate_by_step_and_reserves_nothing(
    no_caps_rt: Runtime, request_fields: Callable[..., dict[str, Any]]
) -> None:
    rt = no_caps_rt
    accepted = Genline(runtime=rt).submit(request_fields(description=DESCRIPTION))
    assert accepted.estimated_cost_usd == estimate_of()
    with rt.db.transaction() as s:
        pipeline = s.get_one(Pipeline, accepted.pipeline_id)
        assert pipeline.estimate is not None
        assert [step["kind"] for step in pipeline.estimate["steps"]] == ["copy", "image", "video", "store"]
    assert ledger(rt) == []


# --- recorded = billed ---------------------------------------------------------------------------
def test_a_chat_whose_answer_was_lost_is_booked_as_estimated_then_reconciled_to_what_was_billed(
    capped: Callable[..., Runtime], sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    """The provider does the work and bills it, then its answer hangs past the client's timeout:
    the call is booked at its most, marked estimated; the retry's answer (the same request) sets
    it to the truth, so recorded spend equals the provider's bill and the cap's spent follows."""
    rt = capped([{"scope": "global", "match": "*", "period": "day", "limit_usd": "5"}], GENLINE_HTTP_TIMEOUT_S="0.5")
    sim_config(sim, timeout_hang_s=2.0)
    faults(sim, {"method": "POST", "path": "/v1/chat/completions", "status": "timeout", "times": 1})
    pipeline_id = submit(rt, request_fields(description=DESCRIPTION))
    drain(rt)
    with rt.db.transaction() as s:
        pipeline = s.get_one(Pipeline, pipeline_id)
        assert pipeline.status == PipelineStatus.SUCCEEDED, pipeline.error_message
        chats = list(s.scalars(select(ProviderCall).where(ProviderCall.operation == "chat").order_by(ProviderCall.id)))
        cost = Decimal(str(pipeline.cost_usd))
        booked = sum((Decimal(str(c)) for c in s.scalars(select(ProviderCall.cost_usd))), Decimal(0))
    lost, answered = chats
    assert (lost.error_code, lost.cost_estimated) == ("provider_timeout", True)
    assert lost.cost_usd == answered.cost_usd and lost.completion_tokens == answered.completion_tokens
    assert abs(booked - Decimal(str(sim_stats(sim)["billed_usd"]))) < Decimal("0.000002")
    (row,) = ledger(rt)
    assert row.reserved_micros == 0 and abs(row.spent_micros - micros(cost)) <= 3


def test_a_lost_answer_of_an_earlier_attempt_is_reconciled_by_the_next_attempts_answer(
    capped: Callable[..., Runtime], sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    """One try per model and attempt: every copy model's answer is lost in attempt 1 (each booked
    at its most, estimated), so the step is tried again; attempt 2's answer corrects the row of
    the same model from attempt 1 (the same request), and only that one."""
    rt = capped(
        [{"scope": "global", "match": "*", "period": "day", "limit_usd": "5"}],
        GENLINE_HTTP_TIMEOUT_S="0.5",
        GENLINE_PROVIDER_MAX_ATTEMPTS="1",
    )
    sim_config(sim, timeout_hang_s=2.0)
    models = len(rt.catalog.profiles["standard"].copy_models)
    faults(sim, {"method": "POST", "path": "/v1/chat/completions", "status": "timeout", "times": models})
    pipeline_id = submit(rt, request_fields(description=DESCRIPTION))
    copy = next_nudge(rt)
    first = run_step(rt, copy)
    assert first is not None and (first.state, first.code) == ("retry", "provider_timeout")
    backoff_over(rt, copy)
    second = run_step(rt, copy)
    assert second is not None and second.state == "succeeded"
    with rt.db.transaction() as s:
        chats = select(ProviderCall).where(ProviderCall.operation == "chat").order_by(ProviderCall.id)
        *lost, answered = s.scalars(chats)
        pipeline = s.get_one(Pipeline, pipeline_id)
    assert len(lost) == models and all(c.cost_estimated and c.error_code == "provider_timeout" for c in lost)
    same = [c for c in lost if c.model == answered.model]
    assert [c.cost_usd for c in same] == [answered.cost_usd]  # corrected to the answer's cost
    others = [c for c in lost if c.model != answered.model]
    assert all(c.completion_tokens != answered.completion_tokens for c in others)  # left at their most
    assert Decimal(str(pipeline.cost_usd)) == sum((Decimal(str(c.cost_usd)) for c in [*lost, answered]), Decimal(0))
