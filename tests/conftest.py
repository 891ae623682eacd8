"""Shared fixtures: the simulator on a loopback port, settings for a throwaway var folder, a
runtime in drain mode, and the real services (PostgreSQL, Redis, S3-compatible) for integration
tests. On a laptop without those services integration tests skip; with CI=true they fail."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from genline.config.settings import Settings, load_settings
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimConfig, SimulatorHandle, start_simulator
from genline.storage.migrate import upgrade

TEST_KEY = "test-key-" + uuid.uuid4().hex  # made up per run: never a real key
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


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
def product_png(tmp_path: Path) -> Path:
    from genline.provider.simulator.media import png_bytes

    path = tmp_path / "mug.png"
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


def _own_redis_db(number: int) -> Iterator[str]:
    """A Redis database number of the tests' own, emptied before and after."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    import redis

    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """Redis database 13 (the broker and shared state of integration tests)."""
    yield from _own_redis_db(13)


@pytest.fixture
def redis_db9() -> Iterator[str]:
    """Redis database 9 (the gateway's shared-state tests)."""
    yield from _own_redis_db(9)
