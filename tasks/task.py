"""The Celery tasks: ``genline.copy``, ``.image``, ``.video`` and ``.store`` (and ``genline.run_step``
for older messages), one body: ``run_step(step_id, pipeline_id=...)``. It carries ids, re-reads the
rows, and is harmless to run twice. The queue, not the task name, splits the work; the name is for
the people reading Flower.

What a task's state means in Flower: SUCCESS, the step reached a resting point (succeeded, its
provider job is in flight, it was queued again for a retry, or there was nothing to do); the result
says which, in ids. FAILURE, the step failed for good and its pipeline with it; the exception
says the error code and the stored (scrubbed) reason. A retry is not a failure yet: the sweeper
sends the step again when its backoff is over, as a new task. A pipeline that fails outside a
task (a provider job that failed, seen by the poller; a step the sweeper gives up on) has no
task to fail: ``genline status`` says why."""

from __future__ import annotations

import contextlib
import os

from celery import Celery
from celery.signals import worker_process_init

from genline.config.errors import GenlineError
from genline.config.logging import get_logger
from genline.config.settings import Settings
from genline.pipelines.engine import StepOutcome
from genline.pipelines.engine import run_step as engine_run_step
from genline.pipelines.runtime import Runtime
from genline.tasks.app import CeleryDispatcher, make_celery
from genline.tasks.messages import STEP_TASKS

log = get_logger("genline.worker")
_runtime: Runtime | None = None
_runtime_pid: int | None = None


class StepFailed(GenlineError):
    """Raised by a task whose step failed for good: the task ends in Celery's FAILURE state (the
    message is acknowledged, not retried: the failure is in the database already)."""

    code = "step_failed"


def task_result(step_id: str, outcome: StepOutcome | None) -> str:
    """What a task ran and where it left it, in ids only (Flower shows and searches it); raises
    ``StepFailed`` for a step that failed for good."""
    if outcome is None:
        return f"{step_id}: nothing to do (done already, running elsewhere or not due)"
    ran = f"pipeline {outcome.pipeline_id}, {outcome.kind} step {outcome.step_id}"
    if outcome.state == "failed":
        raise StepFailed(f"{outcome.code}: {outcome.message} ({ran})", code=outcome.code)
    if outcome.state == "retry":
        return f"{ran}: queued again after {outcome.code}, sent when its backoff is over"
    return f"{ran}: {outcome.state}"


def bind(app: Celery, settings: Settings) -> Celery:
    """Register genline's task on ``app``; each worker process builds its own runtime on first use
    (never before the fork: database connections must not cross processes)."""

    def runtime() -> Runtime:
        global _runtime, _runtime_pid
        if _runtime is None or _runtime_pid != os.getpid():
            _runtime = Runtime.from_settings(settings, CeleryDispatcher(app))
            _runtime_pid = os.getpid()
        return _runtime

    def run_step(step_id: str, pipeline_id: str | None = None) -> str:
        """``pipeline_id`` is for Flower only: the step's rows say which pipeline it is in."""
        return task_result(step_id, engine_run_step(runtime(), step_id))

    for name in STEP_TASKS:
        # throws: a failed step is expected work, logged by Celery as one line, not a traceback.
        app.task(
            name=name,
            acks_late=True,
            reject_on_worker_lost=True,
            ignore_result=True,
            throws=(StepFailed,),
        )(run_step)

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]  # Celery ships no types
    def _fresh(**_: object) -> None:
        """A new worker process builds its runtime now, before it takes a task: built on first use,
        it made that process's first step ~0.25 s slower (mostly the S3 client) and its first
        copy slower again (clients, TLS contexts, the S3 signer). A failure here is only logged:
        the first task builds the runtime again and reports what is wrong."""
        global _runtime
        _runtime = None
        try:
            runtime().warm()
        except Exception as exc:  # noqa: BLE001  # Celery would respawn a process that fails to start, forever
            log.warning("worker_warm_up_failed", error=type(exc).__name__)
            if _runtime is not None:
                with contextlib.suppress(Exception):
                    _runtime.close()
            _runtime = None

    return app


def celery_app(settings: Settings) -> Celery:
    return bind(make_celery(settings), settings)
