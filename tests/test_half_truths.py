"""The operators' issue, "wrong settings give tracebacks" and "quiet half-truths", item by item.

Wrong settings, each with the real part that is wrong: a PostgreSQL URL to a port nothing listens
on, a database name the real server does not have, a driver that does not exist, a Redis URL to
a free port, moto's S3 server without the bucket, the simulator with a wrong key. Every command
says ``error [code]: sentence`` (or one JSON document with ``--json``) and exits 2; the Python
API raises ``ConfigError`` with the same code (config/boundary.py).

Half-truths: ``provider status`` reads the pause where the workers keep it (the database on the
embedded default, Redis when it is the broker), says when it ends, and with Redis down says it
cannot know (exit 2) rather than "running"; ``provider resume`` says when nothing was paused and
the steps the pause held restart at once; ``cancel`` says when the provider did not stop a job;
resubmitting a failed pipeline's key says it failed and how to run it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from genline.config.boundary import wait_until_ready
from genline.config.errors import ConfigError
from genline.config.settings import load_settings
from genline.pipelines.api import Genline
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.provider.shared_state import DatabaseSharedState
from genline.provider.simulator import SimulatorHandle
from genline.provider.stages import PAUSE_KEY, read_pause
from genline.storage.db import Database
from genline.workers.sweeper import sweep
from tests.conftest import TEST_KEY, require_service
from tests.support.cli import ERROR_LINE, GenlineCli, count_rows, no_stray_settings, one_error_line, restore_logging  # noqa: F401  # autouse fixtures
from tests.support.drive import faults, next_nudge, nudges, sim_config, step_row
from tests.support.redis_server import OwnRedis
from tests.support.s3_server import DUMMY_AWS_ENV, free_port
from tests.test_cli_exits import runtime_of, submit_args, user_env

RequestFn = Callable[..., dict[str, Any]]

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"),
]

NOWHERE_PG = "postgresql+psycopg://genline@127.0.0.1:9/genline"  # nothing listens on port 9
SUBMIT = ["submit", "--user-id", "u", "--feature", "listing-video", "--description", "Mug"]
SUBMIT += ["--image", "https://x.example/m.png"]


@pytest.fixture
def genline(sim: SimulatorHandle, tmp_path: Path) -> GenlineCli:
    """A user's `genline` on the zero-setup default, with the schema created."""
    g = cli(sim, tmp_path)
    assert g("db", "upgrade").exit_code == 0
    return g


def commands(tmp_path: Path) -> dict[str, list[str]]:
    """Every command that works on genline's state, by name."""
    lines = tmp_path / "batch.jsonl"
    lines.write_text(json.dumps({"user_id": "u", "feature": "listing-video", "description": "Mug",
                                 "image": "https://x.example/m.png"}) + "\n")  # fmt: skip
    return {
        "submit": SUBMIT,
        "status": ["status", "pl_0123"],
        "cancel": ["cancel", "pl_0123"],
        "batch": ["batch", str(lines)],
        "db upgrade": ["db", "upgrade"],
        "provider status": ["provider", "status"],
        "provider resume": ["provider", "resume"],
        "worker": ["worker"],
        "poller": ["poller", "--once"],
    }


JSON_COMMANDS = ("submit", "status", "cancel", "batch", "provider status", "provider resume")


def refused(result: Result, code: str) -> str:
    """The command exited 2 with one ``error [code]: sentence`` line; returns the sentence."""
    assert result.exit_code == 2, result.output
    match = one_error_line(result)
    assert match["code"] == code, match.group(0)
    assert "Traceback" not in result.output
    return match["message"]


def refused_json(result: Result, code: str) -> str:
    assert result.exit_code == 2, result.output
    doc = json.loads(result.stdout)  # one JSON document, nothing else on stdout
    assert doc["error"]["code"] == code, doc
    return str(doc["error"]["message"])


def cli(sim: SimulatorHandle, tmp_path: Path, **env: str) -> GenlineCli:
    """A user's ``genline``; a worker or poller started by it does not wait for a part that does
    not answer (GENLINE_STARTUP_WAIT_S=0), as the waiting has tests of its own below."""
    var = tmp_path / "var"
    return GenlineCli(user_env(sim, var, **{"GENLINE_STARTUP_WAIT_S": "0", **env}), var, TEST_KEY)


