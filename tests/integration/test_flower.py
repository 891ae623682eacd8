"""Flower as the operators' view, over HTTP: a real ``genline flower`` (basic auth) watching a real
worker and poller on the test session's own Redis, PostgreSQL and the simulator. One pipeline fails
for good (the provider answers 400 to its video submit), another succeeds. Flower must then show
each step's task under its kind's name, find a pipeline's tasks by its id, show the failed step's
task as FAILURE with its reason, and refuse requests without credentials. Also: ``genline flower``
refuses to listen beyond loopback without authentication, and a named nudge pushed straight onto
Redis is still the message Celery would have sent."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner

from genline.cli.main import cli
from genline.config.constants import PIPELINE_TERMINAL
from genline.config.settings import load_settings
from genline.pipelines.api import Genline
from genline.provider.simulator import SimConfig, start_simulator
from genline.provider.simulator.runner import SimulatorHandle
from genline.storage.migrate import upgrade
from genline.tasks.app import CeleryDispatcher, make_celery
from genline.workers.processes import Child, ProcessGroup
from tests.conftest import TEST_KEY
from tests.integration.test_broker import _pushed, _settings, _without_ids
from tests.support.drive import faults

AUTH = ("ops", "flower-test-password")
WAIT_S = 120.0  # an upper bound only: every wait below ends as soon as what it waits for is there


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _until(what: str, check: Any, group: ProcessGroup, interval: float = 0.3) -> Any:
    """Poll ``check()`` until it returns something truthy; fail (with why) if a child dies first."""
    deadline = time.monotonic() + WAIT_S
    while True:
        found = check()
        if found:
            return found
        group.check()
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(interval)


class FlowerClient:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=10.0)

    def tasks(self, **params: str) -> dict[str, dict[str, Any]]:
        answer = self.http.get("/api/tasks", params=params, auth=AUTH)
        answer.raise_for_status()
        tasks: dict[str, dict[str, Any]] = answer.json()
        return tasks

    def up(self) -> bool:
        try:
            return self.http.get("/healthcheck").status_code == 200
        except httpx.TransportError:
            return False


@pytest.fixture
def footprint(
    pg_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[dict[str, str], SimulatorHandle, ProcessGroup]]:
    sim_config = SimConfig(api_key=TEST_KEY, image_seconds=0.2, video_seconds=0.3, video_bytes=50_000)
    with start_simulator(sim_config) as sim:
        env = {
            "GENLINE_VAR_DIR": str(tmp_path / "var"),
            "GENLINE_DATABASE_URL": pg_url,
            "GENLINE_BROKER_URL": redis_url,
            "APIMART_BASE_URL": sim.base_url,
            "APIMART_API_KEY": TEST_KEY,
            "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator
            "GENLINE_POLL_INTERVAL_S": "0.2",
            "GENLINE_FLOWER_BASIC_AUTH": ":".join(AUTH),
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        upgrade(load_settings().database_url)
        with ProcessGroup(log_dir=tmp_path / "logs", env=env) as group:
            yield env, sim, group


def test_flower_shows_tasks_by_kind_finds_pipelines_and_fails_the_failed_step(
    footprint: tuple[dict[str, str], SimulatorHandle, ProcessGroup], product_png: Path
) -> None:
    env, sim, group = footprint
    settings = load_settings()
    port = _free_port()
    flower_child: Child = group.start("flower", "flower", "--port", str(port), "--address", "127.0.0.1")
    flower = FlowerClient(f"http://127.0.0.1:{port}")
    _until("Flower to answer", flower.up, group)
    group.start_worker("worker", concurrency=2)
    group.start_poller()

    # Flower switches task events on in every worker (every 5 s): a nudge for a step that does not
    # exist is harmless ("nothing to do"), and once Flower lists one, it sees the workers' tasks.
    dispatcher = CeleryDispatcher(make_celery(settings))
    canaries: list[str] = []

    def canary_seen() -> bool:
        canaries.append(f"st_canary{len(canaries)}")
        dispatcher.send(canaries[-1], "genline.copy", kind="copy", pipeline_id="pl_canary")
        return any(t["args"] == repr([c]) for t in flower.tasks().values() for c in canaries)

    _until("Flower to see a worker's task", canary_seen, group, interval=1.0)
    dispatcher.close()

    with Genline(settings) as api:

        def submit(n: int) -> str:
            return api.submit(
                {
                    "user_id": "seller-1",
                    "feature": "listing-video",
                    "profile": "standard",
                    "description": f"Product number {n}: a hand-thrown mug.",
                    "image": str(product_png),
                    "idempotency_key": f"flower-{n}",
                }
            ).pipeline_id

        def ended(pipeline_id: str) -> dict[str, Any] | None:
            status: dict[str, Any] = api.status(pipeline_id)
            return status if status["status"] in PIPELINE_TERMINAL else None

        faults(sim, {"method": "POST", "path": "/v1/videos/generations", "status": 400, "times": 1})
        failed_id = submit(1)
        failed = _until("the first pipeline to end", lambda: ended(failed_id), group)
        ok_id = submit(2)
        ok = _until("the second pipeline to end", lambda: ended(ok_id), group)
    assert failed["status"] == "failed" and ok["status"] == "succeeded", (failed, ok)

    # Without credentials: 401, on the UI and the API alike (only /healthcheck and /metrics answer).
    anonymous = httpx.Client(base_url=flower.base_url, timeout=10.0)
    for path in ("/", "/tasks", "/api/tasks", "/api/workers", f"/api/tasks?search={ok_id}"):
        assert anonymous.get(path).status_code == 401, path
    assert anonymous.get("/api/tasks", auth=(AUTH[0], "wrong")).status_code == 401
    # mher/flower#1129: these two skip Flower's auth; docs/OPERATORS.md says how to keep them private.
    assert anonymous.get("/healthcheck").status_code == 200
    assert anonymous.get("/metrics").status_code == 200
    anonymous.close()

    def kinds_found(pipeline_id: str, wanted: set[str]) -> dict[str, dict[str, Any]] | None:
        tasks = flower.tasks(search=pipeline_id)
        names = {t["name"] for t in tasks.values() if t["state"] in ("SUCCESS", "FAILURE")}
        return tasks if wanted <= names else None

    # The succeeded pipeline: its steps' tasks, found by its id, each under its kind's name.
    ok_tasks = _until(
        "Flower to find the succeeded pipeline's tasks",
        lambda: kinds_found(ok_id, {"genline.image", "genline.video", "genline.store"}),
        group,
    )
    assert all(t["state"] == "SUCCESS" for t in ok_tasks.values()), ok_tasks
    for task in ok_tasks.values():
        assert task["args"].startswith("['st_"), task  # ids only: a step id ...
        assert ok_id in f"{task['kwargs']} {task['result']}", task  # ... and the pipeline's
        assert "mug" not in str(task)  # never the user's text

    # The failed pipeline: the video step's task is FAILURE, with the code and the stored reason.
    failed_tasks = _until(
        "Flower to find the failed pipeline's tasks",
        lambda: kinds_found(failed_id, {"genline.image", "genline.video"}),
        group,
    )
    failures = [t for t in failed_tasks.values() if t["state"] == "FAILURE"]
    assert [t["name"] for t in failures] == ["genline.video"], failed_tasks
    reason = failed["error"]["message"].removeprefix("The video step failed: ")
    assert failed["error"]["code"] in failures[0]["exception"], failures[0]
    assert reason in failures[0]["exception"], (reason, failures[0])
    assert failed_id in failures[0]["exception"]
    assert not any(t["state"] == "FAILURE" for t in ok_tasks.values())
    by_state = flower.tasks(state="FAILURE")
    assert set(by_state) == {t["uuid"] for t in failures}  # Flower's own filter agrees

    assert flower_child.alive()
    print("FAILURE as Flower shows it:", failures[0]["exception"])  # noqa: T201  # for -s runs

    # The first step's task, nudged by the front door (pipelines/submit.py): found by the pipeline's
    # id (its result names it) and named for its kind once submit.py's nudge says the kind.
    first = [t for t in flower.tasks(search=ok_id).values() if t["name"] in ("genline.copy", "genline.run_step")]
    assert len(first) == 1 and "copy step" in first[0]["result"], first
    flower.http.close()
    assert first[0]["name"] == "genline.copy"


def test_flower_refuses_to_listen_beyond_loopback_without_authentication(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENLINE_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("GENLINE_BROKER_URL", redis_url)
    for name in ("GENLINE_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH", "FLOWER_AUTH"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, ["flower", "--address", "0.0.0.0", "--port", str(_free_port())])
    assert result.exit_code == 2, result.output
    assert "without authentication" in result.output and "GENLINE_FLOWER_BASIC_AUTH" in result.output

    monkeypatch.setenv("GENLINE_FLOWER_BASIC_AUTH", "ops-without-a-password")
    result = CliRunner().invoke(cli, ["flower", "--address", "0.0.0.0"])
    assert result.exit_code == 2, result.output
    assert "entry number 1 is not user:password" in result.output
    assert "ops-without-a-password" not in result.output  # a secret's text is never echoed


def test_a_named_nudge_is_the_message_celery_would_have_sent(tmp_path: Path, redis_url: str) -> None:
    app = make_celery(_settings(tmp_path, redis_url))  # type: ignore[arg-type]
    direct, celery_path = CeleryDispatcher(app), CeleryDispatcher(app)
    celery_path.direct = None
    client = redis.Redis.from_url(redis_url)
    try:
        for kind, queue in (("copy", "genline.copy"), ("video", "genline.media"), ("store", "genline.batch")):
            celery_path.send("st_0123", queue, kind=kind, pipeline_id="pl_0456")
            theirs = _pushed(client, queue)
            direct.send("st_0123", queue, kind=kind, pipeline_id="pl_0456")
            ours = _pushed(client, queue)
            assert _without_ids(ours) == _without_ids(theirs)
            assert ours["headers"]["task"] == f"genline.{kind}"
            assert ours["headers"]["kwargsrepr"] == "{'pipeline_id': 'pl_0456'}"
    finally:
        direct.close()
        celery_path.close()
        client.close()
