"""The tests never talk to the machine's shared Redis (127.0.0.1:6379, or 6379 anywhere): every
Redis test runs on the session's own redis-server (``own_redis`` / ``redis_url`` in conftest.py),
and an audit hook in conftest.py refuses, in the test process, any connection to port 6379 before
it is made, failing the run. Here: that guard is on, and the fixtures' server is not the shared one.
Worker processes a test starts get the fixture's URL in their environment."""

from __future__ import annotations

import gc
import socket

import pytest

from tests import conftest
from tests.support.redis_server import OwnRedis


def _refused_attempt(connect: object) -> None:
    before = len(conftest._GUARD["attempts"])
    with pytest.raises(conftest.SharedRedisTouched, match="the machine's shared Redis"):
        connect()  # type: ignore[operator]
    # The attempt was recorded (which fails the run at its end); this one was on purpose.
    assert len(conftest._GUARD["attempts"]) == before + 1
    del conftest._GUARD["attempts"][before:]


def test_a_socket_to_the_shared_redis_is_refused_before_it_connects() -> None:
    def connect() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect(("127.0.0.1", conftest.SHARED_REDIS_PORT))

    _refused_attempt(connect)


# redis-py does not close the socket whose connect was refused this way: it is collected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_redis_client_of_the_shared_server_is_refused() -> None:
    import redis

    def connect() -> None:
        with redis.Redis(host="127.0.0.1", port=conftest.SHARED_REDIS_PORT, db=9, socket_timeout=1) as client:
            client.dbsize()

    _refused_attempt(connect)
    gc.collect()


@pytest.mark.integration
def test_the_fixtures_redis_is_the_sessions_own(own_redis: OwnRedis, redis_url: str) -> None:
    assert own_redis.port != conftest.SHARED_REDIS_PORT and redis_url == own_redis.url
    assert own_redis.proc is not None and own_redis.proc.poll() is None
    with own_redis.client() as client:
        assert client.dbsize() == 0  # flushed for this test: its server, not one others use
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("dir")["dir"] != "/var/lib/redis"
