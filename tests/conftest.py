"""Shared fixtures: the simulator on a loopback port, settings for a throwaway var folder, a
runtime in drain mode, and the real services (PostgreSQL, Redis, S3-compatible) for integration
tests. On a laptop without those services integration tests skip; with CI=true they fail.

Redis is always the session's own ``redis-server`` on a free port (``own_redis``): the tests never
connect to the machine's shared Redis on 6379, and an audit hook refuses any attempt to."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from genline.config.settings import Settings, load_settings
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimConfig, SimulatorHandle, start_simulator
from genline.storage.migrate import upgrade
from tests.support.redis_server import OwnRedis
from tests.support.s3_server import DUMMY_AWS_ENV, UNSET_AWS_ENV, MotoServer

TEST_KEY = "test-key-" + uuid.uuid4().hex  # made up per run: never a real key
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_HOST, PG_PORT = "127.0.0.1", 5432


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.nodeid.split("::")[0]:
            item.add_marker(pytest.mark.integration)


def require_service(name: str, host: str, port: int) -> None:
    """Skip without the service on a laptop; fail in CI, where it must be there."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc})"
        if IN_CI:
            pytest.fail(f"{message}; CI=true, so this integration test must run", pytrace=False)
        pytest.skip(message)


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    """A fast simulator: jobs complete at their first poll, small results."""
    with start_simulator(SimConfig(api_key=TEST_KEY, image_seconds=0, video_seconds=0, video_bytes=65536)) as handle:
        yield handle


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(base_url: str = "http://127.0.0.1:9", **env: str) -> Settings:
        values = {
            "GENLINE_VAR_DIR": str(tmp_path / "var"),
            "APIMART_BASE_URL": base_url,
            "APIMART_API_KEY": TEST_KEY,
            "GENLINE_POLL_INTERVAL_S": "0.01",
            "GENLINE_PROVIDER_BACKOFF_S": "0.01",
            "GENLINE_PROVIDER_BACKOFF_CAP_S": "0.05",
            "GENLINE_HTTP_TIMEOUT_S": "5",
            "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator (and test servers) on loopback
        }
        values.update(env)
        return load_settings(values)

    return make


@pytest.fixture
def rt(sim: SimulatorHandle, make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    """A runtime on SQLite + local files + the simulator, with the in-memory dispatcher (drain mode)."""
    settings = make_settings(sim.base_url)
    upgrade(settings.database_url)
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def either_rt(
    request: pytest.FixtureRequest, sim: SimulatorHandle, make_settings: Callable[..., Settings]
) -> Iterator[Runtime]:
    """``rt`` on SQLite, and on PostgreSQL (integration): for what each database does its own way."""
    env = {"GENLINE_DATABASE_URL": request.getfixturevalue("pg_url")} if request.param == "postgres" else {}
    settings = make_settings(sim.base_url, **env)
    upgrade(settings.database_url)
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.close()


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    """The default upload folder of ``make_settings``'s (and the CLI tests') var folder: local
    image paths in a request are read only inside GENLINE_UPLOAD_DIRS."""
    folder = tmp_path / "var" / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def product_png(upload_dir: Path) -> Path:
    from genline.provider.simulator.media import png_bytes

    path = upload_dir / "mug.png"
    path.write_bytes(png_bytes(b"mug", 32))
    return path


@pytest.fixture
def request_fields(product_png: Path) -> Callable[..., dict[str, Any]]:
    def make(**changes: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "user_id": "seller-1",
            "feature": "listing-video",
            "description": "Hand-thrown stoneware mug, speckled glaze, 350 ml.",
            "image": str(product_png),
            "profile": "standard",
            "idempotency_key": f"k-{uuid.uuid4().hex}",
        }
        base.update(changes)
        return {k: v for k, v in base.items() if v is not None}

    return make


# --- real services -----------------------------------------------------------------------------
@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    import psycopg

    name = f"genline_test_{uuid.uuid4().hex[:12]}"
    admin = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def require_program(name: str, why: str) -> None:
    """Skip without the program on a laptop; fail in CI, where it must be installed."""
    if shutil.which(name) is not None:
        return
    message = f"{name} is not installed; {why}"
    if IN_CI:
        pytest.fail(f"{message}; CI=true, so this integration test must run", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def own_redis() -> Iterator[OwnRedis]:
    """A ``redis-server`` of the test session's own on a free loopback port (no persistence, its
    files in a temporary folder), stopped and removed at the end. Tests use only this one: the
    machine's shared Redis, if any, is never read, written or flushed."""
    require_program("redis-server", "the Redis tests start their own on a free port")
    with OwnRedis() as server:
        yield server


@pytest.fixture
def redis_url(own_redis: OwnRedis) -> Iterator[str]:
    """Database 0 of the session's own Redis, empty at the start and the end of each test
    (the broker and shared state of a test)."""
    client = own_redis.client()
    client.flushall()
    yield own_redis.url
    client.flushall()
    client.close()


# --- the machine's shared Redis is not the tests' ---------------------------------------------
SHARED_REDIS_PORT = 6379


class SharedRedisTouched(AssertionError):
    """A test tried to connect to the machine's shared Redis; it must use ``redis_url``."""


_GUARD: dict[str, Any] = {"on": False, "attempts": []}


def _refuse_the_shared_redis(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: refuse, in this process, any connection to port 6379 (the shared Redis)."""
    if event != "socket.connect" or not _GUARD["on"]:
        return
    address = args[1]
    if isinstance(address, tuple) and len(address) >= 2 and address[1] == SHARED_REDIS_PORT:
        _GUARD["attempts"].append(address)
        raise SharedRedisTouched(
            f"a test connected to {address[0]}:{SHARED_REDIS_PORT}, the machine's shared Redis; "
            "use the redis_url fixture (the session's own redis-server) instead"
        )


def pytest_configure(config: pytest.Config) -> None:
    # An audit hook cannot be removed, so it is added once per process and switched by the flag.
    if not _GUARD.get("installed"):
        sys.addaudithook(_refuse_the_shared_redis)
        _GUARD["installed"] = True
    _GUARD["on"] = True


def pytest_unconfigure(config: pytest.Config) -> None:
    _GUARD["on"] = False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Even a refused attempt that some library swallowed fails the run."""
    if _GUARD["attempts"]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _GUARD["attempts"]:
        terminalreporter.section("the machine's shared Redis", red=True)
        for host, port, *_ in _GUARD["attempts"]:
            terminalreporter.line(f"a test tried to connect to {host}:{port}; the run fails", red=True)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server for the module that asks (no bucket made), with dummy AWS credentials in
    the environment while it runs (the machine's own credentials unset)."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in DUMMY_AWS_ENV.items():
            env.setenv(name, value)
        for name in UNSET_AWS_ENV:
            env.delenv(name, raising=False)
        with MotoServer() as server:
            yield server.endpoint_url
