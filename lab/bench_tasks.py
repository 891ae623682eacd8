"""The baseline for ``make bench``: a bare Celery chain of 4 no-op tasks, configured like genline's
workers (late acks, prefetch 1, same broker), counting finished chains in Redis."""

from __future__ import annotations

import os

import redis
from celery import Celery

BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14")
COUNTER = "genline-bench:chains-done"
QUEUE = "genline-bench"

_redis: redis.Redis | None = None


def _noop(last: bool = False) -> None:
    global _redis
    if last:
        if _redis is None:
            _redis = redis.Redis.from_url(BROKER)
        _redis.incr(COUNTER)


def make_app(transport: str | None = None) -> Celery:
    """The bare app: kombu's own Redis transport, or (``transport``, for the same-transport
    figures) genline's, ``workers.broker:RedisTransport``."""
    app = Celery("genline-bench", broker=BROKER, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport=transport,
    )
    app.task(name="bench.noop")(_noop)
    return app


app = make_app(os.environ.get("BENCH_BROKER_TRANSPORT") or None)  # what ``celery -A lab.bench_tasks`` runs
noop = app.tasks["bench.noop"]
