"""Secrets at rest and on screen: a provider's error text that echoes the API key (or a password, or
a terminal's escape sequences) is scrubbed before it is stored in a step, a pipeline or a provider
job, so neither `genline status`, its `--json`, nor the Python API shows it; `genline config` masks
the password of every URL it prints."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from genline.config.logging import scrub_text
from genline.config.settings import KNOWN_ENV, Settings, load_settings
from genline.pipelines.api import Genline
from genline.pipelines.runtime import Runtime
from genline.storage.migrate import upgrade
from tests.conftest import TEST_KEY
from tests.support.cli import invoke
from tests.support.drive import nudges

ESCAPES = "\x1b[2J\x1b]0;owned\x07\r"
ECHOED = f"Incorrect API key provided: {TEST_KEY}. Retry at https://ops:hunter22@status.example.com/{ESCAPES}"


class EchoingProvider(BaseHTTPRequestHandler):
    """A provider that refuses every request with a message echoing the key it was sent."""

    def do_POST(self) -> None:  # noqa: N802  # the standard library's name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps(
            {"error": {"message": ECHOED, "type": "invalid_request_error", "code": "invalid_request"}}
        ).encode()
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def echoing_provider() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoingProvider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def echo_rt(echoing_provider: str, make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    settings = make_settings(echoing_provider, GENLINE_PROVIDER_MAX_ATTEMPTS="1")
    upgrade(settings.database_url)
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.close()


def _run_to_the_end(rt: Runtime) -> None:
    from genline.pipelines.engine import run_step

    for _ in range(50):
        step_id = nudges(rt).pop()
        if step_id is None:
            return
        run_step(rt, step_id)


@pytest.fixture(autouse=True)
def no_stray_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sees only the settings a test gives it."""
    for name in list(os.environ):
        if name.startswith(("GENLINE_", "APIMART_")):
            monkeypatch.delenv(name)


def _env(values: dict[str, str]) -> dict[str, str]:
    if "GENLINE_ALLOW_PRIVATE_HOSTS" in KNOWN_ENV:  # the scripted provider listens on loopback
        values = {"GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1", **values}
    return values


def _all_text(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return "\n".join(conn.iterdump())


def test_a_provider_error_echoing_the_key_is_scrubbed_in_every_row_and_every_view(
    echo_rt: Runtime, request_fields: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    api = Genline(runtime=echo_rt)
    pid = api.submit(request_fields()).pipeline_id
    _run_to_the_end(echo_rt)
    status = api.status(pid)
    assert status["status"] == "failed", status
    failed = [st for st in status["steps"] if st["error"]]
    assert failed, status
    shown = json.dumps(status)
    assert "Incorrect API key provided" in shown  # the provider's words are kept, the secrets are not
    for secret in (TEST_KEY, "hunter22"):
        assert secret not in shown
        assert secret not in _all_text(tmp_path / "var" / "genline.db")  # pipelines, steps, provider_jobs

    env = _env(
        {
            "GENLINE_VAR_DIR": str(tmp_path / "var"),
            "APIMART_BASE_URL": echo_rt.settings.provider_base_url,
            "APIMART_API_KEY": TEST_KEY,
        }
    )
    as_json = invoke(["status", pid, "--json"], env)
    assert as_json.exit_code == 0, as_json.output
    assert TEST_KEY not in as_json.stdout and "hunter22" not in as_json.stdout
    assert "\x1b" not in as_json.stdout  # JSON escapes it
    for_people = invoke(["status", pid], env)
    assert for_people.exit_code == 0, for_people.output
    assert TEST_KEY not in for_people.stdout and "hunter22" not in for_people.stdout
    assert "\x1b" not in for_people.stdout and "\r" not in for_people.stdout and "\x07" not in for_people.stdout
    assert "\\x1b[2J" in for_people.stdout  # shown, escaped


def test_the_scrubber_masks_registered_secrets_url_passwords_and_bearer_tokens() -> None:
    # TEST_KEY is registered by every runtime the tests make (and by load_settings)
    load_settings({"APIMART_API_KEY": TEST_KEY, "GENLINE_VAR_DIR": "/tmp/unused-genline-var"})
    text = f"key {TEST_KEY}; at redis://:s3cr3tpw@cache:6379/0; Authorization: Bearer abc.DEF-123_x"
    scrubbed = scrub_text(text)
    assert scrubbed is not None
    assert TEST_KEY not in scrubbed and "s3cr3tpw" not in scrubbed and "abc.DEF-123_x" not in scrubbed
    assert "redis://:********@cache:6379/0" in scrubbed and "Bearer ********" in scrubbed
    assert scrub_text(None) is None


def test_a_password_in_a_configured_url_is_registered_as_a_secret() -> None:
    load_settings(
        {
            "GENLINE_VAR_DIR": "/tmp/unused-genline-var",
            "APIMART_BASE_URL": "https://gateway:pw-in-the-base-url@api.example.com",
        }
    )
    assert scrub_text("a message naming pw-in-the-base-url") == "a message naming ********"


@pytest.mark.parametrize(
    ("variable", "value", "shown"),
    [
        ("APIMART_BASE_URL", "https://user:pass-123@api.example.com", "https://user:***@api.example.com"),
        (
            "GENLINE_DATABASE_URL",
            "postgresql+psycopg://app:pg-pass@db:5432/g",
            "postgresql+psycopg://app:***@db:5432/g",
        ),
        ("GENLINE_BROKER_URL", "redis://:redis-pass@cache:6379/0", "redis://:***@cache:6379/0"),
        ("GENLINE_S3_ENDPOINT_URL", "http://minio:minio-pass@minio:9000", "http://minio:***@minio:9000"),
    ],
)
def test_config_masks_the_password_of_every_url(tmp_path: Path, variable: str, value: str, shown: str) -> None:
    result = invoke(["config"], _env({"GENLINE_VAR_DIR": str(tmp_path / "var"), variable: value}))
    assert result.exit_code == 0, result.output
    password = value.split("@")[0].rsplit(":", 1)[1]
    assert password not in result.output
    assert shown in result.output
