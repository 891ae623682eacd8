"""What a refused request must leave behind: nothing. Counted from the database (pipelines, steps,
provider jobs, audit rows, stored objects), the broker (drain mode's in-memory nudges) and the
simulator's own counters (every request it answered)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import func, select

from genline.config.errors import UserError
from genline.pipelines.dispatch import MemoryDispatcher
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, Step, StoredObject


@dataclass(frozen=True)
class Footprint:
    rows: dict[str, int]
    nudges: int
    provider_requests: int


def footprint(rt: Runtime, sim: SimulatorHandle) -> Footprint:
    with rt.db.transaction() as s:
        rows = {
            model.__tablename__: int(s.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Pipeline, Step, ProviderJob, ProviderCall, StoredObject)
        }
    assert isinstance(rt.dispatcher, MemoryDispatcher), "counting nudges needs drain mode's dispatcher"
    stats = httpx.get(f"{sim.base_url}/_sim/stats").json()
    return Footprint(rows, len(rt.dispatcher.sent), sum(stats["requests_by_status"].values()))


@contextmanager
def leaves_nothing(rt: Runtime, sim: SimulatorHandle) -> Iterator[None]:
    """The block must change no row, send no nudge and make no provider request."""
    before = footprint(rt, sim)
    yield
    after = footprint(rt, sim)
    assert after == before, f"a refused request left something behind: {before} -> {after}"


def refused(rt: Runtime, sim: SimulatorHandle, submit: Callable[[], Any]) -> UserError:
    """Run ``submit``; it must raise a ``UserError`` and leave nothing behind. Returns the error."""
    with leaves_nothing(rt, sim):
        try:
            submit()
        except UserError as err:
            return err
    raise AssertionError("the request was accepted; it should have been refused")
