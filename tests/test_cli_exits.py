"""The `genline` command's promises that test_cli.py does not reach: exit 1 when a pipeline you
waited for failed, exit 3 for anything else, a schema newer than the code refused (exit 2), and
what `cancel`, `provider status` and `provider resume` show the user.

Commands run in-process through click's CliRunner with the environment a user would set; the
pipeline `submit --wait` waits for is run by a real `genline worker` process on the embedded
broker. Provider faults are the simulator's, scripted over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from genline.config.errors import AuthenticationFailed
from genline.config.settings import load_settings
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext
from genline.provider.simulator import SimulatorHandle
from genline.storage.models import ProviderJob, Step
from genline.workers.processes import ProcessGroup
from tests.conftest import TEST_KEY
from tests.support.cli import GenlineCli, count_rows, no_stray_settings, one_error_line, restore_logging  # noqa: F401  # autouse fixtures
from tests.support.drive import faults

RequestFn = Callable[..., dict[str, Any]]

pytestmark = [
    pytest.mark.timeout(180),
    # kombu's SQLAlchemy transport (the embedded broker) uses the `noload` strategy SQLAlchemy 2.1
    # deprecates; under filterwarnings=error the nudge would be lost (see tests/test_cli.py).
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"),
]
NEWER_REVISION = "f0e1d2c3b4a5"  # a revision a newer genline's migration made; this code has none such


def user_env(sim: SimulatorHandle, var: Path, **extra: str) -> dict[str, str]:
    return {
        "GENLINE_VAR_DIR": str(var),
        "APIMART_BASE_URL": sim.base_url,
        "APIMART_API_KEY": TEST_KEY,
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator
        **extra,
    }


@pytest.fixture
def genline(sim: SimulatorHandle, tmp_path: Path) -> GenlineCli:
    """A user's `genline` on the zero-setup default, with the schema created."""
    var = tmp_path / "var"
    g = GenlineCli(user_env(sim, var), var, TEST_KEY)
    result = g("db", "upgrade")
    assert result.exit_code == 0, result.output
    return g


def submit_args(fields: dict[str, Any]) -> list[str]:
    args = ["submit"]
    for name, value in fields.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


@contextlib.contextmanager
def runtime_of(g: GenlineCli) -> Iterator[Runtime]:
    """The same database, store and provider as the user's commands, in this process (drain mode)."""
    rt = Runtime.from_settings(load_settings(g.env))
    try:
        yield rt
    finally:
        rt.close()


# --- exit 1: a pipeline you waited for failed ----------------------------------------------------
@pytest.fixture
def worker(genline: GenlineCli) -> Iterator[ProcessGroup]:
    """A real `genline worker` process on the user's embedded broker."""
    group = ProcessGroup(log_dir=genline.var / "logs", env=genline.env)
    group.start_worker("worker", concurrency=1)
    try:
        yield group
    finally:
        group.stop()


