"""The provider simulator in its own OS process, for benchmarks.

A simulator in a thread of the measuring process would share its interpreter lock with the code
being measured; in its own process it has a core to itself and is talked to over loopback only.

    with SimProcess({"video_seconds": 0}, api_key=key) as sim:
        sim.base_url, sim.configure(rate_limit_per_s=10**6), sim.stats()
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

_CHILD = """
import json, os, sys
from genline.provider.simulator.faults import SimConfig
from genline.provider.simulator.runner import serve_forever
config = json.loads(os.environ.pop("BENCH_SIM_CONFIG"))
config["api_key"] = os.environ.pop("BENCH_SIM_KEY", None)
serve_forever(SimConfig(**config), "127.0.0.1", 0)
"""


class SimProcess:
    """``python -m`` the simulator on a free loopback port; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, config: dict[str, Any], *, api_key: str | None, log_path: Path) -> None:
        self.config = config
        self.api_key = api_key
        self.log_path = log_path
        self.base_url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout_s: float = 30.0) -> SimProcess:
        env = {**os.environ, "BENCH_SIM_CONFIG": json.dumps(self.config)}
        if self.api_key is not None:
            env["BENCH_SIM_KEY"] = self.api_key
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline:  # one line: "provider simulator listening on <url>"
            line = self.proc.stdout.readline()
            if line or self.proc.poll() is not None:
                break
        text = line.decode(errors="replace").strip()
        if "listening on " not in text:
            self.stop()
            raise RuntimeError(f"the simulator did not start: {text!r}; see {self.log_path}")
        self.base_url = text.rsplit(" ", 1)[-1]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def configure(self, **changes: Any) -> Any:
        return self._admin("POST", "/_sim/config", changes)

    def stats(self) -> Any:
        return self._admin("GET", "/_sim/stats")

    def task(self, task_id: str) -> Any:
        return self._admin("GET", f"/_sim/tasks/{task_id}")

    def make_jobs(self, count: int, *, model: str, kind: str = "video", key_prefix: str | None = None) -> list[str]:
        """``count`` jobs made in one admin request (``POST /_sim/jobs``), as that many submits of
        ``create_tasks`` would make them; their task ids, in order."""
        body = {"kind": kind, "count": count, "model": model, "prompt": "bench product reveal"}
        if key_prefix is not None:
            body["key_prefix"] = key_prefix
        ids: list[str] = self._admin("POST", "/_sim/jobs", body)["task_ids"]
        return ids

    def reset(self) -> Any:
        return self._admin("POST", "/_sim/reset", {})

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
