"""The disruptions of a chaos run: its own Redis, and the hand that kills and restarts things.

- ``OwnRedis`` (tests/support/redis_server.py, the one the tests use too): a ``redis-server`` of
  the run's own on a free loopback port, started with ``--save '' --appendonly no``, so restarting
  it loses every key (messages, unacked messages, shared rate limits and breakers). The machine's
  shared Redis on 6379 is never touched.
- ``fresh_database``: a PostgreSQL database of the run's own, dropped ``WITH (FORCE)`` afterwards.
- ``Disruptor``: starts the worker processes and the poller, SIGKILLs a worker every few seconds
  (and starts it again), kills the poller, restarts Redis and drops every PostgreSQL connection of
  the run's database, each at a planned moment, and keeps a timeline of what it did when.

Every scheduled disruption fires at its time or when its share of the pipelines has ended,
whichever comes first, so each one lands while work is still in flight.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from genline.workers.processes import Child, ProcessGroup
from tests.support.redis_server import OwnRedis

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
HOST = socket.gethostname()  # a lease's owner is host:pid (pipelines/leases.py)
COPYING_SQL = "SELECT lease_owner FROM steps WHERE kind = 'store' AND status = 'running' AND lease_owner IS NOT NULL"


def process_tree(pid: int) -> set[int]:
    """``pid`` and every process below it (a Celery worker and its pool), read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


Say = Callable[[str], None]


@contextlib.contextmanager
def fresh_database(name: str) -> Iterator[str]:
    """``postgresql+psycopg://`` URL of a new database, dropped (connections and all) on exit."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_pg_connections(db_name: str) -> int:
    """Terminate every backend connected to ``db_name``; returns how many there were."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (db_name,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


@dataclass
class Planned:
    """One scheduled disruption: due at ``at_s`` seconds or once ``at_share`` of pipelines ended."""

    what: str  # poller_kill | redis_restart | pg_connections_dropped | worker_sigkill_mid_copy
    at_s: float
    at_share: float


def schedule(
    poller_kills: int, redis_restarts: int, pg_drops: int, first_s: float, gap_s: float, copy_kills: int = 0
) -> list[Planned]:
    """Interleave the disruptions (poller, Redis, PostgreSQL, a worker in mid-copy, poller, ...)
    evenly over the run; the last one is due by the time 80% of the pipelines have ended."""
    kinds = {
        "poller_kill": poller_kills,
        "redis_restart": redis_restarts,
        "pg_connections_dropped": pg_drops,
        "worker_sigkill_mid_copy": copy_kills,
    }
    order: list[str] = []
    while any(kinds.values()):
        for kind in kinds:
            if kinds[kind]:
                order.append(kind)
                kinds[kind] -= 1
    n = len(order)
    return [Planned(kind, first_s + i * gap_s, 0.8 * (i + 1) / (n + 1)) for i, kind in enumerate(order)]


