"""The Redis transport genline's Celery app uses: kombu's, reusing one client object per channel;
and the nudges pushed straight onto a queue's list (``tasks/messages.py``).

Both must deliver exactly as kombu's own path does (a real worker runs whole pipelines on them in
test_production_footprint.py); here: the transport is the one chosen for ``redis://`` and only for
it, the app Flower runs on reads back a plain ``redis://`` URL, messages round-trip through a real
Redis, and a direct nudge is, field for field, the message Celery itself would have sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from celery._state import _task_stack
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message

from genline.config.constants import RUN_STEP_TASK
from genline.config.settings import load_settings
from genline.tasks.app import CeleryDispatcher, flower_celery, make_celery
from genline.tasks.messages import RedisNudges, direct_redis
from genline.workers.broker import REDIS_TRANSPORT, RedisTransport, broker_transport

# For the tests that only read a URL and never connect: port 1, where nothing listens. The tests
# that talk to Redis use ``redis_url``, the session's own redis-server (tests/conftest.py).
NOWHERE = "redis://127.0.0.1:1/0"


def _settings(tmp_path: Path, broker: str | None) -> object:
    env = {"GENLINE_VAR_DIR": str(tmp_path), "APIMART_API_KEY": "k"}
    if broker is not None:
        env["GENLINE_BROKER_URL"] = broker
    return load_settings(env)


@pytest.mark.parametrize(
    ("broker", "chosen"),
    [(NOWHERE, REDIS_TRANSPORT), (None, None), ("amqp://guest@127.0.0.1//", None)],
)
def test_our_transport_is_chosen_for_redis_urls_only(tmp_path: Path, broker: str | None, chosen: str | None) -> None:
    assert broker_transport(_settings(tmp_path, broker)) == chosen  # type: ignore[arg-type]


def test_workers_and_producers_use_ours_and_flower_reads_a_plain_redis_url(tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url)
    with make_celery(settings).connection_for_write() as conn:  # type: ignore[arg-type]
        assert isinstance(conn.transport, RedisTransport)
    with flower_celery(settings).connection_for_write() as conn:  # type: ignore[arg-type]
        assert not isinstance(conn.transport, RedisTransport)
        assert conn.as_uri(include_password=True) == redis_url  # what Flower's broker view parses


def test_one_client_object_per_channel_and_messages_round_trip(redis_url: str) -> None:
    queue = Queue("genline-test-transport", routing_key="genline-test-transport")
    with Connection(redis_url, transport=REDIS_TRANSPORT) as conn:
        channel = conn.default_channel
        producer = conn.Producer(channel)
        for i in range(3):
            producer.publish({"n": i}, routing_key=queue.name, declare=[queue])
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second  # kombu's own channel makes a new client object each time
        got: list[int] = []

        def take(body: dict[str, int], message: Message) -> None:
            got.append(body["n"])
            message.ack()

        with conn.Consumer(queue, callbacks=[take]):
            while len(got) < 3:
                conn.drain_events(timeout=5)
        assert got == [0, 1, 2]
        with channel.conn_or_acquire() as client:
            assert client.llen(queue.name) == 0
            assert not client.zcard(channel.unacked_index_key)  # every ack reached Redis
        old = channel.pool
        channel._disconnect_pools()  # as kombu does after a connection error
        with channel.conn_or_acquire() as client:
            assert client.connection_pool is channel.pool is not old  # a new client on the new pool
            client.delete(queue.name)


def _pushed(client: redis.Redis, queue: str) -> dict[str, Any]:
    raw = client.rpop(queue)
    assert raw is not None, f"nothing on {queue}"
    message: dict[str, Any] = json.loads(raw)  # type: ignore[arg-type]  # redis-py types every reply alike
    return message


def _without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """What two sends of the same nudge share: all but the new ids each send makes."""
    shape = json.loads(json.dumps(message))
    shape["headers"].pop("id")
    shape["properties"].pop("correlation_id")
    shape["properties"].pop("delivery_tag")
    if shape["headers"]["root_id"] == message["headers"]["id"]:  # a root task: its own root
        shape["headers"]["root_id"] = "itself"
    return shape


@pytest.mark.parametrize("from_a_running_step", [False, True])
def test_a_direct_nudge_is_the_message_celery_would_have_sent(
    tmp_path: Path, redis_url: str, from_a_running_step: bool
) -> None:
    app = make_celery(_settings(tmp_path, redis_url))  # type: ignore[arg-type]
    dispatcher = CeleryDispatcher(app)
    assert isinstance(dispatcher.direct, RedisNudges)
    celery_path = CeleryDispatcher(app)
    celery_path.direct = None
    client = redis.Redis.from_url(redis_url)

    @app.task(name=RUN_STEP_TASK)  # Celery ships no types
    def run_step(step_id: str) -> None: ...

    task = run_step
    if from_a_running_step:  # as a worker runs a step: Celery links what it sends to that task
        task.push_request(id="running-task", root_id="first-task", called_directly=False)
        _task_stack.push(task)
    try:
        for queue in ("genline.media", "genline.store"):
            celery_path.send("st_0123", queue)
            theirs = _pushed(client, queue)
            dispatcher.send("st_0123", queue)
            ours = _pushed(client, queue)
            assert _without_ids(ours) == _without_ids(theirs)
            assert ours["headers"]["id"] == ours["properties"]["correlation_id"] != theirs["headers"]["id"]
            assert ours["properties"]["delivery_tag"] != theirs["properties"]["delivery_tag"]
            expected_parent = "running-task" if from_a_running_step else None
            assert ours["headers"]["parent_id"] == theirs["headers"]["parent_id"] == expected_parent
    finally:
        if from_a_running_step:
            _task_stack.pop()
            task.pop_request()
        dispatcher.close()
        celery_path.close()
        client.close()


def test_a_direct_nudge_is_read_by_a_consumer_of_the_queue(tmp_path: Path, redis_url: str) -> None:
    app = make_celery(_settings(tmp_path, redis_url))  # type: ignore[arg-type]
    dispatcher = CeleryDispatcher(app)
    dispatcher.send("st_read_me", "genline.copy")  # before any consumer or binding exists: kept
    got: list[tuple[Any, str]] = []
    with app.connection_for_read() as conn:
        queue = app.amqp.queues["genline.copy"]

        def take(body: Any, message: Message) -> None:
            got.append((body, message.headers["task"]))
            message.ack()

        with conn.Consumer(queue, callbacks=[take]):
            conn.drain_events(timeout=5)
    dispatcher.close()
    no_workflow = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert got == [([["st_read_me"], {}, no_workflow], RUN_STEP_TASK)]


@pytest.mark.parametrize(
    ("broker", "options", "direct"),
    [
        (NOWHERE, {}, True),
        (None, {}, False),  # the embedded broker
        (NOWHERE, {"global_keyprefix": "tenant:"}, False),
        # kombu's option, not redis-py's (the settings refuse such a URL; the app could still get one)
        (f"{NOWHERE}?visibility_timeout=3600", {}, False),
        ("amqp://guest@127.0.0.1//", {}, False),
    ],
)
def test_the_direct_path_is_only_taken_where_it_writes_what_celery_would(
    tmp_path: Path, broker: str | None, options: dict[str, str], direct: bool
) -> None:
    app = make_celery(_settings(tmp_path, broker and broker.split("?")[0]))  # type: ignore[arg-type]
    if broker is not None:
        app.conf.broker_url = broker
    app.conf.broker_transport_options = {**(app.conf.broker_transport_options or {}), **options}
    nudges = direct_redis(app)
    assert (nudges is not None) is direct
    if nudges is not None:
        nudges.close()
