"""The Celery application, configured from genline's settings, and the broker seam's Celery side.

Reliability settings, and why: late acks and reject-on-worker-lost so a message is only gone once
its step has reached a resting point; prefetch 1 so a busy worker holds no one else's work;
results ignored because the database is the truth. No task ever waits on the provider (the poller
does), so the Redis visibility timeout can be much longer than any task and still recover from a
dead worker.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown
from kombu.entity import Queue as KombuQueue

from genline.config.constants import ALL_QUEUES, Queue
from genline.config.settings import Settings
from genline.tasks.messages import direct_redis, task_kwargs, task_name
from genline.workers.broker import broker_transport, broker_url


@worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]  # Celery ships no types
def _child_exited(pid: int | None = None, **_: object) -> None:
    """A prefork child is about to exit: its live gauges leave the exporter's sum (counters stay)."""
    from genline.provider.metrics import process_exited

    process_exited(pid or os.getpid())


def celery_config(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "broker_url": broker_url(settings),
        "broker_transport": broker_transport(settings),
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": Queue.COPY.value,
        "task_queues": [KombuQueue(q, routing_key=q) for q in ALL_QUEUES],  # type: ignore[no-untyped-call]
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }
    if not settings.embedded_broker:
        conf["broker_transport_options"] = {"visibility_timeout": settings.visibility_timeout_s}
    # Task events are off until someone watches: Flower switches them on in every worker when it
    # starts, and keeps them on while it runs (its enable_events option, on by default). Sent
    # always, they cost a tenth of pipeline throughput (docs/PERFORMANCE.md).
    # No "task-sent" event from producers either: it cost a quarter of each submit, and
    # Flower sees every task from the workers' received/started/succeeded events.
    return conf


def make_celery(settings: Settings) -> Celery:
    app = Celery("genline", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def flower_celery(settings: Settings) -> Celery:
    """The app Flower runs on: genline's, with kombu's own Redis transport. Flower reads the broker
    URL back from its app to show queue lengths, and kombu spells a URL with a transport set by
    class path (``workers.broker:RedisTransport://...``), which Flower cannot parse."""
    app = make_celery(settings)
    app.conf.broker_transport = None
    return app


class CeleryDispatcher:
    """Sends a step's id, with its pipeline's id and nothing else, to the queue for its kind of work
    under the task named for that kind (``genline.copy``...): straight onto the queue's Redis list
    on a ``redis://`` broker (``tasks/messages.py``), through Celery otherwise."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.direct = direct_redis(app)

    def send(self, step_id: str, queue: str, *, kind: str | None = None, pipeline_id: str | None = None) -> None:
        if self.direct is not None:
            self.direct.send(step_id, queue, kind=kind, pipeline_id=pipeline_id)
            return
        # Declaring the queue with the message (cached per connection by kombu) means a nudge sent
        # before any worker has started, or after Redis lost its bindings, is kept, not dropped.
        declared = self.app.amqp.queues[queue]
        self.app.send_task(
            task_name(kind), args=[step_id], kwargs=task_kwargs(pipeline_id), queue=declared, declare=[declared]
        )

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()
