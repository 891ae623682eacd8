"""Overnight batches: a window the workers keep, a throttle that leaves interactive work its
workers, the provider's batch mode billed at half price, and `genline batch` that is a no-op when
a file comes again, retries failed lines under new keys when asked, and names every line's pipeline.

The engine, the sweeper and the simulator run for real (SQLite, the simulator on loopback, drain
mode); time is a ManualClock where a window must open. The CLI runs in-process as a user's shell
would (tests/support/cli.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from genline.config.constants import StepStatus
from genline.config.errors import ValidationError
from genline.config.settings import Settings, load_settings
from genline.pipelines import engine
from genline.pipelines.request import validate_request
from genline.pipelines.runtime import Runtime
from genline.pipelines.windows import next_opening, parse_window, submit_in_window
from genline.provider.simulator import SimConfig, SimulatorHandle, start_simulator
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, Step
from genline.workers import sweeper
from genline.workers.drain import drain
from tests.conftest import TEST_KEY
from tests.support.cli import GenlineCli, count_rows
from tests.support.clock import ManualClock
from tests.support.drive import next_nudge, nudges, sim_stats

RequestFn = Callable[..., dict[str, Any]]

pytestmark = [
    # kombu's SQLAlchemy transport (the CLI's embedded broker) uses a loader strategy SQLAlchemy 2.1
    # deprecates; not ours (see tests/test_cli.py).
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"),
]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- the window ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "start", "end", "wraps"),
    [
        ("01:00-06:00", "01:00", "06:00", False),
        ("22:00-04:00", "22:00", "04:00", True),
        ("00:00-23:59", "00:00", "23:59", False),
    ],
)
def test_a_window_is_two_utc_times_and_may_wrap_midnight(text: str, start: str, end: str, wraps: bool) -> None:
    window = parse_window(text)
    assert (f"{window.start:%H:%M}", f"{window.end:%H:%M}", window.wraps, str(window)) == (start, end, wraps, text)


@pytest.mark.parametrize(
    "text",
    ["", "1:00-6:00", "01:00", "01:00-06:00-07:00", "24:00-06:00", "01:60-06:00", "06:00-06:00", "01h-06h", "tonight"],
)
def test_anything_else_is_refused_as_window_invalid(text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_window(text)
    assert (caught.value.code, caught.value.field) == ("window_invalid", "window")
    assert caught.value.message.endswith(".")


@pytest.mark.parametrize(
    ("window", "now", "opening"),
    [
        ("01:00-06:00", "2025-03-10T12:00:00", "2025-03-11T01:00:00"),  # after it: tomorrow
        ("01:00-06:00", "2025-03-10T00:30:00", "2025-03-10T01:00:00"),  # before it: today
        ("01:00-06:00", "2025-03-10T01:00:00", None),  # its start is inside
        ("01:00-06:00", "2025-03-10T05:59:59", None),
        ("01:00-06:00", "2025-03-10T06:00:00", "2025-03-11T01:00:00"),  # its end is not
        ("22:00-04:00", "2025-03-10T23:30:00", None),  # wrapped: late evening is inside
        ("22:00-04:00", "2025-03-10T03:59:00", None),  # and so is early morning
        ("22:00-04:00", "2025-03-10T04:00:00", "2025-03-10T22:00:00"),
        ("22:00-04:00", "2025-03-10T21:59:59", "2025-03-10T22:00:00"),
        ("22:00-04:00", "2025-12-31T12:00:00", "2025-12-31T22:00:00"),
        ("23:30-00:30", "2025-12-31T23:00:00", "2025-12-31T23:30:00"),
        ("00:00-01:00", "2025-12-31T23:00:00", "2026-01-01T00:00:00"),  # across a year's end
    ],
)
def test_next_opening_is_none_inside_and_the_next_start_outside(window: str, now: str, opening: str | None) -> None:
    assert next_opening(window, at(now)) == (at(opening) if opening else None)


def test_next_opening_reads_any_timezone_as_the_same_instant() -> None:
    from zoneinfo import ZoneInfo

    paris = datetime(2025, 3, 10, 13, 0, tzinfo=ZoneInfo("Europe/Paris"))  # 12:00 UTC
    assert next_opening(parse_window("01:00-06:00"), paris) == at("2025-03-11T01:00:00")
    with pytest.raises(ValueError):
        next_opening("01:00-06:00", datetime(2025, 3, 10, 12, 0))  # noqa: DTZ001  # no zone: refused, not guessed


# --- the worker side -----------------------------------------------------------------------------
def window_opening_in(clock: ManualClock, minutes: int) -> tuple[str, datetime]:
    """A one-hour window that opens ``minutes`` from the clock's now (a whole minute), and its opening."""
    opening = clock.utcnow().replace(second=0, microsecond=0) + timedelta(minutes=minutes)
    return f"{opening:%H:%M}-{opening + timedelta(hours=1):%H:%M}", opening


