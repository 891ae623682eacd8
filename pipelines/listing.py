"""``genline list``: pipelines by user, feature, status and time, newest first.

The same filter picks what the bulk commands (``cancel-many``, ``retry-many``) act on, so what an
operator lists is what they cancel or retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Select, Table, func, select

from genline.config.constants import PipelineStatus
from genline.config.errors import ValidationError
from genline.storage.db import Database
from genline.storage.models import Pipeline

PIPELINES = cast(Table, Pipeline.__table__)
STATUSES = tuple(s.value for s in PipelineStatus)
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class PipelineFilter:
    """Which pipelines: every field given must match (``status`` any of those named); the time
    bounds apply to ``created_at``, ``[since, until)``."""

    user_id: str | None = None
    feature: str | None = None
    status: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for value in self.status:
            if value not in STATUSES:
                raise ValidationError(
                    f"status {value!r} is unknown; choose from {', '.join(STATUSES)}.",
                    code="status_unknown",
                    field="status",
                )
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValidationError("--since must come before --until.", code="period_invalid", field="since")

    @property
    def empty(self) -> bool:
        return not (self.user_id or self.feature or self.status or self.since or self.until)

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.user_id is not None:
            query = query.where(PIPELINES.c.user_id == self.user_id)
        if self.feature is not None:
            query = query.where(PIPELINES.c.feature == self.feature)
        if self.status:
            query = query.where(PIPELINES.c.status.in_(list(self.status)))
        if self.since is not None:
            query = query.where(PIPELINES.c.created_at >= self.since)
        if self.until is not None:
            query = query.where(PIPELINES.c.created_at < self.until)
        return query

    def narrowed(self, statuses: Sequence[str], *, action: str) -> PipelineFilter:
        """The filter kept to ``statuses`` (all of them when it names none); refused when the
        statuses it names are none of those ``action`` can act on."""
        kept = tuple(s for s in (self.status or statuses) if s in statuses)
        if not kept:
            raise ValidationError(
                f"Only {' or '.join(statuses)} pipelines can be {action}; --status names none of them.",
                code="status_not_actionable",
                field="status",
            )
        return PipelineFilter(self.user_id, self.feature, kept, self.since, self.until)

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "feature": self.feature,
            "status": list(self.status),
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }


_COLUMNS = (
    PIPELINES.c.id,
    PIPELINES.c.user_id,
    PIPELINES.c.feature,
    PIPELINES.c.profile,
    PIPELINES.c.status,
    PIPELINES.c.error_code,
    PIPELINES.c.estimated_cost_usd,
    PIPELINES.c.cost_usd,
    PIPELINES.c.created_at,
    PIPELINES.c.finished_at,
)


def list_pipelines(db: Database, where: PipelineFilter, *, limit: int = 100) -> dict[str, Any]:
    """The pipelines ``where`` picks, newest first, at most ``limit``; ``total`` counts them all."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(f"--limit must be between 1 and {MAX_LIMIT}.", code="limit_invalid", field="limit")
    with db.engine.connect() as conn:
        total = conn.execute(where.apply(select(func.count()).select_from(PIPELINES))).scalar_one()
        rows = conn.execute(
            where.apply(select(*_COLUMNS)).order_by(PIPELINES.c.created_at.desc(), PIPELINES.c.id).limit(limit)
        ).all()
    return {
        "filter": where.as_dict(),
        "total": int(total),
        "shown": len(rows),
        "pipelines": [
            {
                "id": row.id,
                "user_id": row.user_id,
                "feature": row.feature,
                "profile": row.profile,
                "status": row.status,
                "error_code": row.error_code,
                "estimated_cost_usd": str(row.estimated_cost_usd),
                "cost_usd": str(row.cost_usd),
                "created_at": row.created_at.isoformat(),
                "finished_at": row.finished_at.isoformat() if row.finished_at else None,
            }
            for row in rows
        ],
    }


def matching_ids(db: Database, where: PipelineFilter, *, limit: int = MAX_LIMIT) -> list[str]:
    """The ids ``where`` picks, oldest first (the order a bulk command acts in)."""
    with db.engine.connect() as conn:
        query = where.apply(select(PIPELINES.c.id)).order_by(PIPELINES.c.created_at, PIPELINES.c.id).limit(limit)
        return [row.id for row in conn.execute(query)]
