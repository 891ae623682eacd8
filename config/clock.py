"""The clock seam: every "now" in genline comes from here, so tests can reason about time."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)
