"""The state database: engine and session set-up for SQLite (zero-setup) and PostgreSQL.

The same schema and the same code run on both; the differences are kept here:
SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions so several worker processes
can write without "database is locked" upgrades failing half-way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from genline.config.errors import ConfigError


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("GENLINE_DATABASE_URL is not a database URL.") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _tune_sqlite(engine)
        return engine
    # No pre-ping: it costs a round trip per transaction (docs/PERFORMANCE.md). A connection the
    # server dropped fails its next use with OperationalError, which steps retry and the poller's
    # round survives; connections are also recycled every five minutes.
    return create_engine(url, pool_recycle=300, pool_size=pool_size, max_overflow=pool_size)


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


# The channel on which a commit that gives the poller new work wakes it (PostgreSQL only).
NEW_JOBS_CHANNEL = "genline_new_jobs"


def wake_poller(session: Session, due: datetime) -> None:
    """Inside a transaction: tell a sleeping poller, once this commits, that a job will be due for
    its first poll at ``due``, so that poll is on time rather than at the poller's next idle check.
    The payload is the due time (epoch seconds): the poller wakes then, not at the ring. PostgreSQL
    delivers the notification at commit (never for a rollback); on SQLite this does nothing and
    the poller finds the job by its naps."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_NOTIFY, {"channel": NEW_JOBS_CHANNEL, "due": f"{due.timestamp():.3f}"})


_NOTIFY = text("SELECT pg_notify(:channel, :due)")


def libpq_conninfo(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as psycopg's own connect() takes it (for LISTEN)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Database:
    """An engine plus its session factory; one per process."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any error."""
        with self.sessions.begin() as session:
            yield session

    @property
    def is_postgres(self) -> bool:
        return is_postgres(self.engine)

    def check(self) -> None:
        """Fail loudly at start-up when the database cannot be reached."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except OperationalError as exc:
            raise ConfigError(
                f"The database at {make_url(self.url).render_as_string(hide_password=True)} "
                f"cannot be reached: {str(exc.orig).splitlines()[0] if exc.orig else exc}"
            ) from None

    def dispose(self) -> None:
        self.engine.dispose()
