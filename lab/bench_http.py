"""Raw HTTP yardsticks for the poller: how many ``GET /v1/tasks/{id}`` a second an asyncio HTTP
client can do against the simulator, with nothing else in the way (no database, no gateway).

Also the helper that creates provider tasks in the simulator through its public API, and the
comparison of the poller's reader candidates behind docs/POLL_READER.md (CPU µs a GET, GET/s):

    .venv/bin/python -m lab.bench_http --seconds 4 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import h11
import httpx

from genline.config.loop import loop_factory
from genline.config.loop import run as run_loop
from genline.provider.http_reader import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    ConnectionPool,
    Headers,
    HttpProtocolError,
    ServerDisconnected,
    _Connection,
)
from genline.provider.poll_client import AiohttpTaskReader, HttpTaskReader

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


class _RawReader(HttpTaskReader):
    """The poller's reader with its answers left uninterpreted: the yardstick's raw client."""

    async def read(self, task_id: str) -> tuple[int, bytes]:
        status, _headers, raw = await self._get(self._path(task_id))
        return status, raw


async def reader_rate(
    base_url: str, key: str | None, task_ids: list[str], seconds: float, concurrency: int = CONCURRENCY
) -> tuple[float, int]:
    """The poller's own client (``HttpTaskReader``), bare: a GET and its JSON parsed, nothing else."""
    from genline.config.settings import load_settings

    settings = load_settings({"APIMART_BASE_URL": base_url, "APIMART_API_KEY": key or ""})
    reader = _RawReader(settings, max_connections=concurrency)
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


# --- the poller's reader candidates (docs/POLL_READER.md) ------------------------------------------
class H11Connection(_Connection):
    """``http_reader``'s keep-alive connection with its answers parsed by h11 instead of by hand
    (and its requests written by h11, which must see them to follow the exchange)."""

    request_headers: list[tuple[bytes, bytes]] = []

    def __init__(self) -> None:
        super().__init__()
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.parts: list[bytes] = []
        self.size = 0

    def send(self, request: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[tuple[int, Headers, bytes]]:
        assert self.transport is not None
        self.waiter = loop.create_future()
        self.answered = False
        self.reusable = False
        target = request[4 : request.index(b" ", 4)]
        data = self.h11.send(h11.Request(method=b"GET", target=target, headers=self.request_headers))
        self.transport.write((data or b"") + (self.h11.send(h11.EndOfMessage()) or b""))
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            self.abort()
            return
        self.answered = True
        self.h11.receive_data(data)
        self._events()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        self.h11.receive_data(b"")
        self._events()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ServerDisconnected("closed mid-answer", answered=self.answered))

    def _events(self) -> None:
        try:
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Response):
                    headers = Headers()
                    for name, value in event.headers:
                        key, text = name.decode("latin-1"), value.decode("latin-1")
                        headers[key] = f"{headers[key]}, {text}" if key in headers else text
                    self.status, self.headers = event.status_code, headers
                elif isinstance(event, h11.Data):
                    self.size += len(event.data)
                    if self.size > MAX_BODY_BYTES:
                        raise HttpProtocolError("the answer is too large")
                    self.parts.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    body, self.parts, self.size = b"".join(self.parts), [], 0
                    self.keep_alive = self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
                    if self.keep_alive:
                        self.h11.start_next_cycle()
                    self._finish(body)
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (h11.RemoteProtocolError, HttpProtocolError) as exc:
            self._fail(HttpProtocolError(str(exc)))


class H11TaskReader(HttpTaskReader):
    """``HttpTaskReader`` on h11-parsed connections: the same pool, timeouts, decoding and errors."""

    async def _get(self, path: str) -> tuple[int, Any, bytes]:
        if self._pool is None:
            lines = self._tail.split(b"\r\n")[1:-2]
            headers = [tuple(line.split(b": ", 1)) for line in lines]
            pool = ConnectionPool(
                self._url,
                limit=self._limit,
                connect_timeout_s=self._connect_timeout_s,
                read_timeout_s=self._read_timeout_s,
            )
            pool.connection_class = type("H11Conn", (H11Connection,), {"request_headers": headers})
            self._pool = pool
        return await self._pool.get(b"GET " + path.encode("ascii") + self._tail)


#: The candidates measured, by name: a class taking ``(settings, max_connections=)`` with ``get_task``.
CANDIDATES: dict[str, Any] = {"own": HttpTaskReader, "h11": H11TaskReader, "aiohttp": AiohttpTaskReader}


def _reader(kind: str, base_url: str, key: str | None, concurrency: int) -> Any:
    from genline.config.settings import load_settings

    settings = load_settings({"APIMART_BASE_URL": base_url, "APIMART_API_KEY": key or ""})
    return CANDIDATES[kind](settings, max_connections=concurrency)


async def reader_cost(
    kind: str, base_url: str, key: str | None, task_ids: list[str], seconds: float, concurrency: int = CONCURRENCY
) -> tuple[float, float]:
    """GET/s and CPU µs a GET of this process for one reader candidate's ``get_task`` (request,
    answer framed and decoded, JSON parsed, the task state read: what the poller pays a read)."""
    reader = _reader(kind, base_url, key, concurrency)
    try:

        async def get(task_id: str) -> int:
            state, answer = await reader.get_task(task_id)
            return int(answer.status_code)

        await _drive(get, task_ids[:concurrency], 0.3, concurrency)  # connections up
        cpu, wall = time.process_time(), time.perf_counter()
        rate, errors = await _drive(get, task_ids, seconds, concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if errors:
            raise RuntimeError(f"{errors} {kind} reads failed")
        return rate, cpu / (rate * wall) * 1e6
    finally:
        await reader.aclose()


def compare_readers(seconds: float, rounds: int, concurrency: int) -> dict[str, list[tuple[float, float]]]:
    """Every candidate on asyncio's loop and on uvloop, in turn, ``rounds`` times (interleaved, as
    the machine's speed drifts), against one simulator in its own process."""
    from genline.config.catalog import load_catalog
    from lab.bench_sim import SimProcess

    key = "bench-readers-key"
    runners: list[tuple[str, Callable[[Any], Any]]] = [("asyncio", asyncio.run)]
    uv = _uvloop_runner()
    if uv is not None:
        runners.append(("uvloop", uv))
    out: dict[str, list[tuple[float, float]]] = {}
    config = {"video_seconds": 3600.0, "rate_limit_per_s": 10**9}
    with tempfile.TemporaryDirectory() as tmp, SimProcess(config, api_key=key, log_path=Path(tmp) / "sim.log") as sim:
        model = load_catalog().profiles["standard"].video_models[0]
        ids = sim.make_jobs(2000, model=model)
        for _ in range(rounds):
            for kind in CANDIDATES:
                for loop_name, run in runners:
                    result = run(reader_cost(kind, sim.base_url, key, ids, seconds, concurrency))
                    out.setdefault(f"{kind} ({loop_name})", []).append(result)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU µs a GET and GET/s of the poller's reader candidates")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = parser.parse_args()
    results = compare_readers(args.seconds, args.rounds, args.concurrency)
    print(f"{'reader':<20} {'CPU µs/GET (median, min-max)':>30} {'GET/s (median, min-max)':>30}")
    for name, runs in results.items():
        rates, cpus = [r for r, _ in runs], [c for _, c in runs]
        cpu = f"{statistics.median(cpus):.1f} ({min(cpus):.1f}-{max(cpus):.1f})"
        rate = f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"
        print(f"{name:<20} {cpu:>30} {rate:>30}")


if __name__ == "__main__":
    main()