# --- wrong settings: the database ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["submit", "status", "cancel", "batch", "db upgrade", "provider status", "provider resume", "worker",
             "poller"],
)  # fmt: skip
def test_an_unreachable_database_is_one_sentence_and_exit_2_from_every_command(
    sim: SimulatorHandle, tmp_path: Path, name: str
) -> None:
    g = cli(sim, tmp_path, GENLINE_DATABASE_URL=NOWHERE_PG)
    message = refused(g(*commands(tmp_path)[name]), "database_unreachable")
    assert "GENLINE_DATABASE_URL" in message and "127.0.0.1" in message and "port 9" in message
    if name in JSON_COMMANDS:
        assert "GENLINE_DATABASE_URL" in refused_json(g(*commands(tmp_path)[name], "--json"), "database_unreachable")


def test_a_database_url_with_a_password_shows_it_masked(sim: SimulatorHandle, tmp_path: Path) -> None:
    g = cli(sim, tmp_path, GENLINE_DATABASE_URL="postgresql+psycopg://genline:s3cret-pw@127.0.0.1:9/genline")
    result = g("status", "pl_0123")
    message = refused(result, "database_unreachable")
    assert "s3cret-pw" not in result.output and "genline:***@127.0.0.1:9" in message


def test_a_database_the_server_does_not_have_is_database_missing(sim: SimulatorHandle, tmp_path: Path) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"genline_absent_{uuid.uuid4().hex[:10]}"  # never created
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    g = cli(sim, tmp_path, GENLINE_DATABASE_URL=url)
    for command in (["status", "pl_0123"], ["db", "upgrade"], ["provider", "status"], SUBMIT):
        assert name in refused(g(*command), "database_missing")
    with pytest.raises(ConfigError) as caught:
        Genline(load_settings(g.env))
    assert caught.value.code == "database_missing" and name in caught.value.message


def test_a_driver_genline_cannot_load_is_database_url_invalid(sim: SimulatorHandle, tmp_path: Path) -> None:
    g = cli(sim, tmp_path, GENLINE_DATABASE_URL="postgresql+nodriver://genline@127.0.0.1:5432/genline")
    for command in (["status", "pl_0123"], ["db", "upgrade"], ["worker"]):
        assert "GENLINE_DATABASE_URL" in refused(g(*command), "database_url_invalid")


def test_the_python_api_raises_config_error_for_an_unreachable_database(sim: SimulatorHandle, tmp_path: Path) -> None:
    settings = load_settings(user_env(sim, tmp_path / "var", GENLINE_DATABASE_URL=NOWHERE_PG))
    with pytest.raises(ConfigError) as caught:
        Genline(settings)
    assert caught.value.code == "database_unreachable"
    assert type(caught.value.__cause__).__module__.startswith("sqlalchemy")  # raised from the driver's error


def test_the_python_api_translates_a_database_lost_after_start_up(rt: Runtime) -> None:
    """A Genline object whose database goes away later: its methods raise ConfigError, not the driver's error."""
    api = Genline(runtime=rt)
    rt.db.dispose()
    rt.db = Database(NOWHERE_PG)  # as if the server went away
    with pytest.raises(ConfigError) as caught:
        api.status("pl_0123")
    assert caught.value.code == "database_unreachable"


# --- wrong settings: the broker ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["submit", "status", "cancel", "batch", "provider status", "provider resume", "worker",
                                  "poller"])  # fmt: skip
