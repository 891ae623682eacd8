"""The Celery task: ``run_step(step_id)``. It carries an id, re-reads the rows, and is harmless
to run twice. One task for every kind of step; the queue, not the task name, splits the work."""

from __future__ import annotations

import contextlib
import os

from celery import Celery
from celery.signals import worker_process_init

from genline.config.constants import RUN_STEP_TASK
from genline.config.logging import get_logger
from genline.config.settings import Settings
from genline.pipelines.engine import run_step as engine_run_step
from genline.pipelines.runtime import Runtime
from genline.tasks.app import CeleryDispatcher, make_celery

log = get_logger("genline.worker")
_runtime: Runtime | None = None
_runtime_pid: int | None = None


def bind(app: Celery, settings: Settings) -> Celery:
    """Register genline's task on ``app``; each worker process builds its own runtime on first use
    (never before the fork: database connections must not cross processes)."""

    def runtime() -> Runtime:
        global _runtime, _runtime_pid
        if _runtime is None or _runtime_pid != os.getpid():
            _runtime = Runtime.from_settings(settings, CeleryDispatcher(app))
            _runtime_pid = os.getpid()
        return _runtime

    @app.task(name=RUN_STEP_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]  # Celery ships no types
    def run_step(step_id: str) -> None:
        engine_run_step(runtime(), step_id)

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
