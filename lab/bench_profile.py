"""Profiling for ``make bench PROFILE=1`` (``python -m lab.bench --profile``).

py-spy samples a running process from outside (no change to the code measured, little overhead);
its collapsed stacks ("a;b;c count" lines) are summarised here into the share of samples spent
inside each function (inclusive) and in each function's own code (self), and into shares per
library, which is what the report quotes. Without py-spy installed, profiling is skipped with a
note; figures are never affected.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

PROJECT = {"pipelines", "provider", "storage", "tasks", "config", "cli"}
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


class Spy:
    """``py-spy record`` on ``pid`` (and its children) while the ``with`` block runs."""

    def __init__(self, pid: int, out: Path, *, subprocesses: bool = False, rate: int = 250, idle: bool = False) -> None:
        self.pid, self.out, self.subprocesses, self.rate, self.idle = pid, out, subprocesses, rate, idle
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Spy:
        exe = py_spy()
        if exe is None:
            print("  (py-spy is not installed: no profile)", flush=True)
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        args = [
            exe,
            "record",
            "-p",
            str(self.pid),
            "-r",
            str(self.rate),
            "-f",
            "raw",
            "-o",
            str(self.out),
            "--nonblocking",
        ]
        if self.subprocesses:
            args.append("--subprocesses")
        if self.idle:
            args.append("--idle")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for raw in stack.split(";"):
        m = _FRAME.match(raw.strip())
        out.append((m["fn"], m["file"]) if m else (raw.strip(), ""))
    return out


def _library(file: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0].split(".")[0]
    if file.startswith("<") or "/" not in file and file.endswith(".py") is False:
        return "python"
    if "/lib/python3" in file or file.startswith(
        (
            "asyncio/",
            "concurrent/",
            "threading",
            "selectors",
            "socket",
            "json/",
            "ssl",
            "http/",
            "email/",
            "logging/",
            "queue",
            "<frozen",
        )
    ):
        return "stdlib"
    first = file.split("/", 1)[0]
    return first if first else "other"


def summarise(path: Path, *, top: int = 25, focus: str | None = None) -> str:
    """A text table: total samples, top functions by inclusive and self share, and self share by library.

    ``focus``: only stacks that pass through a frame whose function or file contains this text.
    """
    if not path.exists() or path.stat().st_size == 0:
        return f"(no profile at {path})"
    inclusive: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = _frames(stack)
        if focus:
            at = next((i for i, (fn, file) in enumerate(frames) if focus in fn or focus in file), None)
            if at is None:
                continue
            frames = frames[at:]  # the stack from the focus frame down
        count = int(count_text)
        total += count
        seen = set()
        for fn, file in frames:
            name = f"{fn} ({file})"
            if name not in seen:
                inclusive[name] += count
                if file.split("/", 1)[0] in PROJECT:
                    ours[name] += count
                seen.add(name)
        fn, file = frames[-1]
        self_[f"{fn} ({file})"] += count
        libs[_library(file)] += count
    if not total:
        return f"(no samples in {path}{' through ' + focus if focus else ''})"
    lines = [f"{path.name}: {total} samples" + (f" through {focus!r}" if focus else "")]
    lines.append("  self time by library: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in libs.most_common(8)))
    lines.append("  inclusive (top):")
    lines += [f"    {100 * v / total:5.1f}%  {k}" for k, v in inclusive.most_common(top)]
    lines.append("  genline's own functions, inclusive (top):")
    lines += [f"    {100 * v / total:5.1f}%  {k}" for k, v in ours.most_common(top)]
    lines.append("  self (top):")
    lines += [f"    {100 * v / total:5.1f}%  {k}" for k, v in self_.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarise(Path(arg)))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (all its threads); None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, name) of every process on this machine; empty off Linux."""
    out = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            head, _, rest = (entry / "stat").read_text().rpartition(")")
            out.append((int(entry.name), int(rest.split()[1]), head.split("(", 1)[1]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _sum_cpu(pids: list[int]) -> float | None:
    used = [c for c in map(cpu_seconds, pids) if c is not None]
    return sum(used) if used else None


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` and every process below it (a Celery worker and its pool)."""
    children: dict[int, list[int]] = {}
    for child, parent, _ in _processes():
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], ()))
    return _sum_cpu(tree)


def named_cpu_seconds(name: str) -> float | None:
    """CPU seconds of every process on this machine with this name (``postgres``: the server and
    all its backends; ``redis-server``)."""
    return _sum_cpu([pid for pid, _, comm in _processes() if comm == name])


def machine_cpu_seconds() -> float | None:
    """CPU seconds every core of this machine has been busy (not idle, not waiting on I/O)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


class CpuMeter:
    """CPU seconds each named process used while the ``with`` block ran; a process that ended
    meanwhile (a PostgreSQL backend) loses its share, so the figures are lower bounds."""

    def __init__(self, **readers: Any) -> None:
        self.readers: dict[str, Any] = readers
        self.used: dict[str, float] = {}
        self.elapsed_s = 0.0
        self._start: dict[str, float | None] = {}
        self._started = 0.0

    def __enter__(self) -> CpuMeter:
        self._start = {name: read() for name, read in self.readers.items()}
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed_s = time.perf_counter() - self._started
        for name, read in self.readers.items():
            start, end = self._start[name], read()
            if start is not None and end is not None:
                self.used[name] = end - start

    def busy_share(self, name: str = "machine") -> float | None:
        """How busy the cores were on average: ``name``'s CPU seconds ÷ (elapsed × cores)."""
        used, cores = self.used.get(name), os.cpu_count() or 1
        return round(used / (self.elapsed_s * cores), 3) if used is not None and self.elapsed_s else None

    def per(self, count: int, unit: float = 1e6) -> dict[str, float]:
        """Each process's CPU per event (µs by default)."""
        return {name: round(used / count * unit, 1) for name, used in self.used.items()} if count else {}