def test_submit_wait_exits_1_and_says_why_when_the_pipeline_fails(
    genline: GenlineCli, worker: ProcessGroup, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    # The provider refuses every image (400: never retried, no other model tried): the image step fails.
    faults(sim, {"method": "POST", "path": "/v1/images/generations", "status": 400, "times": 10})

    shown = genline(*submit_args(request_fields()), "--wait")
    worker.check()
    assert shown.exit_code == 1, shown.output
    lines = shown.stdout.splitlines()
    assert any(line.startswith("pipeline pl_") and ": failed" in line for line in lines)
    assert lines[-1].startswith("  reason [provider_rejected_request]: The image step failed:")
    assert shown.stderr == ""  # a failed pipeline is an outcome, not an error of the command

    as_json = genline(*submit_args(request_fields()), "--wait", "--json")
    assert as_json.exit_code == 1, as_json.output
    doc = json.loads(as_json.stdout)  # stdout is one JSON document, the pipeline's final status
    assert doc["status"] == "failed" and doc["created"] is True
    assert doc["error"]["code"] and doc["error"]["message"]
    assert [s["status"] for s in doc["steps"]][:2] == ["succeeded", "failed"]


# --- exit 3: anything else ------------------------------------------------------------------------
def test_a_store_that_refuses_the_upload_exits_3_with_one_error_line_and_creates_nothing(
    sim: SimulatorHandle, tmp_path: Path, request_fields: RequestFn
) -> None:
    blocked = tmp_path / "objects"
    blocked.write_text("a file where the objects folder should be")  # every write under it fails
    var = tmp_path / "var"
    g = GenlineCli(user_env(sim, var, GENLINE_STORAGE_URL=blocked.as_uri()), var, TEST_KEY)
    assert g("db", "upgrade").exit_code == 0

    result = g(*submit_args(request_fields()))  # a local photo: it is kept in the store first

    assert result.exit_code == 3, result.output
    match = one_error_line(result)
    assert match["code"] == "storage_rejected"
    assert result.stdout == ""
    assert count_rows(g.db, "pipelines") == 0 and count_rows(g.broker, "kombu_message") == 0

    as_json = g(*submit_args(request_fields()), "--json")
    assert as_json.exit_code == 3, as_json.output
    assert json.loads(as_json.stdout)["error"]["code"] == "storage_rejected"


def test_an_unreachable_database_is_one_error_line_not_a_traceback_with_exit_1(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    var = tmp_path / "var"
    g = GenlineCli(
        user_env(sim, var, GENLINE_DATABASE_URL="postgresql+psycopg://genline@127.0.0.1:9/genline"), var, TEST_KEY
    )
    result = g("status", "pl_0123")
    assert result.exit_code == 2, result.output  # the operator's setting: exit 2 (tests/test_half_truths.py)
    assert one_error_line(result)["code"] == "database_unreachable"


def test_an_unexpected_exception_is_its_traceback_then_one_error_line_with_exit_3(
    genline: GenlineCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not exit 1 (a waited-for pipeline failed) for a bug: exit 3, the last line says what happened."""
    from genline.pipelines import api

    def broken(self: object, pipeline_id: str) -> dict[str, Any]:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(api.Genline, "status", broken)
    result = genline("status", "pl_0123")
    assert result.exit_code == 3, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Traceback") and "ZeroDivisionError" in result.stderr
    assert lines[-1].startswith("error [unexpected_error]: genline stopped on an unexpected ZeroDivisionError")
    as_json = genline("status", "pl_0123", "--json")
    assert as_json.exit_code == 3
    assert json.loads(as_json.stdout)["error"]["code"] == "unexpected_error"


# --- exit 2: a schema newer than the code ----------------------------------------------------------
def stamp(db: Path, revision: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def head_revision(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("SELECT version_num FROM alembic_version").fetchone()[0])


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "--user-id", "u", "--feature", "f", "--description", "Mug", "--image", "https://x.example/m.png"],
        ["status", "pl_0123"],
        ["cancel", "pl_0123"],
        pytest.param(["worker"], marks=pytest.mark.timeout(30)),  # accepted, it would serve until stopped
        ["poller", "--once"],
    ],
    ids=lambda c: c[0],
)
def test_a_database_migrated_by_a_newer_genline_is_refused_with_exit_2_and_nothing_is_done(
    genline: GenlineCli, command: list[str]
) -> None:
    ours = head_revision(genline.db)
    stamp(genline.db, NEWER_REVISION)

    result = genline(*command)

    assert result.exit_code == 2, result.output
    match = one_error_line(result)
    assert match["code"] == "invalid_config"
    assert NEWER_REVISION in match["message"] and ours in match["message"]
    assert head_revision(genline.db) == NEWER_REVISION  # not "upgraded" backwards
    assert count_rows(genline.db, "pipelines") == 0 and count_rows(genline.broker, "kombu_message") == 0


# --- cancel ---------------------------------------------------------------------------------------
def _steps(rt: Runtime, pipeline_id: str) -> dict[str, str]:
    with rt.db.transaction() as s:
        return {st.kind: st.id for st in s.scalars(select(Step).where(Step.pipeline_id == pipeline_id))}


def test_cancel_stops_the_running_provider_job_and_tells_the_user(
    genline: GenlineCli, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    httpx.post(f"{sim.base_url}/_sim/config", json={"image_seconds": 600}).raise_for_status()
    pid = json.loads(genline(*submit_args(request_fields()), "--json").stdout)["pipeline_id"]
    with runtime_of(genline) as rt:  # a worker runs the copy, then submits the image job
        steps = _steps(rt, pid)
        run_step(rt, steps["copy"])
        run_step(rt, steps["image"])
        with rt.db.transaction() as s:
            task_id = s.scalars(select(ProviderJob.task_id).where(ProviderJob.step_id == steps["image"])).one()
    assert task_id

    result = genline("cancel", pid)

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"Cancelled pipeline {pid}: 1 provider job(s) stopped, 0 left to finish (their cost is recorded)."
    )
    assert httpx.get(f"{sim.base_url}/_sim/tasks/{task_id}").json()["status"] == "cancelled"
    status = json.loads(genline("status", pid, "--json").stdout)
    assert status["status"] == "cancelled"
    assert {s["kind"]: s["status"] for s in status["steps"]} == {
        "copy": "succeeded", "image": "cancelled", "video": "cancelled", "store": "cancelled"
    }  # fmt: skip
    again = genline("cancel", pid)
    assert again.exit_code == 2
    match = one_error_line(again)
    assert (match["code"], match["field"]) == ("pipeline_finished", "id")


def test_cancel_with_json_prints_one_document_and_an_unknown_id_is_exit_2(
    genline: GenlineCli, request_fields: RequestFn
) -> None:
    pid = json.loads(genline(*submit_args(request_fields()), "--json").stdout)["pipeline_id"]

    result = genline("cancel", pid, "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "pipeline_id": pid,
        "status": "cancelled",
        "provider_jobs_cancelled": 0,
        "provider_jobs_left_running": 0,
    }
    unknown = genline("cancel", "pl_doesnotexist", "--json")
    assert unknown.exit_code == 2
    assert json.loads(unknown.stdout)["error"]["code"] == "pipeline_not_found"


# --- provider status / resume ---------------------------------------------------------------------
def test_provider_status_shows_a_pause_after_a_401_and_resume_lifts_it(
    genline: GenlineCli, sim: SimulatorHandle, redis_url: str
) -> None:
    env = {"GENLINE_BROKER_URL": redis_url}  # pauses are shared through Redis
    before = genline("provider", "status", env=env)
    assert before.exit_code == 0, before.output
    assert before.stdout.splitlines() == ["paid work: running", "alerts provider_paused: 0", "alerts copy_at_risk: 0"]

    # A worker's paid call meets a 401: paid work pauses for every worker, and an alert is raised.
    faults(sim, {"method": "POST", "path": "/v1/chat/completions", "status": 401, "times": 1})
    rt = Runtime.from_settings(load_settings({**genline.env, **env}))
    try:
        with pytest.raises(AuthenticationFailed):
            rt.gateway.chat(CallContext(model="gpt-4o-mini"), [{"role": "user", "content": "Mug"}], max_tokens=20)

        shown = genline("provider", "status", env=env)
        assert shown.exit_code == 0, shown.output
        lines = shown.stdout.splitlines()
        assert lines[0].startswith("paid work: paused (provider_auth_failed) until ")  # its end: test_half_truths
        assert lines[1:] == ["alerts provider_paused: 1", "alerts copy_at_risk: 0"]
        as_json = json.loads(genline("provider", "status", "--json", env=env).stdout)
        assert as_json.pop("paused_until")
        assert as_json == {"paused": "provider_auth_failed", "alerts": {"provider_paused": 1, "copy_at_risk": 0}}

        resumed = genline("provider", "resume", env=env)
        assert resumed.exit_code == 0
        assert resumed.stdout.strip() == "paid work resumed (it was paused: provider_auth_failed)"

        after = genline("provider", "status", env=env)
        assert after.stdout.splitlines()[0] == "paid work: running"
        assert "alerts provider_paused: 1" in after.stdout.splitlines()  # the alert stays counted
        assert rt.gateway.chat(CallContext(model="gpt-4o-mini"), [{"role": "user", "content": "Mug"}], max_tokens=20)
    finally:
        rt.close()


def test_provider_commands_with_bad_settings_exit_2_naming_the_variable(genline: GenlineCli) -> None:
    result = genline("provider", "status", env={"GENLINE_BROKR_URL": "redis://x"})
    assert result.exit_code == 2, result.output
    match = one_error_line(result)
    assert match["code"] == "invalid_config" and "GENLINE_BROKR_URL" in match["message"]
