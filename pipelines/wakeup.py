"""The poller's doorbell: a LISTEN on PostgreSQL that wakes it when a step hands it a new job.

Without it an idle poller finds a new job at its next idle check (up to a quarter second late,
which was most of an image or video step's overhead). With it the poller wakes at the commit,
works out when the new job is due and sleeps exactly that long. The doorbell is an optimisation
only: if its connection drops, the poller keeps finding work by its naps and the doorbell
reconnects in the background.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg

from config.logging import get_logger
from storage.db import NEW_JOBS_CHANNEL, libpq_conninfo

log = get_logger("genline.poller")
RECONNECT_S = 5.0


class Doorbell:
    def __init__(self, database_url: str) -> None:
        self._conninfo = libpq_conninfo(database_url)
        self.rung = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NEW_JOBS_CHANNEL}")
                    self.rung.set()  # anything committed while we were not listening
                    async for _ in conn.notifies():
                        self.rung.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # the naps still find the work
                log.warning("poller_doorbell_lost", error=type(exc).__name__, retry_in_s=RECONNECT_S)
                await asyncio.sleep(RECONNECT_S)

    async def wait(self, stop: asyncio.Event, timeout_s: float) -> None:
        """Sleep until the timeout, a ring or the stop signal, whichever comes first."""
        if self.rung.is_set():
            self.rung.clear()
            return
        waiters = [asyncio.ensure_future(self.rung.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self.rung.clear()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
