"""Shared state where Redis is not the broker (the zero-setup default): the pause of paid work, the
alerts, the rate limit and the breakers live in the database, so every process sees the same."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import update

from genline.config.clock import utcnow
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.runtime import Runtime
from genline.provider.shared_state import DatabaseSharedState
from genline.provider.simulator import SimulatorHandle
from genline.provider.stages import PAUSE_KEY
from genline.storage.db import Database
from genline.storage.models import ProviderJob
from genline.workers.drain import drain
from genline.workers.poller import Poller


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENLINE_", "APIMART_"))}
    env |= {"GENLINE_VAR_DIR": str(settings.var_dir), "APIMART_API_KEY": "not-used"}
    return subprocess.run(
        [sys.executable, "-m", "genline", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_a_402_in_one_process_pauses_paid_work_for_every_process_and_the_cli_sees_and_lifts_it(
    rt: Runtime, sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    httpx.post(
        f"{sim.base_url}/_sim/faults",
        json={"script": [{"method": "POST", "path": "/v1/images/generations", "status": 402, "times": 1}]},
    ).raise_for_status()
    api = Genline(runtime=rt)
    api.submit(request_fields())
    drain(rt)

    other = Runtime.from_settings(rt.settings)  # another worker process: its own engine and state
    try:
        assert other.shared.get(PAUSE_KEY) == "provider_insufficient_balance"
        shown = _cli(rt.settings, "provider", "status", "--json")
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert status["paused"] == "provider_insufficient_balance"
        assert status["alerts"]["provider_paused"] == 1

        lifted = _cli(rt.settings, "provider", "resume")
        assert lifted.returncode == 0, lifted.stderr
        assert other.shared.get(PAUSE_KEY) is None and rt.shared.get(PAUSE_KEY) is None
    finally:
        other.close()


def test_the_database_token_bucket_hands_out_no_more_tokens_than_it_holds_to_concurrent_callers(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    from genline.storage.migrate import upgrade

    upgrade(settings.database_url)
    states = [DatabaseSharedState(Database(settings.database_url), clock=lambda: 1000.0) for _ in range(4)]
    try:
        with ThreadPoolExecutor(8) as pool:
            waits = list(pool.map(lambda i: states[i % 4].take_token("rate:test", 1.0, 20.0), range(60)))
        assert sum(1 for w in waits if w == 0) == 20  # the burst, and not one token more
        assert all(w > 0 for w in waits if w != 0)
    finally:
        for state in states:
            state.close()


def test_values_expire_and_counters_count_across_instances(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    from genline.storage.migrate import upgrade

    upgrade(settings.database_url)
    now = [1000.0]
    a = DatabaseSharedState(Database(settings.database_url), clock=lambda: now[0])
    b = DatabaseSharedState(Database(settings.database_url), clock=lambda: now[0])
    try:
        a.set("paused:x", "why", 10)
        assert b.get("paused:x") == "why"
        assert b.set_if_absent("paused:x", "other", 10) is False
        assert [a.incr("alerts:x", 60), b.incr("alerts:x", 60)] == [1, 2]
        now[0] += 11
        assert b.get("paused:x") is None and a.set_if_absent("paused:x", "again", 10) is True
        assert b.delete_existing("paused:x", "missing") == ["paused:x"]
    finally:
        a.close()
        b.close()


def test_a_poller_refused_with_401_pauses_paid_work_alerts_once_and_stops_reading_until_resumed(
    rt: Runtime, sim: SimulatorHandle, request_fields: Callable[..., dict[str, Any]]
) -> None:
    httpx.post(f"{sim.base_url}/_sim/config", json={"image_seconds": 600}).raise_for_status()
    api = Genline(runtime=rt)
    for _ in range(3):
        api.submit(request_fields())
    drain(rt, max_rounds=12)  # copies written, images submitted; the renders take ten minutes
    with rt.db.transaction() as s:
        s.execute(update(ProviderJob).values(next_poll_at=utcnow() - timedelta(seconds=1)))
    httpx.post(
        f"{sim.base_url}/_sim/faults",
        json={"script": [{"method": "GET", "path": "/v1/tasks/*", "status": 401, "times": 1000}]},
    ).raise_for_status()

    def reads() -> int:
        return int(httpx.get(f"{sim.base_url}/_sim/stats").json()["requests_by_status"].get("401", 0))

    poller = Poller(rt)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(poller.run_once()) == 3  # every due job read once, each refused
        assert rt.shared.get(PAUSE_KEY) == "provider_auth_failed"
        assert rt.shared.get("alerts:provider_paused") == "1"  # one alert, not one per job
        refused = reads()
        with rt.db.transaction() as s:
            s.execute(update(ProviderJob).values(next_poll_at=utcnow() - timedelta(seconds=1)))
        for _ in range(5):
            assert loop.run_until_complete(poller.run_once()) == 0  # holding: nothing is read
        assert reads() == refused

        rt.shared.delete(PAUSE_KEY)  # `genline provider resume`, after the key was fixed
        httpx.post(f"{sim.base_url}/_sim/faults", json={"script": [], "replace": True}).raise_for_status()
        assert loop.run_until_complete(poller.run_once()) == 3
        assert poller.held_since is None
    finally:
        loop.run_until_complete(poller.aclose())
        loop.close()