class Disruptor:
    """Owns the worker and poller processes and everything that is done to them."""

    def __init__(
        self,
        group: ProcessGroup,
        redis: OwnRedis,
        db_name: str,
        workers: dict[str, str | None],  # name -> queues (None: all)
        *,
        concurrency: int,
        worker_kill_every_s: float,
        planned: list[Planned],
        say: Say,
        on_kill: Callable[[list[str], float], None] | None = None,
    ) -> None:
        self.group, self.redis, self.db_name = group, redis, db_name
        self.workers, self.concurrency = workers, concurrency
        self.kill_every_s = worker_kill_every_s
        self.planned = list(planned)
        self.say = say
        self.db_conninfo = f"host=127.0.0.1 port=5432 user=postgres dbname={db_name}"
        self.on_kill = on_kill
        self.kills = {
            "worker_sigkill": 0,
            "poller_kill": 0,
            "redis_restart": 0,
            "pg_connections_dropped": 0,
            "worker_sigkill_mid_copy": 0,
            "exited_by_itself": 0,
        }
        self.timeline: list[dict[str, Any]] = []
        self._started = time.monotonic()
        self._next_worker_kill = self._started + worker_kill_every_s
        self._worker_turn = 0

    # --- processes -------------------------------------------------------------------------------
    def start_all(self) -> None:
        for name in self.workers:
            self._start(name)
        self._start("poller")
        self._started = time.monotonic()
        self._next_worker_kill = self._started + self.kill_every_s

    def _start(self, name: str) -> Child:
        if name == "poller":
            return self.group.start_poller()
        return self.group.start_worker(name, queues=self.workers[name], concurrency=self.concurrency)

    def _sigkill(self, name: str) -> None:
        for child in [c for c in self.group.children if c.name == name]:
            pids = process_tree(child.proc.pid)
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait(10)
            self.group.children.remove(child)
            if self.on_kill is not None and name != "poller":
                self.on_kill([f"{HOST}:{pid}" for pid in pids], time.monotonic())

    def _worker_copying(self) -> str | None:
        """The name of a worker that holds a running copy right now (its lease says which process)."""
        try:
            with psycopg.connect(self.db_conninfo, connect_timeout=5) as conn:
                owners = [r[0] for r in conn.execute(COPYING_SQL)]
        except psycopg.Error:
            return None
        for name in self.workers:
            child = next((c for c in self.group.children if c.name == name and c.alive()), None)
            if child is not None and {f"{HOST}:{pid}" for pid in process_tree(child.proc.pid)} & set(owners):
                return name
        return None

    # --- the disruptions -------------------------------------------------------------------------
    def tick(self, terminal: int, total: int) -> None:
        """Do whatever is due now: a worker kill on its cadence, the next planned disruption,
        and a restart of any child that died by itself."""
        now = time.monotonic()
        if terminal >= total:
            return
        if now >= self._next_worker_kill:
            names = list(self.workers)
            name = names[self._worker_turn % len(names)]
            self._worker_turn += 1
            self._sigkill(name)
            self._start(name)
            self._record("worker_sigkill", terminal, name=name)
            self._next_worker_kill = now + self.kill_every_s
        share = terminal / total if total else 1.0
        while self.planned and (now - self._started >= self.planned[0].at_s or share >= self.planned[0].at_share):
            if not self._do(self.planned[0].what, terminal):
                break  # not possible this instant (no copy running): due again at the next tick
            self.planned.pop(0)
        self._restart_dead(terminal)

    def _do(self, what: str, terminal: int) -> bool:
        """Carry out one planned disruption; False when it cannot be done this instant."""
        if what == "poller_kill":
            self._sigkill("poller")
            time.sleep(1.0)  # a moment with no poller at all: leases must expire, nothing is lost
            self._start("poller")
            self._record(what, terminal)
        elif what == "redis_restart":
            self.redis.restart(down_s=2.0)
            self._record(what, terminal, data_kept=OwnRedis.data_kept, down_s=2.0)
        elif what == "worker_sigkill_mid_copy":
            name = self._worker_copying()
            if name is None:
                return False
            self._sigkill(name)
            self._start(name)
            self._record(what, terminal, name=name)
        elif what == "pg_connections_dropped":
            dropped = drop_pg_connections(self.db_name)
            self._record(what, terminal, connections_terminated=dropped)
        else:  # pragma: no cover - schedule() makes only the kinds above
            raise ValueError(what)
        return True

    def _restart_dead(self, terminal: int) -> None:
        """A child that died without being killed here is started again, and counted: it is a
        finding (a worker that cannot survive a Redis restart, say), not something to hide."""
        for child in list(self.group.children):
            if not child.alive():
                tail = child.log_path.read_text(errors="replace").splitlines()[-3:]
                self._sigkill(child.name)
                self._start(child.name)
                self._record("exited_by_itself", terminal, name=child.name, code=child.proc.returncode, tail=tail)

    def _record(self, what: str, terminal: int, **detail: Any) -> None:
        self.kills[what] += 1
        at = round(time.monotonic() - self._started, 1)
        self.timeline.append({"t_s": at, "what": what, "terminal_then": terminal, **detail})
        extra = " ".join(f"{k}={v}" for k, v in detail.items() if k != "tail")
        self.say(f"chaos: {at:6.1f}s  {what} {extra}".rstrip())

    def unfinished(self) -> list[str]:
        """Planned disruptions that never happened (the run ended or timed out first)."""
        return [p.what for p in self.planned]
