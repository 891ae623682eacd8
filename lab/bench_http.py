"""Raw HTTP yardsticks for the poller: how many ``GET /v1/tasks/{id}`` a second an asyncio HTTP
client can do against the simulator, with nothing else in the way (no database, no gateway).

Also the helper that creates provider tasks in the simulator through its public API.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx

from genline.config.loop import loop_factory
from genline.config.loop import run as run_loop

CONCURRENCY = 64


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def create_tasks(
    base_url: str,
    key: str | None,
    count: int,
    *,
    kind: str = "video",
    model: str,
    body: dict[str, Any] | None = None,
    concurrency: int = 32,
    prefix: str = "bench",
) -> list[str]:
    """Submit ``count`` jobs (each with its own idempotency key) and return their task ids, in order."""
    ids: list[str] = [""] * count
    counter = itertools.count()
    path = f"/v1/{kind}s/generations"
    payload = {"model": model, "prompt": "bench product reveal", **(body or {})}

    async def one(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if i >= count:
                return
            headers = {**_auth(key), "Idempotency-Key": f"{prefix}-{i}"}
            async with session.post(base_url + path, json=payload, headers=headers) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"simulator refused a submit: {response.status} {answer}")
            data = answer["data"]
            ids[i] = data[0]["task_id"] if isinstance(data, list) else data["id"]

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(concurrency)))
    return ids


async def _drive(
    get: Callable[[str], Awaitable[int]], task_ids: list[str], seconds: float, concurrency: int
) -> tuple[float, int]:
    """Requests/s of ``concurrency`` loops calling ``get`` until ``seconds`` have passed."""
    done = 0
    errors = 0
    ids = itertools.cycle(task_ids)
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            status = await get(next(ids))
            done += 1
            errors += status != 200

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.perf_counter() - started), errors


async def aiohttp_rate(
    base_url: str, key: str | None, task_ids: list[str], seconds: float, concurrency: int = CONCURRENCY
) -> tuple[float, int]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, connector=connector, headers=_auth(key)) as session:

        async def get(task_id: str) -> int:
            async with session.get(f"/v1/tasks/{task_id}") as response:
                await response.json()
                return response.status

        await _drive(get, task_ids[:concurrency], 0.3, concurrency)  # connections up
        return await _drive(get, task_ids, seconds, concurrency)


async def httpx_rate(
    base_url: str, key: str | None, task_ids: list[str], seconds: float, concurrency: int = CONCURRENCY
) -> tuple[float, int]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=_auth(key), limits=limits) as client:

        async def get(task_id: str) -> int:
            response = await client.get(f"/v1/tasks/{task_id}")
            response.json()
            return response.status_code

        await _drive(get, task_ids[:concurrency], 0.3, concurrency)
        return await _drive(get, task_ids, seconds, concurrency)


async def reader_rate(
    base_url: str, key: str | None, task_ids: list[str], seconds: float, concurrency: int = CONCURRENCY
) -> tuple[float, int]:
    """The poller's own client (``HttpTaskReader``), bare: a GET and its JSON parsed, nothing else."""
    from genline.config.settings import load_settings
    from genline.provider.poll_client import HttpTaskReader

    settings = load_settings({"APIMART_BASE_URL": base_url, "APIMART_API_KEY": key or ""})
    reader = HttpTaskReader(settings, max_connections=concurrency)
    try:

        async def get(task_id: str) -> int:
            status, raw = await reader.read(task_id)
            json.loads(raw)
            return status

        await _drive(get, task_ids[:concurrency], 0.3, concurrency)
        return await _drive(get, task_ids, seconds, concurrency)
    finally:
        await reader.aclose()


def _uvloop_runner() -> Callable[[Any], Any] | None:
    """``config.loop.run`` when it runs on uvloop; None when uvloop is not installed."""
    return None if loop_factory() is asyncio.new_event_loop else run_loop


def raw_http_rates(
    base_url: str, key: str | None, task_ids: list[str], seconds: float, *, quick: bool = False
) -> dict[str, float]:
    """GET/s of each asyncio client at its best concurrency tried, one after the other, each on a fresh
    event loop: aiohttp, httpx and the poller's own ``HttpTaskReader`` on asyncio's loop, and aiohttp
    and ``HttpTaskReader`` on uvloop where uvloop is installed. The yardstick is the fastest of them."""
    runs: list[tuple[str, Callable[..., Any], Callable[[Any], Any], tuple[int, ...]]] = [
        ("aiohttp", aiohttp_rate, asyncio.run, (64,) if quick else (16, 64)),
        ("httpx", httpx_rate, asyncio.run, (4,) if quick else (4, 64)),
        ("genline_reader", reader_rate, asyncio.run, (64,) if quick else (16, 64)),
    ]
    uv = _uvloop_runner()
    if uv is not None:
        runs.append(("aiohttp_uvloop", aiohttp_rate, uv, (64,) if quick else (16, 64)))
        runs.append(("genline_reader_uvloop", reader_rate, uv, (64,) if quick else (16, 64)))
    out: dict[str, float] = {}
    for name, fn, run, levels in runs:
        for concurrency in levels:
            rate, errors = run(fn(base_url, key, task_ids, seconds, concurrency))
            if errors:
                raise RuntimeError(f"{errors} raw {name} GETs failed; is the simulator's rate limit raised?")
            out[name] = max(out.get(name, 0.0), rate)
    return out
