"""The audit log's writer: gateway call records become ``provider_calls`` rows."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from provider.gateway import CallRecord
from storage.db import Database
from storage.models import ProviderCall


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
    }


def write_audit(session: Session, records: Iterable[CallRecord]) -> None:
    rows = [audit_row(r) for r in records]
    if rows:
        session.execute(insert(ProviderCall), rows)


class DatabaseAuditSink:
    """Writes each record at once, in its own transaction, so a call is audited even when the
    step that made it rolls back."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, record: CallRecord) -> None:
        with self.db.transaction() as session:
            write_audit(session, [record])
