"""The poller's doorbell: a LISTEN on PostgreSQL that wakes it when a step hands it a new job.

Without it an idle poller finds a new job at its next idle check (up to a quarter second late,
which was most of an image or video step's overhead). Each ring says when its job is due for its
first poll (``storage.db.wake_poller``), and a napping poller wakes then: earlier than its nap
would end, never later, and not at the ring itself, which would only cost it an empty claim and
a look for the next due job (two transactions) per new job. The doorbell is an optimisation
only: if its connection drops, the poller keeps finding work by its naps and the doorbell
reconnects in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import psycopg

from genline.config.logging import get_logger
from genline.storage.db import NEW_JOBS_CHANNEL, libpq_conninfo

log = get_logger("genline.poller")
RECONNECT_S = 5.0


class Doorbell:
    def __init__(self, database_url: str) -> None:
        self._conninfo = libpq_conninfo(database_url)
        self.rung = asyncio.Event()
        self.due = math.inf  # the earliest due time (epoch seconds) rung since the last wait ended
        self._task: asyncio.Task[None] | None = None

    def ring(self, payload: str = "") -> None:
        """A job is due at ``payload`` (epoch seconds); anything else means now."""
        try:
            due = float(payload)
        except ValueError:
            due = 0.0
        self.due = min(self.due, due if math.isfinite(due) else 0.0)
        self.rung.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NEW_JOBS_CHANNEL}")
                    self.ring()  # anything committed while we were not listening: look now
                    async for notice in conn.notifies():
                        self.ring(notice.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # the naps still find the work
                log.warning("poller_doorbell_lost", error=type(exc).__name__, retry_in_s=RECONNECT_S)
                await asyncio.sleep(RECONNECT_S)

    async def wait(self, stop: asyncio.Event, timeout_s: float, *, early_s: float = 0.0) -> None:
        """Sleep until the timeout, ``early_s`` before the earliest due time rung (before or during
        the nap) or the stop signal, whichever comes first. Rings during the nap for later jobs do
        not wake it."""
        deadline = time.time() + timeout_s
        while not stop.is_set():
            remaining = min(deadline, self.due - early_s) - time.time()
            if remaining <= 0:
                break
            self.rung.clear()
            waiters = [asyncio.ensure_future(self.rung.wait()), asyncio.ensure_future(stop.wait())]
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        self.due = math.inf  # the poller now claims, and then looks up what is due next itself

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
