"""A real S3-compatible server on loopback: moto's server mode in its own OS process, for the
tests, ``make bench`` and ``make chaos`` alike.

    with MotoServer() as server:
        client = make_s3_client(endpoint_url=server.endpoint_url)

The server keeps everything in memory and accepts any credentials; callers still give boto3 dummy
ones (``DUMMY_AWS_ENV``) so nothing on the developer's machine is read or used. Its output goes to
a temporary file removed on stop, or to ``log_path`` (kept) when given.
No pytest fixture lives here: the test modules (or conftest) wrap this in the scope they need.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

# Dummy values for boto3 in tests; moto accepts any. Also points boto3 away from ~/.aws.
DUMMY_AWS_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
UNSET_AWS_ENV: tuple[str, ...] = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MotoServer:
    """Start ``python -m moto.server`` on a free loopback port; stop it on exit."""

    def __init__(self, *, startup_timeout_s: float = 30.0, log_path: Path | None = None) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._keep_log = log_path
        self._log_path: Path | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``; only valid while the server runs."""
        if self._process is None:
            raise RuntimeError("the moto server is not running")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        """Start the server and wait until it answers HTTP; a few ports are tried if one is taken."""
        last_error = ""
        for _ in range(3):
            self.port = free_port()
            if self._keep_log is not None:
                self._log_path = self._keep_log
                log_file = self._log_path.open("ab")
            else:
                fd, log_name = tempfile.mkstemp(prefix="moto-server-", suffix=".log")
                self._log_path = Path(log_name)
                log_file = os.fdopen(fd, "wb")
            env = {**os.environ, **DUMMY_AWS_ENV}
            with log_file:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # a Ctrl-C to the caller is the caller's to handle
                )
            if self._wait_until_up():
                return self
            last_error = self._log_tail()
            self.stop()
        raise RuntimeError(f"moto server did not start; its last output:\n{last_error}")

    def _wait_until_up(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://127.0.0.1:{self.port}/moto-api/"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    response.read()
                return True
            except urllib.error.HTTPError:
                return True  # it answered HTTP, which is all we wait for
            except OSError:
                time.sleep(0.05)
        return False

    def _log_tail(self, limit: int = 4000) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-limit:]

    def stop(self) -> None:
        """Stop the server process (terminate, then kill) and remove its log."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._log_path is not None and self._keep_log is None:
            self._log_path.unlink(missing_ok=True)
        self._log_path = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
