"""Starting and stopping genline's own processes (workers, poller) for the demo and the tests.

Each child is a real OS process running the ``genline`` CLI, with its own log file; stopping asks
politely (SIGTERM), then insists (SIGKILL). Whatever was started is stopped.
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
        for child in self.children:
            if child.alive():
                _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait(5)
        self.children.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