def batch_request(rt: Runtime, fields: dict[str, Any]) -> Any:
    return validate_request(
        {**fields, "priority": "batch"}, rt.catalog, upload_dirs=rt.settings.upload_dirs, url_policy=rt.url_policy
    )


def pipeline_of(rt: Runtime, pipeline_id: str) -> Pipeline:
    with rt.db.transaction() as s:
        pipeline = s.get_one(Pipeline, pipeline_id)
        s.expunge(pipeline)
        return pipeline


def first_step(rt: Runtime, pipeline_id: str) -> Step:
    with rt.db.transaction() as s:
        step = s.scalars(select(Step).where(Step.pipeline_id == pipeline_id, Step.position == 0)).one()
        s.expunge(step)
        return step


def test_a_batch_pipeline_outside_its_window_waits_and_runs_at_the_opening(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    clock.drive(monkeypatch, engine, sweeper)
    window, opening = window_opening_in(clock, 3)
    accepted = submit_in_window(rt, batch_request(rt, request_fields()), parse_window(window))
    assert pipeline_of(rt, accepted.pipeline_id).batch_window == window  # written with the pipeline

    engine.run_step(rt, next_nudge(rt))  # a worker takes the nudge, outside the window
    step = first_step(rt, accepted.pipeline_id)
    assert (step.status, step.attempts, step.not_before) == (StepStatus.QUEUED, 0, opening)
    assert pipeline_of(rt, accepted.pipeline_id).status == "pending"
    assert sim_stats(sim)["chat_calls"] == 0

    engine.run_step(rt, step.id)  # a redelivered or early message changes nothing
    assert first_step(rt, accepted.pipeline_id).status == StepStatus.QUEUED and not nudges(rt).sent
    clock.advance((opening - clock.utcnow()).total_seconds() - 1)
    sweeper.sweep(rt)
    assert not nudges(rt).sent, "the sweeper sent a step before its window opened"

    clock.advance(1)  # the window opens
    sweeper.sweep(rt)
    assert [step_id for step_id, _ in nudges(rt).sent] == [step.id]
    assert [queue for _, queue in nudges(rt).sent] == ["genline.batch"]
    drain(rt)
    assert pipeline_of(rt, accepted.pipeline_id).status == "succeeded"
    assert sim_stats(sim)["chat_calls"] == 1


def test_a_pipeline_already_started_finishes_after_its_window_closes(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the start is held: the provider's links a started pipeline depends on would expire."""
    clock = ManualClock()
    clock.drive(monkeypatch, engine, sweeper)
    now = clock.utcnow()
    window = f"{now - timedelta(minutes=1):%H:%M}-{now + timedelta(minutes=2):%H:%M}"
    accepted = submit_in_window(rt, batch_request(rt, request_fields()), parse_window(window))
    engine.run_step(rt, next_nudge(rt))  # the copy, inside the window
    clock.advance(300)  # the window has closed
    drain(rt)
    assert pipeline_of(rt, accepted.pipeline_id).status == "succeeded"


def test_an_interactive_pipeline_is_never_held(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    clock.drive(monkeypatch, engine, sweeper)
    window, _ = window_opening_in(clock, 30)
    request = validate_request(
        request_fields(), rt.catalog, upload_dirs=rt.settings.upload_dirs, url_policy=rt.url_policy
    )
    accepted = submit_in_window(rt, request, parse_window(window))  # a window asks nothing of interactive work
    assert pipeline_of(rt, accepted.pipeline_id).batch_window is None
    drain(rt)
    assert pipeline_of(rt, accepted.pipeline_id).status == "succeeded"


@pytest.fixture
def throttled_rt(
    request: pytest.FixtureRequest, sim: SimulatorHandle, make_settings: Callable[..., Settings]
) -> Iterator[Runtime]:
    """``rt`` with GENLINE_BATCH_MAX_RUNNING=1 (on PostgreSQL too, through ``pg``)."""
    env = {"GENLINE_BATCH_MAX_RUNNING": "1", "GENLINE_BATCH_THROTTLE_S": "5"}
    if getattr(request, "param", "sqlite") == "postgres":
        env["GENLINE_DATABASE_URL"] = request.getfixturevalue("pg_url")
    settings = make_settings(sim.base_url, **env)
    upgrade(settings.database_url)
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.close()


def set_running(rt: Runtime, step_id: str) -> None:
    """A worker is on this step right now (its lease current)."""
    with rt.db.transaction() as s:
        s.execute(
            update(Step)
            .where(Step.id == step_id)
            .values(status=StepStatus.RUNNING, attempts=1, lease_until=datetime.now(UTC) + timedelta(hours=1))
        )


def test_batch_steps_wait_while_the_batchs_share_of_workers_is_taken_and_interactive_ones_do_not(
    throttled_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = throttled_rt
    clock = ManualClock()
    clock.drive(monkeypatch, engine, sweeper)
    busy = submit_in_window(rt, batch_request(rt, request_fields()), None)
    waiting = submit_in_window(rt, batch_request(rt, request_fields()), None)
    nudges(rt).sent.clear()
    set_running(rt, first_step(rt, busy.pipeline_id).id)  # the one batch step allowed is running

    engine.run_step(rt, first_step(rt, waiting.pipeline_id).id)
    step = first_step(rt, waiting.pipeline_id)
    assert step.status == StepStatus.QUEUED and step.attempts == 0
    assert step.not_before is not None
    assert clock.utcnow() + timedelta(seconds=5) <= step.not_before <= clock.utcnow() + timedelta(seconds=10)

    interactive = validate_request(
        request_fields(), rt.catalog, upload_dirs=rt.settings.upload_dirs, url_policy=rt.url_policy
    )
    served = submit_in_window(rt, interactive, None)
    drain(rt)  # interactive work runs while the batch waits
    assert pipeline_of(rt, served.pipeline_id).status == "succeeded"
    assert first_step(rt, waiting.pipeline_id).status == StepStatus.QUEUED

    with rt.db.transaction() as s:  # the busy step is done; the waiting one is sent again when due
        s.execute(update(Step).where(Step.pipeline_id == busy.pipeline_id).values(status=StepStatus.CANCELLED))
    clock.advance(11)
    sweeper.sweep(rt)
    drain(rt)
    assert pipeline_of(rt, waiting.pipeline_id).status == "succeeded"


@pytest.mark.parametrize(
    "throttled_rt", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)], indirect=True
)
def test_concurrent_claims_never_run_more_batch_steps_than_allowed(
    throttled_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    rt = throttled_rt
    steps = [
        first_step(rt, submit_in_window(rt, batch_request(rt, request_fields()), None).pipeline_id).id for _ in range(6)
    ]
    barrier = threading.Barrier(len(steps))
    claims: list[object] = []

    def claim(step_id: str) -> None:
        barrier.wait()
        claims.append(engine._begin(rt, step_id))

    threads = [threading.Thread(target=claim, args=(step_id,)) for step_id in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(1 for c in claims if c is not None) == 1  # GENLINE_BATCH_MAX_RUNNING=1
    with rt.db.transaction() as s:
        statuses = sorted(s.scalars(select(Step.status).where(Step.id.in_(steps))))
    assert statuses == ["queued"] * 5 + ["running"]


# --- the provider's batch mode -------------------------------------------------------------------
def test_the_simulator_renders_batch_jobs_slower_and_bills_them_at_half_price() -> None:
    with start_simulator(SimConfig(api_key=TEST_KEY, image_seconds=2, video_seconds=4)) as sim:
        client = httpx.Client(base_url=sim.base_url, headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=5)
        body = {"model": "wan-2.7-image", "prompt": "a red bicycle", "n": 1, "size": "1:1"}
        ids = {}
        for mode in (False, True):
            answer = client.post(
                "/v1/images/generations", json={**body, "batch": mode}, headers={"Idempotency-Key": f"k-{mode}"}
            )
            answer.raise_for_status()
            ids[mode] = answer.json()["data"][0]["task_id"]
        tasks = {mode: client.get(f"/_sim/tasks/{task}").json() for mode, task in ids.items()}
        assert (tasks[False]["batch"], tasks[True]["batch"]) == (False, True)
        assert tasks[True]["estimated_time"] == 3 * tasks[False]["estimated_time"]
        assert Decimal(str(tasks[True]["cost_usd"])) == Decimal(str(tasks[False]["cost_usd"])) / 2 == Decimal("0.0108")
        refused = client.post("/v1/images/generations", json={**body, "batch": "yes"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "batch"
        client.close()


def test_a_batch_pipeline_uses_the_providers_batch_mode_and_is_billed_as_such(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    interactive = validate_request(
        request_fields(), rt.catalog, upload_dirs=rt.settings.upload_dirs, url_policy=rt.url_policy
    )
    submit_in_window(rt, interactive, None)
    drain(rt)
    alone = sim_stats(sim)
    assert alone["batch_jobs"] == 0 and alone["billed_batch_usd"] == 0
    submit_in_window(rt, batch_request(rt, request_fields(description="Stoneware bowl, blue glaze.")), None)
    drain(rt)
    stats = sim_stats(sim)
    assert stats["batch_jobs"] == 2  # the image and the video
    batch_media = Decimal(str(stats["billed_media_usd"])) - Decimal(str(alone["billed_media_usd"]))
    assert Decimal(str(stats["billed_batch_usd"])) == batch_media
    assert batch_media * 2 == Decimal(str(alone["billed_media_usd"]))  # the same image and video at half price


# --- genline batch -------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_stray_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("GENLINE_", "APIMART_")):
            monkeypatch.delenv(name)


@pytest.fixture
def user_env(sim: SimulatorHandle, tmp_path: Path) -> dict[str, str]:
    return {
        "GENLINE_VAR_DIR": str(tmp_path / "var"),
        "APIMART_BASE_URL": sim.base_url,
        "APIMART_API_KEY": TEST_KEY,
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",
        "GENLINE_POLL_INTERVAL_S": "0.01",
    }


@pytest.fixture
def genline(user_env: dict[str, str], tmp_path: Path) -> GenlineCli:
    g = GenlineCli(user_env, tmp_path / "var", TEST_KEY)
    result = g("db", "upgrade")
    assert result.exit_code == 0, result.output
    return g


@pytest.fixture
def worker_rt(user_env: dict[str, str]) -> Iterator[Runtime]:
    """The user's database run by a worker of this process (drain mode)."""
    runtime = Runtime.from_settings(load_settings(user_env))
    yield runtime
    runtime.close()


def write_lines(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def run_all(rt: Runtime, doc: dict[str, Any]) -> None:
    """A worker runs every submitted pipeline to its end (the CLI's nudges went to its broker)."""
    for entry in doc["submitted"]:
        step = first_step(rt, entry["pipeline_id"])
        if step.status == StepStatus.QUEUED:
            nudges(rt).send(step.id, "genline.batch")
    drain(rt)


def batch_doc(genline: GenlineCli, *args: str, code: int = 0) -> dict[str, Any]:
    result = genline("batch", *args, "--json")
    assert result.exit_code == code, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def rows(genline: GenlineCli, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{genline.db}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def test_batch_lines_go_to_the_batch_queue_with_their_window_and_keys_derived_when_missing(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    keyless = {k: v for k, v in request_fields().items() if k != "idempotency_key"}
    path = write_lines(tmp_path / "night.jsonl", [keyless, request_fields(), request_fields(priority="interactive")])
    doc = batch_doc(genline, str(path), "--window", "01:00-06:00")
    assert doc["window"] == "01:00-06:00" and (doc["new"], doc["existing"], doc["retried"]) == (3, 0, [])
    by_line = {e["line"]: e for e in doc["submitted"]}
    assert by_line[1]["idempotency_key"].startswith("line-")
    found = dict(
        (pid, (priority, window))
        for pid, priority, window in rows(genline, "SELECT id, priority, batch_window FROM pipelines")
    )
    assert [found[by_line[n]["pipeline_id"]] for n in (1, 2, 3)] == [
        ("batch", "01:00-06:00"),
        ("batch", "01:00-06:00"),
        ("interactive", None),  # a line that asks for interactive work is not held
    ]
    assert sorted(queues_of_messages(genline)) == ["genline.batch", "genline.batch", "genline.copy"]


def queues_of_messages(genline: GenlineCli) -> list[str]:
    """The queue of each message in the embedded broker (kombu's SQLAlchemy transport)."""
    with sqlite3.connect(f"file:{genline.broker}?mode=ro", uri=True) as conn:
        found = conn.execute("SELECT q.name FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id").fetchall()
    return [name for (name,) in found]


def test_a_bad_window_is_refused_before_anything_is_submitted(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    path = write_lines(tmp_path / "night.jsonl", [request_fields()])
    result = genline("batch", str(path), "--window", "25:00-06:00")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error [window_invalid] (window): ")
    assert count_rows(genline.db, "pipelines") == 0


def test_resubmitting_a_file_is_a_no_op_and_retry_failed_retries_only_the_failed_lines_under_new_keys(
    genline: GenlineCli, worker_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, tmp_path: Path
) -> None:
    path = write_lines(
        tmp_path / "night.jsonl",
        [
            request_fields(idempotency_key="mug"),
            request_fields(idempotency_key="rejected", description="A mug with forbidden-content printed on it."),
            request_fields(idempotency_key="bowl", description="Stoneware bowl, blue glaze."),
        ],
    )
    first = batch_doc(genline, str(path))
    run_all(worker_rt, first)
    outcome = {e["line"]: e for e in batch_doc(genline, str(path))["submitted"]}
    assert [(outcome[n]["status"], outcome[n]["outcome"]) for n in (1, 2, 3)] == [
        ("succeeded", "existing"),
        ("failed", "existing"),
        ("succeeded", "existing"),
    ]
    assert outcome[2]["error_code"] == "provider_rejected_request"
    assert [outcome[n]["pipeline_id"] for n in (1, 2, 3)] == [e["pipeline_id"] for e in first["submitted"]]
    assert count_rows(genline.db, "pipelines") == 3

    people = genline("batch", str(path))  # the summary for people: every line's pipeline, the failed one named
    assert people.exit_code == 0, people.output
    lines = people.stdout.splitlines()
    assert f"line 2: {outcome[2]['pipeline_id']} already submitted, failed [provider_rejected_request]" in lines
    assert "3 pipeline(s) accepted: 0 new, 3 already submitted with the same key; 0 bad line(s)." in people.stdout
    assert "run again with --retry-failed" in people.stdout

    retried = batch_doc(genline, str(path), "--retry-failed")
    assert (retried["new"], retried["existing"], retried["retried"]) == (0, 2, [2])
    entry = retried["submitted"][1]
    assert (entry["outcome"], entry["idempotency_key"], entry["retried_from"]) == (
        "retried",
        "rejected:retry-1",
        outcome[2]["pipeline_id"],
    )
    assert entry["pipeline_id"] != outcome[2]["pipeline_id"] and count_rows(genline.db, "pipelines") == 4

    run_all(worker_rt, retried)  # it fails again; the next retry takes the next key
    again = batch_doc(genline, str(path), "--retry-failed")
    assert again["retried"] == [2] and again["submitted"][1]["idempotency_key"] == "rejected:retry-2"
    assert again["submitted"][1]["retried_from"] == entry["pipeline_id"]

    quiet = batch_doc(genline, str(path))  # no flag: the line's latest pipeline answers, nothing new
    assert (quiet["new"], quiet["retried"], count_rows(genline.db, "pipelines")) == (0, [], 5)
    assert quiet["submitted"][1]["pipeline_id"] == again["submitted"][1]["pipeline_id"]
    assert quiet["submitted"][1]["idempotency_key"] == "rejected:retry-2"


def test_the_summary_gives_every_lines_pipeline_and_the_cost(
    genline: GenlineCli, worker_rt: Runtime, request_fields: RequestFn, tmp_path: Path
) -> None:
    path = write_lines(tmp_path / "night.jsonl", [request_fields(), "not json", request_fields()])
    doc = batch_doc(genline, str(path), code=2)
    assert [(e["line"], e["outcome"], e["status"]) for e in doc["submitted"]] == [
        (1, "new", "pending"),
        (3, "new", "pending"),
    ]
    assert all(e["pipeline_id"].startswith("pl") for e in doc["submitted"])
    assert [(e["line"], e["error"]["code"]) for e in doc["errors"]] == [(2, "invalid_json")]
    assert Decimal(doc["cost_usd"]) == 0 and Decimal(doc["estimated_cost_usd"]) > 0
    run_all(worker_rt, doc)
    after = batch_doc(genline, str(path), code=2)
    spent = sum(Decimal(e["cost_usd"]) for e in after["submitted"])
    assert Decimal(after["cost_usd"]) == spent > 0
    assert {e["status"] for e in after["submitted"]} == {"succeeded"}


def test_waiting_shows_how_many_pipelines_ended_and_the_running_cost(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, capsys: pytest.CaptureFixture[str]
) -> None:
    from genline.cli.batch import watch

    ids = [submit_in_window(rt, batch_request(rt, request_fields()), None).pipeline_id for _ in range(2)]

    def run_workers(_: float) -> None:  # a worker runs while the command waits
        drain(rt)

    states = watch(rt, ids, show=True, sleep=run_workers)
    said = [line for line in capsys.readouterr().out.splitlines() if "pipeline(s) ended" in line]  # not log lines
    assert said[0] == "  0/2 pipeline(s) ended; $0.0000 spent so far."
    spent = sum(s["cost_usd"] for s in states.values())
    assert said[-1] == f"  2/2 pipeline(s) ended; ${spent:.4f} spent so far." and spent > 0
    assert {s["status"] for s in states.values()} == {"succeeded"}
