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
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from genline.config.errors import ConfigError

# The stable codes of a database genline cannot use (README, "When something is wrong").
DATABASE_UNREACHABLE = "database_unreachable"
DATABASE_MISSING = "database_missing"
DATABASE_LOGIN_FAILED = "database_login_failed"
DATABASE_URL_INVALID = "database_url_invalid"


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("GENLINE_DATABASE_URL is not a database URL.", code=DATABASE_URL_INVALID) from None
    try:
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
    except (ArgumentError, ImportError) as exc:  # NoSuchModuleError is an ArgumentError
        raise ConfigError(
            f"GENLINE_DATABASE_URL names a driver genline cannot load ({parsed.drivername}): use "
            "sqlite:///path/genline.db or postgresql+psycopg://user@host:5432/name.",
            code=DATABASE_URL_INVALID,
        ) from exc
    except OSError as exc:  # the SQLite file's folder cannot be created
        raise ConfigError(
            f"The folder of the SQLite database {parsed.database} (GENLINE_DATABASE_URL) cannot be "
            f"created: {exc.strerror}.",
            code=DATABASE_UNREACHABLE,
        ) from exc


def shown_url(url: str) -> str:
    """A database URL fit for a message: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a database URL)"


def database_error(exc: BaseException, url: str | None = None) -> ConfigError | None:
    """The plain error for a database genline cannot use (``exc``, from any query or connect), or
    None when ``exc`` is not that (a query's own error, a lock: the caller's to handle).

    The driver's first line says which: no server answering, no such database, a login refused.
    ``url`` (GENLINE_DATABASE_URL) is named with its password hidden."""
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return None
    text = str(exc.orig if exc.orig is not None else exc).strip()
    reason = (text.splitlines()[0] if text else type(exc).__name__).removeprefix("connection failed: ").strip()
    at = f" at {shown_url(url)}" if url else ""
    if 'database "' in reason and "does not exist" in reason:
        name = reason.split('database "', 1)[1].split('"', 1)[0]
        return ConfigError(
            f"The database server{at} has no database named {name!r} (GENLINE_DATABASE_URL): create it "
            "and run `genline db upgrade`, or fix the URL.",
            code=DATABASE_MISSING,
        )
    if "password authentication failed" in reason or ('role "' in reason and "does not exist" in reason):
        return ConfigError(
            f"The database server{at} refused the login (GENLINE_DATABASE_URL): "
            f"{reason.split('FATAL:', 1)[-1].strip()}; fix the user or password in the URL.",
            code=DATABASE_LOGIN_FAILED,
        )
    if "unable to open database file" in reason:  # SQLite: a folder it may not write, a bad path
        return ConfigError(
            f"The SQLite database{at} (GENLINE_DATABASE_URL) cannot be opened: check the path and that "
            "this user may write its folder.",
            code=DATABASE_UNREACHABLE,
        )
    # Only a connection that could not be made: one the server dropped (a restart, an idle
    # timeout) is the caller's to retry, as from any other statement, not a wrong setting.
    if text.startswith("connection failed") or any(
        sign in reason for sign in ("resolve host", "Connection refused", "could not connect", "timeout expired")
    ):
        return ConfigError(
            f"The database{at} (GENLINE_DATABASE_URL) cannot be reached: {reason.rstrip('.')}. Check the "
            "URL and that the server is running.",
            code=DATABASE_UNREACHABLE,
        )
    return None


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
        except (OperationalError, InterfaceError) as exc:
            err = database_error(exc, self.url) or ConfigError(
                f"The database at {shown_url(self.url)} cannot be used: {type(exc.orig or exc).__name__}.",
                code=DATABASE_UNREACHABLE,
            )
            raise err from exc

    def dispose(self) -> None:
        self.engine.dispose()
