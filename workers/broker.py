"""The broker's transports: kombu's Redis transport with one fix, and the embedded broker.

Redis (production): kombu's Redis channel builds a new ``redis.Redis`` client object for every
publish and every ack (``conn_or_acquire``), and redis-py builds each client's table of ~165
response callbacks from scratch (redis-py #3624, open). ``RedisTransport`` keeps one client per
channel on the channel's own pool: the same connections, the same commands, no rebuilt table, and
a third less CPU an ``apply_async`` (docs/PERFORMANCE.md; cProfile had put the client's
construction at over half). It is set as Celery's ``broker_transport`` for ``redis://``
URLs, so the configured URL is unchanged; Flower runs on kombu's own transport
(``tasks.app.flower_celery``), because kombu writes a class-path transport into the URL it reports.

The embedded broker of the zero-setup default: kombu's SQLAlchemy transport on a SQLite file.

Why this one (measured before choosing, Celery 5.7, separate producer and worker processes): it
completed every demo run with 1 and 2 workers with no errors and no duplicates; the filesystem
transport was a little faster but its worker died reading half-written message files. Two traps
are handled here: the poll interval (1 s by default) is set on a subclass, because kombu passes
every ``broker_transport_options`` entry to ``create_engine`` and a ``polling_interval`` there
kills the worker; and delivered messages, which the transport never deletes, are pruned.

Limits: one machine only (it is a file), no fanout (so no Flower events), tens of messages a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport.sqlalchemy import Transport as SQLATransport
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from genline.config.settings import Settings

ALIAS = "genline-embedded"
POLL_INTERVAL_S = 0.1


class EmbeddedTransport(SQLATransport):
    polling_interval = POLL_INTERVAL_S


TRANSPORT_ALIASES[ALIAS] = f"{__name__}:EmbeddedTransport"


class _RedisChannel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's own client (BRPOP), made once per channel already
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:  # first use, or the pool was reset
            client = self._shared_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, reusing one client object per channel (see the module's note)."""

    Channel = _RedisChannel


REDIS_TRANSPORT = f"{__name__}:RedisTransport"


def broker_transport(settings: Settings) -> str | None:
    """Celery's ``broker_transport``: ours for ``redis://``; otherwise what the URL says."""
    if not settings.embedded_broker and settings.broker_url.startswith("redis://"):
        return REDIS_TRANSPORT
    return None


def broker_path(settings: Settings) -> Path:
    return settings.var_dir / "broker.sqlite"


def broker_url(settings: Settings) -> str:
    if settings.embedded_broker:
        path = broker_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"{ALIAS}+sqlite:///{path}"
    return settings.broker_url


def prune_delivered(settings: Settings) -> int:
    """Delete messages the embedded broker has delivered (it keeps them forever otherwise)."""
    if not settings.embedded_broker or not broker_path(settings).exists():
        return 0
    engine = create_engine(f"sqlite:///{broker_path(settings)}", connect_args={"timeout": 30})
    try:
        with engine.begin() as conn:
            return conn.execute(text("DELETE FROM kombu_message WHERE visible = 0")).rowcount or 0
    except OperationalError:
        return 0  # no table yet, or busy: next time
    finally:
        engine.dispose()
