"""A running step's lease: how a dead worker's step is found in seconds, not minutes.

The claim that makes a step RUNNING also gives it a lease (``lease_owner``, ``lease_until``, one
``GENLINE_LEASE_S`` long; see the engine's claim). While the step runs, this process renews the
leases of every step it holds, every third of a lease, in one UPDATE; a step that finishes within
the first third (most do) costs no renewal at all. When a worker dies its leases lapse, and the
sweeper queues those steps again: a step of a killed worker runs again within about one lease.

Renewal is conditional on the owner, so a worker that was merely slow (its lease lapsed and the
step was taken over) never renews a lease that is no longer its own.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import cast

from sqlalchemy import Table, bindparam, update

from genline.config.clock import utcnow
from genline.config.constants import StepStatus
from genline.config.logging import get_logger
from genline.storage.db import Database
from genline.storage.models import Step

log = get_logger("genline.leases")
STEPS = cast(Table, Step.__table__)
_RENEW = (
    update(STEPS)
    .where(
        STEPS.c.id.in_(bindparam("ids", expanding=True)),
        STEPS.c.status == StepStatus.RUNNING.value,
        STEPS.c.lease_owner == bindparam("owner"),
    )
    .values(lease_until=bindparam("until"))
)


def process_owner() -> str:
    """Who holds a lease: this host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class StepLeases:
    """The leases this process holds, and the thread that renews them while it holds any."""

    def __init__(self, db: Database, lease_s: float, owner: str | None = None) -> None:
        self.db, self.lease_s = db, lease_s
        self.owner = owner or process_owner()
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def held(self, step_id: str) -> Iterator[None]:
        """Renew ``step_id``'s lease (taken by the claim) until the block ends."""
        with self._lock:
            self._held.add(step_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew_forever, name="genline-leases", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(step_id)

    def _renew_forever(self) -> None:
        while not self._wake.wait(self.lease_s / 3):
            self.renew()

    def renew(self) -> int:
        """Push every held lease one lease further; returns how many rows were renewed."""
        with self._lock:
            ids = sorted(self._held)
        if not ids:
            return 0
        until = utcnow() + timedelta(seconds=self.lease_s)
        try:
            with self.db.transaction() as s:
                done = s.connection().execute(_RENEW, {"ids": ids, "owner": self.owner, "until": until})
                return done.rowcount
        except Exception as exc:  # noqa: BLE001  # a missed renewal is retried at the next tick
            log.warning("lease_renewal_failed", steps=len(ids), error=type(exc).__name__)
            return 0

    def close(self) -> None:
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
