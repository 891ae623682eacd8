"""The broker seam: how a step is nudged. Celery in production; a memory queue for drain mode.

A nudge carries a step id and nothing else; losing one is survivable (the sweeper re-sends it).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from genline.config.constants import Queue, StepKind

_QUEUE_BY_KIND = {
    StepKind.COPY: Queue.COPY,
    StepKind.IMAGE: Queue.MEDIA,
    StepKind.VIDEO: Queue.MEDIA,
    StepKind.STORE: Queue.STORE,
}


def queue_for(kind: str, priority: str) -> str:
    """Batch work runs on its own queue so overnight jobs never delay interactive ones."""
    if priority == "batch":
        return Queue.BATCH.value
    return _QUEUE_BY_KIND[StepKind(kind)].value


class Nudge(tuple[str, str]):
    """A ``(step_id, queue)`` pair that also says which step it is: the kind names the broker's
    task (``genline.copy``...) and the pipeline id makes it findable in Flower (ids only). It
    unpacks and compares as the plain pair, so code that reads ``(step_id, queue)`` is unchanged;
    a plain pair still works, under a task name that does not tell the kind."""

    kind: str | None
    pipeline_id: str | None

    def __new__(cls, step_id: str, queue: str, kind: str | None = None, pipeline_id: str | None = None) -> Nudge:
        pair = super().__new__(cls, (step_id, queue))
        pair.kind, pair.pipeline_id = kind, pipeline_id
        return pair


def nudge(step_id: str, kind: str, priority: str, pipeline_id: str) -> Nudge:
    """The nudge of a step: its queue (``queue_for``), its kind and its pipeline's id."""
    return Nudge(step_id, queue_for(kind, priority), kind, pipeline_id)


def about(pair: tuple[str, str]) -> dict[str, str | None]:
    """``send``'s keywords for a nudge: its kind and pipeline id, None for a plain pair."""
    return {"kind": getattr(pair, "kind", None), "pipeline_id": getattr(pair, "pipeline_id", None)}


class Dispatcher(Protocol):
    def send(self, step_id: str, queue: str, *, kind: str | None = None, pipeline_id: str | None = None) -> None: ...

    def close(self) -> None: ...


class MemoryDispatcher:
    """Keeps nudges in order in memory; ``drain`` runs them in this process (tests, benchmarks)."""

    def __init__(self) -> None:
        self.sent: deque[tuple[str, str]] = deque()

    def send(self, step_id: str, queue: str, *, kind: str | None = None, pipeline_id: str | None = None) -> None:
        self.sent.append((step_id, queue))

    def close(self) -> None:
        pass

    def pop(self) -> str | None:
        return self.sent.popleft()[0] if self.sent else None