def test_an_unreachable_redis_is_one_sentence_and_exit_2_from_every_command(
    genline: GenlineCli, tmp_path: Path, name: str
) -> None:
    env = {"GENLINE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    message = refused(genline(*commands(tmp_path)[name], env=env), "broker_unreachable")
    assert "GENLINE_BROKER_URL" in message
    if name in JSON_COMMANDS:
        refused_json(genline(*commands(tmp_path)[name], "--json", env=env), "broker_unreachable")
    assert count_rows(genline.db, "pipelines") == 0  # nothing was created


def test_a_poller_started_while_its_redis_is_down_waits_for_it_and_then_runs(
    genline: GenlineCli, tmp_path: Path
) -> None:
    """Started as the broker restarts (shipped GENLINE_STARTUP_WAIT_S, 30 s): it waits, then runs."""
    server = OwnRedis()
    server.port = free_port()  # nothing listens there yet
    later = threading.Timer(2.0, server.start)
    later.start()
    try:
        env = {"GENLINE_BROKER_URL": server.url, "GENLINE_STARTUP_WAIT_S": "30"}
        result = genline("poller", "--once", env=env)
        assert result.exit_code == 0, result.output
        assert "start_waiting_for" in result.output and "broker_unreachable" in result.output
    finally:
        later.join()
        server.close()


def test_a_part_still_silent_when_the_wait_ends_exits_2_and_a_wrong_setting_does_not_wait() -> None:
    tries: list[str] = []
    slept: list[float] = []

    def silent() -> None:
        tries.append("broker")
        raise ConfigError("The broker cannot be reached.", code="broker_unreachable")

    clock = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("genline.config.boundary.time.monotonic", lambda: clock[0])
        with pytest.raises(ConfigError) as caught:
            wait_until_ready(silent, 10.0, sleep=sleep)
    assert caught.value.code == "broker_unreachable"
    assert len(tries) > 3 and sum(slept) == pytest.approx(10.0) and max(slept) <= 5.0  # backs off, within the wait

    def wrong() -> None:
        tries.append("db")
        raise ConfigError("No database of that name.", code="database_missing")

    tries.clear()
    with pytest.raises(ConfigError):
        wait_until_ready(wrong, 30.0, sleep=sleep)
    assert tries == ["db"]  # a wrong setting is not waited on


def test_the_python_api_raises_config_error_for_an_unreachable_redis(genline: GenlineCli) -> None:
    settings = load_settings({**genline.env, "GENLINE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    with pytest.raises(ConfigError) as caught:
        Genline(settings)
    assert caught.value.code == "broker_unreachable"


# --- wrong settings: the bucket ------------------------------------------------------------------
@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    bucket = f"genline-absent-{uuid.uuid4().hex[:10]}"
    return {"GENLINE_STORAGE_URL": f"s3://{bucket}/videos", "GENLINE_S3_ENDPOINT_URL": moto_endpoint}


@pytest.mark.parametrize("name", ["submit", "status", "cancel", "batch", "worker", "poller"])
def test_a_missing_bucket_is_exit_2_not_3_from_every_command(
    genline: GenlineCli, aws_env: dict[str, str], tmp_path: Path, name: str
) -> None:
    message = refused(genline(*commands(tmp_path)[name], env=aws_env), "bucket_missing")
    assert "GENLINE_STORAGE_URL" in message and aws_env["GENLINE_STORAGE_URL"].split("/")[2] in message
    if name in JSON_COMMANDS:
        refused_json(genline(*commands(tmp_path)[name], "--json", env=aws_env), "bucket_missing")
    assert count_rows(genline.db, "pipelines") == 0


def test_the_python_api_raises_config_error_for_a_missing_bucket_at_start_and_at_run_time(
    genline: GenlineCli, aws_env: dict[str, str], product_png: Path, request_fields: RequestFn
) -> None:
    settings = load_settings({**genline.env, **aws_env})
    with pytest.raises(ConfigError) as caught:
        Genline(settings)
    assert caught.value.code == "bucket_missing"

    rt = Runtime.from_settings(settings)  # a bucket deleted after start-up: met by the first write
    try:
        with pytest.raises(ConfigError) as later:
            Genline(runtime=rt).submit(request_fields(image=product_png.read_bytes()))
        assert later.value.code == "bucket_missing" and "GENLINE_STORAGE_URL" in later.value.message
    finally:
        rt.close()


# --- wrong settings: the provider key ------------------------------------------------------------
@pytest.mark.parametrize("command", [["worker"], ["poller", "--once"]], ids=lambda c: c[0])
def test_a_wrong_key_stops_a_worker_or_poller_at_start_with_exit_2(
    genline: GenlineCli, sim: SimulatorHandle, command: list[str]
) -> None:
    result = genline(*command, env={"APIMART_API_KEY": "not-the-key"})
    assert "APIMART_API_KEY" in refused(result, "provider_key_invalid")
    assert "not-the-key" not in result.output


def _pipeline_with_a_running_image_job(g: GenlineCli, sim: SimulatorHandle, fields: dict[str, Any]) -> str:
    sim_config(sim, image_seconds=600)
    pid = str(json.loads(g(*submit_args(fields), "--json").stdout)["pipeline_id"])
    with runtime_of(g) as rt:
        run_step(rt, step_row(rt, pid, "copy").id)
        run_step(rt, step_row(rt, pid, "image").id)
    return pid


def test_cancel_with_a_wrong_key_says_the_job_was_not_stopped_and_exits_2(
    genline: GenlineCli, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    pid = _pipeline_with_a_running_image_job(genline, sim, request_fields())

    result = genline("cancel", pid, env={"APIMART_API_KEY": "not-the-key"})

    assert result.exit_code == 2, result.output
    assert result.stdout.strip() == (
        f"Cancelled pipeline {pid}: 0 provider job(s) stopped, 1 left to finish (their cost is recorded)."
    )
    last = ERROR_LINE.match(result.stderr.splitlines()[-1])  # after the alert's log line: the key paused paid work
    assert last is not None and last["code"] == "provider_key_invalid"
    assert last["message"].startswith(f"The provider did not stop 1 job(s) of pipeline {pid}: the provider refused")


def test_cancel_whose_provider_call_fails_is_not_reported_as_a_success(
    genline: GenlineCli, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    pid = _pipeline_with_a_running_image_job(genline, sim, request_fields())
    faults(sim, {"method": "POST", "path": "/v1/tasks/*/cancel", "status": 500, "times": 100})

    result = genline("cancel", pid, "--json")

    assert result.exit_code == 3, result.output  # the provider's failure: anything else
    doc = json.loads(result.stdout)
    assert (doc["status"], doc["provider_jobs_cancelled"], doc["provider_jobs_left_running"]) == ("cancelled", 0, 1)
    assert [e["code"] for e in doc["provider_cancel_errors"]] == ["provider_unavailable"]
    assert doc["error"]["code"] == "provider_unavailable" and "did not stop 1 job(s)" in doc["error"]["message"]


def test_the_python_api_cancel_names_a_refused_key_in_its_result(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    sim_config(sim, image_seconds=600)
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    run_step(rt, next_nudge(rt))  # the copy
    run_step(rt, next_nudge(rt))  # the image job, submitted
    faults(sim, {"method": "POST", "path": "/v1/tasks/*/cancel", "status": 401, "times": 1})

    result = api.cancel(pid)

    assert (result["provider_jobs_cancelled"], result["provider_jobs_left_running"]) == (0, 1)
    assert [e["code"] for e in result["provider_cancel_errors"]] == ["provider_key_invalid"]


# --- half-truths: provider status and resume -----------------------------------------------------
PAUSE_BY_A_401 = """
import sys
from genline.config.errors import AuthenticationFailed
from genline.config.settings import load_settings
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext

rt = Runtime.from_settings(load_settings())
try:
    rt.gateway.chat(CallContext(model="gpt-4o-mini"), [{"role": "user", "content": "Mug"}], max_tokens=20)
except AuthenticationFailed:
    sys.exit(0)
finally:
    rt.close()
sys.exit(1)
"""


def pause_in_another_process(g: GenlineCli, **env: str) -> tuple[float, float]:
    """Another OS process (a worker's runtime) meets a 401: paid work pauses. Returns the wall
    clock before and after it, which bound when the pause began."""
    before = time.time()
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("GENLINE_", "APIMART_"))}
    run_env.update({**g.env, **env, "APIMART_API_KEY": "not-the-key", "GENLINE_PAUSE_S": "300"})
    done = subprocess.run([sys.executable, "-c", PAUSE_BY_A_401], env=run_env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return before, time.time()


def _until(status: dict[str, Any]) -> float:
    return datetime.fromisoformat(status["paused_until"]).timestamp()


def test_on_the_embedded_default_a_pause_set_by_another_process_is_seen_with_its_end(
    genline: GenlineCli,
) -> None:
    before, after = pause_in_another_process(genline)

    shown = genline("provider", "status")
    assert shown.exit_code == 0, shown.output
    first = shown.stdout.splitlines()[0]
    assert first.startswith("paid work: paused (provider_auth_failed) until ") and " UTC (in " in first
    assert first.endswith("or sooner with `genline provider resume`")
    assert "alerts provider_paused: 1" in shown.stdout.splitlines()
    doc = json.loads(genline("provider", "status", "--json").stdout)
    assert doc["paused"] == "provider_auth_failed"
    assert before + 300 - 1 <= _until(doc) <= after + 300 + 1  # GENLINE_PAUSE_S after the 401
    # It is the database's: what every process on this database reads.
    state = DatabaseSharedState(Database(load_settings(genline.env).database_url))
    try:
        assert read_pause(state) is not None
    finally:
        state.close()


def test_with_redis_as_broker_a_pause_set_by_another_process_is_seen_with_its_end(
    genline: GenlineCli, redis_url: str
) -> None:
    env = {"GENLINE_BROKER_URL": redis_url}
    before, after = pause_in_another_process(genline, **env)

    doc = json.loads(genline("provider", "status", "--json", env=env).stdout)
    assert doc["paused"] == "provider_auth_failed" and doc["alerts"]["provider_paused"] == 1
    assert before + 300 - 1 <= _until(doc) <= after + 300 + 1
    on_the_database = json.loads(genline("provider", "status", "--json").stdout)  # not where this pause lives
    assert on_the_database["paused"] is None


def test_with_redis_down_provider_status_says_it_cannot_know_never_running(genline: GenlineCli, own_redis: Any) -> None:
    env = {"GENLINE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = genline("provider", "status", env=env)
    message = refused(result, "broker_unreachable")
    assert message.startswith("Cannot tell whether paid work is paused: the broker at redis://127.0.0.1:")
    assert "running" not in result.stdout
    as_json = genline("provider", "status", "--json", env=env)
    assert refused_json(as_json, "broker_unreachable").startswith("Cannot tell whether paid work is paused")


def test_resume_says_when_nothing_was_paused(genline: GenlineCli) -> None:
    result = genline("provider", "resume")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "paid work was not paused; nothing to resume"
    as_json = json.loads(genline("provider", "resume", "--json").stdout)
    assert as_json == {"was_paused": False, "reason": None, "steps_released": 0}


def test_resume_lifts_a_pause_set_elsewhere_and_the_held_step_restarts_at_the_next_sweep(
    genline: GenlineCli, rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    """``rt`` and the user's commands share the embedded default's database (one var folder)."""
    api = Genline(runtime=rt)
    first = api.submit(request_fields()).pipeline_id
    faults(sim, {"method": "POST", "path": "/v1/chat/completions", "status": 401, "times": 1})
    run_step(rt, next_nudge(rt))  # the first copy meets the 401: paid work pauses
    assert api.status(first)["status"] == "failed"
    held = api.submit(request_fields()).pipeline_id
    run_step(rt, next_nudge(rt))  # the second copy is refused before it is sent: held
    step = step_row(rt, held, "copy")
    assert (step.status, step.error_code) == ("queued", "provider_paused")
    assert step.not_before is not None and step.not_before > datetime.now(UTC) + timedelta(seconds=30)
    assert sweep(rt) == 0 and nudges(rt).pop() is None  # it waits GENLINE_SWEEP_AFTER_S (a minute)

    resumed = genline("provider", "resume")

    assert resumed.exit_code == 0, resumed.output
    said = resumed.stdout.strip()
    assert said == "paid work resumed (it was paused: provider_auth_failed); 1 held step(s) restart now"
    assert read_pause(rt.shared) is None and rt.shared.get(PAUSE_KEY) is None
    assert sweep(rt) == 1  # the poller's sweeper, every couple of seconds: sent at once, not a minute later
    assert next_nudge(rt) == step.id
    run_step(rt, step.id)
    assert step_row(rt, held, "copy").status == "succeeded"


def test_a_step_held_by_a_pause_is_due_again_when_the_pause_ends_by_itself_not_a_sweep_later(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    rt.settings = rt.settings.with_overrides(pause_s=5.0)
    rt.__dict__.pop("gateway", None)
    api = Genline(runtime=rt)
    api.submit(request_fields())
    faults(sim, {"method": "POST", "path": "/v1/chat/completions", "status": 401, "times": 1})
    run_step(rt, next_nudge(rt))  # the 401 pauses paid work for GENLINE_PAUSE_S (5 s here)
    pause = read_pause(rt.shared)
    assert pause is not None and pause.until is not None
    held = api.submit(request_fields(description="A walnut cutting board, oiled, 40 cm.")).pipeline_id
    run_step(rt, next_nudge(rt))
    step = step_row(rt, held, "copy")
    assert (step.status, step.error_code) == ("queued", "provider_paused")
    assert step.not_before is not None and step.not_before <= pause.until  # not GENLINE_SWEEP_AFTER_S (60 s)


# --- half-truths: resubmitting a failed pipeline's key --------------------------------------------
def test_resubmitting_a_failed_pipelines_key_says_it_failed_and_how_to_run_it_again(
    genline: GenlineCli, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    fields = request_fields()
    pid = json.loads(genline(*submit_args(fields), "--json").stdout)["pipeline_id"]
    faults(sim, {"method": "POST", "path": "/v1/images/generations", "status": 400, "times": 10})
    with runtime_of(genline) as rt:
        run_step(rt, step_row(rt, pid, "copy").id)
        run_step(rt, step_row(rt, pid, "image").id)

    again = genline(*submit_args(fields))
    assert again.exit_code == 0, again.output
    assert not again.stdout.startswith("Accepted")
    assert again.stdout.strip() == (
        f"Pipeline {pid} was already submitted with this idempotency key and it failed; nothing new was "
        "started. To run it again, submit with a new --idempotency-key."
    )
    doc = json.loads(genline(*submit_args(fields), "--json").stdout)
    assert (doc["pipeline_id"], doc["created"], doc["status"]) == (pid, False, "failed")
    assert "new --idempotency-key" in doc["note"]

    running = request_fields()
    json.loads(genline(*submit_args(running), "--json").stdout)
    doc = json.loads(genline(*submit_args(running), "--json").stdout)
    assert doc["created"] is False and doc["note"] == "already submitted with this key; it is pending"
