"""The daily totals ``genline report`` adds to the audit log: reading ``audit_daily_totals``.

Retention deletes old ``provider_calls`` rows and keeps what they added up to, one row per UTC day,
feature, model, operation and error code (``pipelines/retention.py``, docs/RETENTION.md). A
rolled-up call counts as made at the start (00:00 UTC) of its day, so a period counts the days
that start inside it (``rolled_up_days``). This module reads those days' rows (``daily_totals``)
and writes the report's ``daily_totals`` section; ``report.py`` adds the rows to its figures
(``Tally.add_rolled_up``, the series' buckets).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast

from sqlalchemy import Table, select

from genline.storage.models import AuditDailyTotal

TOTALS = cast(Table, AuditDailyTotal.__table__)


def _midnight_at_or_after(when: datetime) -> date:
    when = when.astimezone(UTC)
    day = when.date()
    return day if when == datetime.combine(day, time(), UTC) else day + timedelta(days=1)


def rolled_up_days(start: datetime, end: datetime) -> tuple[str, str]:
    """The UTC days whose daily totals ``[start, end)`` counts, as ISO dates ``[first, stop)``: the
    days that begin (00:00 UTC) inside the period. A period starting mid-day leaves that day's
    totals out; one ending mid-day takes that day's totals whole."""
    return _midnight_at_or_after(start).isoformat(), _midnight_at_or_after(end).isoformat()


def daily_totals(conn: Any, start: datetime, end: datetime, feature: str | None) -> list[Any]:
    """The ``audit_daily_totals`` rows of the days the period counts (``""`` where a call had no
    feature, model or error code)."""
    first, stop = rolled_up_days(start, end)
    query = select(TOTALS).where(TOTALS.c.day >= first, TOTALS.c.day < stop)
    if feature is not None:
        query = query.where(TOTALS.c.feature == feature)
    return list(conn.execute(query))


def section(start: datetime, end: datetime, requests: int) -> dict[str, Any]:
    """The report's ``daily_totals``: which days it counted, and the ``requests`` they added."""
    first_day, stop_day = rolled_up_days(start, end)
    return {
        "days_from": first_day,
        "days_before": stop_day,
        "requests": requests,
        "note": (
            "Audit rows removed by retention count from their daily totals (audit_daily_totals) when "
            "their UTC day starts inside the period. Latency percentiles and the text p95 check cover "
            "only the audit rows still stored; the mean latency covers both."
        ),
    }
