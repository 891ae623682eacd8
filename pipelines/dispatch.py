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


class Dispatcher(Protocol):
    def send(self, step_id: str, queue: str) -> None: ...

    def close(self) -> None: ...


class MemoryDispatcher:
    """Keeps nudges in order in memory; ``drain`` runs them in this process (tests, benchmarks)."""

    def __init__(self) -> None:
        self.sent: deque[tuple[str, str]] = deque()

    def send(self, step_id: str, queue: str) -> None:
        self.sent.append((step_id, queue))

    def close(self) -> None:
        pass

    def pop(self) -> str | None:
        return self.sent.popleft()[0] if self.sent else None
