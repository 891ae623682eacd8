"""Logs are JSON lines without secrets; an application that asked is told when its pipeline ends."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from genline.config.logging import configure_logging, get_logger, register_secret
from genline.pipelines.api import Genline
from genline.pipelines.runtime import Runtime
from genline.workers.drain import drain


def test_log_lines_are_json_and_never_carry_the_key() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    register_secret("sk-never-show-me-123")
    log = get_logger("test")
    log.info("calling_provider", url="https://x/?k=sk-never-show-me-123", authorization="Bearer abc", step_id="st_1")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["event"] == "calling_provider" and lines[0]["step_id"] == "st_1"
    assert "sk-never-show-me-123" not in out.getvalue() and "Bearer abc" not in out.getvalue()
    configure_logging("INFO")


@pytest.fixture
def callback_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  # the http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


def test_the_callback_url_hears_the_end_of_the_pipeline(
    rt: Runtime, request_fields: Callable[..., dict[str, Any]], callback_server: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = callback_server
    pid = Genline(runtime=rt).submit(request_fields(callback_url=url)).pipeline_id
    drain(rt)
    assert received == [{"pipeline_id": pid, "status": "succeeded", "error_code": None}]
