"""Starting and stopping genline's own processes (workers, poller) for the demo and the tests.

Each child is a real OS process running the ``genline`` CLI, in its own process group, with its own
log file. Stopping asks politely, then insists; whatever was started is stopped:

- SIGTERM goes to each child's main process only. A Celery worker's main process then makes a warm
  shutdown: it stops taking messages, lets its prefork pool finish the steps it is running, acks them
  and joins the pool. Its pool processes must not get the SIGTERM themselves: Celery resets SIGTERM to
  its default in them, so they die at once, in the middle of a step, and one that dies holding the
  pool's queue lock leaves the main process blocked on that lock at exit until it is SIGKILLed. Sent
  to the whole group, as it once was, that made most demos' stops last the full timeout (15 s).
- SIGKILL then goes to each child's whole process group: at once to whatever its main process left
  behind, or after ``timeout`` to a main process that did not finish, with its pool.

A worker's warm shutdown still takes a few seconds on the embedded broker, all of it Celery's own
fixed intervals: its consumer notices the signal only when its current 2 s broker read ends, then
the pool's supervisor (0.8 s), pool processes (up to 1 s) and time-limit thread (1 s) each end at
their next tick.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from genline.config.logging import get_logger

log = get_logger("genline.processes")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class ProcessGroup:
    log_dir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, *args: str) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "genline.cli.main", *args],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def start_worker(self, name: str = "worker", *, queues: str | None = None, concurrency: int = 2) -> Child:
        args = ["worker", "--concurrency", str(concurrency), "--hostname", f"{name}@%h"]
        if queues:
            args += ["--queues", queues]
        return self.start(name, *args)

    def start_poller(self, name: str = "poller") -> Child:
        return self.start(name, "poller")

    def check(self) -> None:
        """Raise if a child died: its log's last lines say why."""
        for child in self.children:
            if not child.alive():
                tail = child.log_path.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n" + "\n".join(tail))

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM each child's main process, wait up to ``timeout`` for them all, then SIGKILL what is
        left in each child's process group (see the module's note)."""
        started = time.monotonic()
        for child in self.children:
            child.proc.send_signal(signal.SIGTERM)  # the main process only; a no-op once it has exited
        deadline = started + timeout
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("process_killed", name=child.name, pid=child.proc.pid, after_s=timeout)
            # A group outlives its leader while any process is in it, and its id is not reused
            # meanwhile: this reaches only what the child left behind.
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait(5)
            log.debug("process_stopped", name=child.name, returncode=child.proc.returncode)
        log.debug("processes_stopped", count=len(self.children), seconds=round(time.monotonic() - started, 2))
        self.children.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
