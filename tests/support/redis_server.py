"""A ``redis-server`` of the caller's own on a free loopback port, for the tests and ``make chaos``.

    with OwnRedis() as server:
        client = server.client()          # redis://127.0.0.1:<port>/0; server.url_for(3) for db 3

It is started with ``--save '' --appendonly no`` and its working directory in a temporary folder,
so it writes nothing anywhere else, and restarting it (``restart``) loses every key, as a crash
would. The machine's shared Redis (6379, or wherever it runs) is never touched: whatever a test
flushes or writes is on this server. ``close`` (or leaving the ``with``) stops the process and
removes the temporary folder; its log goes there too unless ``log_dir`` is given (kept).
No pytest fixture lives here: tests/conftest.py wraps this in a session-scoped one.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis as redis_lib

from tests.support.s3_server import free_port

REDIS_SERVER = "redis-server"


def redis_server_installed() -> bool:
    return shutil.which(REDIS_SERVER) is not None


class OwnRedis:
    """A Redis of the caller's own, so flushing or restarting it disturbs nothing else on the machine."""

    data_kept = False  # --save '' --appendonly no: a restart starts empty

    def __init__(self, log_dir: Path | None = None, *, startup_timeout_s: float = 15.0) -> None:
        self.port = 0
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._log_dir = log_dir

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """``redis://127.0.0.1:<port>/<db>``: a database number of this server."""
        if not self.port:
            raise RuntimeError("the Redis server has not been started")
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def log_path(self) -> Path:
        return (self._log_dir or self._workdir()) / "redis.log"

    def client(self, db: int = 0) -> redis_lib.Redis:
        return redis_lib.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    def _workdir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="genline-redis-"))
        return self._tmp

    def start(self) -> OwnRedis:
        """Start the server and wait until it answers PING. The first start tries a few free ports
        (another process may take one between the check and the bind); a restart keeps its port,
        so clients reconnect to the same URL."""
        if not redis_server_installed():
            raise RuntimeError(f"{REDIS_SERVER} is not on the PATH")
        keep_port = bool(self.port)
        error = ""
        for _ in range(1 if keep_port else 3):
            if not keep_port:
                self.port = free_port()
            error = self._start_once()
            if not error:
                return self
        self.port = self.port if keep_port else 0
        raise RuntimeError(error)

    def _start_once(self) -> str:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self._workdir())]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                return f"{REDIS_SERVER} exited with {code}; its log ({self.log_path}) ends:\n{self._log_tail()}"
            with contextlib.suppress(redis_lib.RedisError), self.client() as conn:
                if conn.ping():
                    return ""
            time.sleep(0.05)
        self.stop()
        return f"{REDIS_SERVER} did not answer on port {self.port} within {self.startup_timeout_s:g} s"

    def _log_tail(self, limit: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-limit:]
        return ""

    def stop(self) -> None:
        """SIGKILL: nothing is saved, as in a crash. The temporary folder stays (for a restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary folder (and the log in it)."""
        self.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> OwnRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
