"""The Redis transport genline's Celery app uses: kombu's, reusing one client object per channel.

It must deliver and acknowledge exactly as kombu's does (a real worker runs whole pipelines on it
in test_production_footprint.py); here: it is the one chosen for ``redis://`` and only for it, the
app Flower runs on reads back a plain ``redis://`` URL, and messages round-trip through a real Redis.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Connection, Queue

from config.settings import load_settings
from tasks.app import flower_celery, make_celery
from workers.broker import REDIS_TRANSPORT, RedisTransport, broker_transport


def _settings(tmp_path: Path, broker: str | None) -> object:
    env = {"GENLINE_VAR_DIR": str(tmp_path), "APIMART_API_KEY": "k"}
    if broker is not None:
        env["GENLINE_BROKER_URL"] = broker
    return load_settings(env)


@pytest.mark.parametrize(
    ("broker", "chosen"),
    [("redis://127.0.0.1:6379/13", REDIS_TRANSPORT), (None, None), ("amqp://guest@127.0.0.1//", None)],
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
        got = []
        with conn.Consumer(queue, callbacks=[lambda body, message: (got.append(body["n"]), message.ack())]):
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
