"""A step's nudge on Redis: the message Celery would publish, pushed onto the queue's list directly.

Celery's publish path (``send_task`` → kombu's producer → the Redis channel) spends more than twice
the CPU on a nudge that the same message built from a fixed shape and pushed with one ``LPUSH``
does, and the ``LPUSH`` is most of the latter (docs/PERFORMANCE.md). Every nudge takes this
path on a ``redis://`` broker: a submit's first step, each step's next one, the poller's and the
sweeper's. A nudge is an id on a list, so nothing here decides anything: the database does.

The message is Celery's task protocol 2 in kombu's Redis envelope, field for field as
``send_task`` writes it for a step's task (``task_name``: ``genline.copy``... by kind);
``tests/integration/test_broker.py`` and ``test_flower.py`` compare the two, so a Celery or
kombu upgrade that changes either fails there, and a real worker runs whole pipelines from these
messages (``test_production_footprint.py``). What Celery's path does and this one does not, and why nothing is lost:
- Routing: kombu's Redis transport sends a message for the default exchange (``""``, which is what
  ``send_task`` uses for genline's queues) to the list named by its routing key, as here; a
  message restored after a lost worker goes back to the same list either way.
- Queue bindings: the list is the queue a worker reads, so a nudge sent before any worker has
  started is kept; no binding is needed for that.
- Publish signals and ``task-sent`` events: genline uses neither (``tasks/app.py``).
- Publish retries: redis-py retries a dropped connection (below); if the broker is down the
  nudge fails, is logged, and the sweeper sends it again (``pipelines/engine.py``).

Only for plain ``redis://`` URLs (no query string) without a global key prefix or TLS options;
any other broker goes through Celery's own path.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from celery.utils.nodenames import anon_nodename
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from genline.config.constants import RUN_STEP_TASK, StepKind

# A step's task is named for what it does, so Flower's task list reads as the pipeline's steps; every
# name runs the same body (tasks/task.py). ``genline.run_step`` stays: messages already queued by an
# older release, and nudges that do not say the step's kind, still run.
TASK_BY_KIND = {kind.value: f"genline.{kind.value}" for kind in StepKind}
STEP_TASKS = (*TASK_BY_KIND.values(), RUN_STEP_TASK)
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}  # no workflow: ids only
_dumps = json.JSONEncoder().encode  # kombu's json serializer writes the same for these values


def task_name(kind: str | None) -> str:
    """The task a step of ``kind`` is sent to: ``genline.copy``, ``.image``, ``.video``, ``.store``."""
    return RUN_STEP_TASK if kind is None else TASK_BY_KIND[StepKind(kind).value]


def task_kwargs(pipeline_id: str | None) -> dict[str, str]:
    """The step's pipeline id, an id and nothing else, for Flower to show and search."""
    return {} if pipeline_id is None else {"pipeline_id": pipeline_id}


def direct_redis(app: Celery) -> RedisNudges | None:
    """The direct path for this app's broker, or None where Celery's own path must be taken."""
    url = str(app.conf.broker_url or "")
    options = app.conf.broker_transport_options or {}
    if not url.startswith("redis://") or options.get("global_keyprefix") or app.conf.broker_use_ssl:
        return None
    if urlsplit(url).query:  # kombu's options (``?visibility_timeout=``...) would break redis-py's client
        return None
    return RedisNudges(app, url)


class RedisNudges:
    """Builds a step's messages (``genline.<kind>(step_id, pipeline_id=...)``) and pushes them onto
    a queue's Redis list."""

    def __init__(self, app: Celery, url: str) -> None:
        self._app = app
        # About the patience of Celery's default publish retry: three more tries, at most 0.2 s apart.
        self.client = redis.Redis.from_url(
            url,
            socket_connect_timeout=5,
            socket_timeout=5,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 3),
            health_check_interval=30,
        )
        self._origin: tuple[int, str] | None = None

    def _origin_name(self) -> str:
        pid = os.getpid()  # "gen<pid>@<host>", as Celery names a producer; per process (workers fork)
        if self._origin is None or self._origin[0] != pid:
            self._origin = (pid, anon_nodename())
        return self._origin[1]

    def message(self, step_id: str, queue: str, *, kind: str | None = None, pipeline_id: str | None = None) -> str:
        task_id = str(uuid.uuid4())
        args, kwargs = [step_id], task_kwargs(pipeline_id)
        root_id, parent_id = task_id, None
        parent = self._app.current_worker_task  # sent from a running step: linked to it, as Celery links them
        if parent is not None:
            root_id, parent_id = parent.request.root_id or parent.request.id, parent.request.id
        body = base64.b64encode(_dumps([args, kwargs, _EMBED]).encode()).decode("ascii")
        envelope: dict[str, Any] = {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": task_name(kind),
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": root_id,
                "parent_id": parent_id,
                "argsrepr": repr(args),
                "kwargsrepr": repr(kwargs),
                "origin": self._origin_name(),
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": self._app.thread_oid,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return _dumps(envelope)

    def send(self, step_id: str, queue: str, *, kind: str | None = None, pipeline_id: str | None = None) -> None:
        message = self.message(step_id, queue, kind=kind, pipeline_id=pipeline_id)
        self.client.lpush(queue, message)  # priority 0: the list is the queue's name

    def close(self) -> None:
        self.client.close()
