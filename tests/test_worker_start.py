"""A new worker process gets ready before it takes a task (Celery's ``worker_process_init``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from celery.signals import worker_process_init

import genline.tasks.task
from genline.config.settings import Settings
from genline.pipelines.runtime import Runtime
from genline.tasks.app import make_celery
from genline.tasks.task import bind
from tests.support.s3_server import DUMMY_AWS_ENV

CLOSED = "http://127.0.0.1:9"  # nothing listens here: a warm-up that went over the network would fail


@pytest.fixture
def fork_hook() -> Iterator[Callable[[], None]]:
    """Run only the receivers ``bind`` connects during the test, as a forked pool process would;
    then disconnect them and close the runtime they built."""
    before = list(worker_process_init.receivers)

    def fire() -> None:
        ours = [r for r in worker_process_init.receivers if r not in before]
        assert ours, "bind() connected nothing to worker_process_init"
        kept, worker_process_init.receivers = worker_process_init.receivers, ours
        worker_process_init.sender_receivers_cache.clear()
        try:
            worker_process_init.send(sender=None)
        finally:
            worker_process_init.receivers = kept
            worker_process_init.sender_receivers_cache.clear()

    yield fire
    worker_process_init.receivers = before
    worker_process_init.sender_receivers_cache.clear()
    if genline.tasks.task._runtime is not None:
        genline.tasks.task._runtime.close()
    genline.tasks.task._runtime = genline.tasks.task._runtime_pid = None


def test_a_new_worker_process_builds_and_warms_its_runtime_before_its_first_task(
    make_settings: Callable[..., Settings], fork_hook: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in DUMMY_AWS_ENV.items():  # so the S3 client has a signer to build
        monkeypatch.setenv(name, value)
    settings = make_settings(CLOSED, GENLINE_STORAGE_URL="s3://genline-test/out", GENLINE_S3_ENDPOINT_URL=CLOSED)
    bind(make_celery(settings), settings)
    fork_hook()
    rt = genline.tasks.task._runtime
    assert isinstance(rt, Runtime) and genline.tasks.task._runtime_pid == os.getpid()
    assert {"gateway", "downloads", "shared"} <= set(rt.__dict__)  # built now, not at the first step
    assert rt.settings is settings


def test_a_worker_process_whose_warm_up_fails_starts_anyway_and_builds_it_at_its_first_task(
    make_settings: Callable[..., Settings], fork_hook: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(CLOSED)
    bind(make_celery(settings), settings)

    def broken(_: Runtime) -> None:
        raise OSError("no such device")

    closed: list[Runtime] = []
    real_close = Runtime.close

    def close(rt: Runtime) -> None:
        closed.append(rt)
        real_close(rt)

    monkeypatch.setattr(Runtime, "warm", broken)
    monkeypatch.setattr(Runtime, "close", close)
    fork_hook()  # does not raise: Celery would otherwise replace the process, again and again
    assert genline.tasks.task._runtime is None
    assert len(closed) == 1  # the half-warmed runtime was closed, not left holding connections
