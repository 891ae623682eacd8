"""The audit log's writer: gateway call records become ``provider_calls`` rows.

A call is audited even when the step that made it rolls back: ``DatabaseAuditSink`` writes each
record in a transaction of its own. The one exception saves a commit per call on the hot path: a
step may *hold* the records of its successful calls (``DatabaseAuditSink.holding``) and commit them
with the transaction that acts on the answer — the chat's with the step's completion, a submit's
with its task_id. Whatever is still held when the hold ends (the step raised, or that transaction
rolled back) is written on its own then, as before. Failed calls are never held: they are written
at once, because a retry's backoff may follow them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any, cast

import psycopg
from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from genline.pipelines.spend import accrue, reconcile
from genline.provider.gateway import AuditSink, CallRecord
from genline.storage.db import Database
from genline.storage.models import ProviderCall


def audit_row(rec: CallRecord) -> dict[str, Any]:
    return {
        "ts": rec.ts,
        "user_id": rec.ctx.user_id,
        "feature": rec.ctx.feature,
        "pipeline_id": rec.ctx.pipeline_id,
        "step_id": rec.ctx.step_id,
        "operation": rec.operation,
        "model": rec.ctx.model,
        "request_id": rec.request_id,
        "status_code": rec.status_code,
        "error_code": rec.error_code,
        "latency_ms": rec.latency_ms,
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "units": rec.units,
        "cost_usd": rec.cost_usd,
        "cache_hit": rec.cache_hit,
        "cost_estimated": rec.cost_estimated,
    }


_INSERT_CALL = insert(cast(Table, ProviderCall.__table__))


def write_audit(session: Session, records: Iterable[CallRecord]) -> None:
    """Insert the records' rows in the session's transaction (a Core insert, built once)."""
    records = list(records)
    rows = [audit_row(r) for r in records]
    if rows:
        session.connection().execute(_INSERT_CALL, rows)
        accrue(session.connection(), records)
        reconcile(session.connection(), records)


# ``audit_row``'s columns with their PostgreSQL types, for the binary COPY (times as naive UTC,
# as UTCDateTime stores them).
_COPY_TYPES = (
    ("ts", "timestamp"),
    ("user_id", "varchar"),
    ("feature", "varchar"),
    ("pipeline_id", "varchar"),
    ("step_id", "varchar"),
    ("operation", "varchar"),
    ("model", "varchar"),
    ("request_id", "varchar"),
    ("status_code", "int4"),
    ("error_code", "varchar"),
    ("latency_ms", "float8"),
    ("prompt_tokens", "int4"),
    ("completion_tokens", "int4"),
    ("units", "float8"),
    ("cost_usd", "numeric"),
    ("cache_hit", "bool"),
    ("cost_estimated", "bool"),
)
_COPY_SQL = f"COPY provider_calls ({', '.join(name for name, _ in _COPY_TYPES)}) FROM STDIN (FORMAT BINARY)"


def write_audit_many(session: Session, records: list[CallRecord]) -> None:
    """``write_audit`` for a batch (the poller's round): by binary ``COPY`` on PostgreSQL, the
    rows as tuples: cheaper than text ``COPY`` of dicts, itself far cheaper than an INSERT's
    parameters at thousands of polls a second (docs/PERFORMANCE.md). The same rows either way.
    Either way the records' costs are booked against the pipelines' caps (``spend.accrue``)."""
    if not records:
        return
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        write_audit(session, records)
        return
    rows = [
        (
            r.ts.astimezone(UTC).replace(tzinfo=None),
            r.ctx.user_id,
            r.ctx.feature,
            r.ctx.pipeline_id,
            r.ctx.step_id,
            r.operation,
            r.ctx.model,
            r.request_id,
            r.status_code,
            r.error_code,
            r.latency_ms,
            r.prompt_tokens,
            r.completion_tokens,
            r.units,
            r.cost_usd,
            r.cache_hit,
            r.cost_estimated,
        )
        for r in records
    ]
    driver = cast(psycopg.Connection[Any], connection.connection.driver_connection)
    with driver.cursor() as cursor, cursor.copy(_COPY_SQL) as copy:
        copy.set_types([kind for _, kind in _COPY_TYPES])
        for row in rows:
            copy.write_row(row)
    accrue(connection, records)


class AuditHold:
    """Records of successful calls waiting to be committed with the transaction that uses them."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    @contextmanager
    def committed_with(self) -> Iterator[list[CallRecord]]:
        """Wrap the ``with rt.db.transaction()`` block that writes the yielded records (enter this
        first, so it exits after the commit): they leave the hold only once that block, commit
        included, has succeeded. If it raises, they stay held and the hold writes them on its own."""
        taken = list(self.records)
        yield taken
        del self.records[: len(taken)]


class DatabaseAuditSink:
    """Writes each record at once, in its own transaction, so a call is audited even when the
    step that made it rolls back; inside ``holding()``, successful calls' records are held for
    the step to commit with its own next transaction (and written here if it does not)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._local = threading.local()

    def record(self, record: CallRecord) -> None:
        hold: AuditHold | None = getattr(self._local, "hold", None)
        if hold is not None and record.error_code is None:
            hold.records.append(record)
            return
        self.write([record])

    def write(self, records: list[CallRecord]) -> None:
        with self.db.transaction() as session:
            write_audit(session, records)

    @contextmanager
    def holding(self) -> Iterator[AuditHold]:
        hold, outer = AuditHold(), getattr(self._local, "hold", None)
        self._local.hold = hold
        try:
            yield hold
        finally:
            self._local.hold = outer
            if hold.records:  # not committed with the step: on their own, as any other record
                self.write(hold.records)
                hold.records.clear()

    def current(self) -> AuditHold | None:
        hold: AuditHold | None = getattr(self._local, "hold", None)
        return hold


@contextmanager
def holding(sink: AuditSink) -> Iterator[AuditHold]:
    """Hold ``sink``'s successful records while the block runs, if it can hold them; a sink that
    cannot (the poller's memory sink, a test's) keeps writing as it does, and the hold stays empty."""
    if isinstance(sink, DatabaseAuditSink):
        with sink.holding() as hold:
            yield hold
    else:
        yield AuditHold()


def current_hold(sink: AuditSink) -> AuditHold:
    """The hold in force in this thread (an empty one when there is none)."""
    hold = sink.current() if isinstance(sink, DatabaseAuditSink) else None
    return hold if hold is not None else AuditHold()
