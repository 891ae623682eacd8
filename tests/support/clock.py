"""A clock that only moves when a test says so, for the simulator and for genline's clock seam.

genline reads "now" through ``genline.config.clock.utcnow``, imported by name into each module
that needs it; ``ManualClock.drive(monkeypatch, module, ...)`` makes those modules read this
clock instead. The simulator takes the same object as its ``clock`` (unix seconds), so a link's
``expires_at`` and genline's idea of "now" move together.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from types import ModuleType

import pytest


class ManualClock:
    """Unix seconds that move only by ``advance``; starts at the real time by default so rows
    written before a test takes over the clock are not from the future."""

    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(time.time()) if start is None else start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def utcnow(self) -> datetime:
        """Aware UTC now, as ``genline.config.clock.utcnow`` returns it."""
        return datetime.fromtimestamp(self.now, UTC)

    def drive(self, monkeypatch: pytest.MonkeyPatch, *modules: ModuleType) -> None:
        """From now on, ``utcnow`` in each of ``modules`` reads this clock."""
        for module in modules:
            assert hasattr(module, "utcnow"), f"{module.__name__} does not read the clock seam"
            monkeypatch.setattr(module, "utcnow", self.utcnow)
