"""Running the simulator: in a background thread for tests, or in the foreground as a process.

``start_simulator(config)`` serves the app on its own event loop in a daemon thread and returns a
``SimulatorHandle`` (``base_url``, live ``state``, ``config``, ``stop()``; a context manager).
``serve_forever(config, host, port)`` runs until SIGINT or SIGTERM and prints the URL it listens on
(``genline simulator`` in ``cli/`` is its command line).

The faster event loop (uvloop) is used when it is installed; access logging is off.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from genline.config.loop import loop_factory
from genline.provider.simulator.faults import SimConfig
from genline.provider.simulator.server import SimState, build_app

_SHUTDOWN_TIMEOUT_S = 2.0


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown = host if host not in ("0.0.0.0", "::", "") else bound_host
    if ":" in shown:
        shown = f"[{shown}]"
    return runner, f"http://{shown}:{bound_port}"


class SimulatorHandle:
    """A simulator running in a daemon thread; ``stop()`` (or leaving the ``with``) shuts it down."""

    def __init__(
        self, config: SimConfig, host: str = "127.0.0.1", port: int = 0, clock: Callable[[], float] | None = None
    ) -> None:
        self.config = config
        self.state = SimState(config) if clock is None else SimState(config, clock)
        self._loop = loop_factory()()
        self._thread = threading.Thread(target=self._run_loop, name="provider-simulator", daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(_start(build_app(config, self.state), host, port), self._loop)
        try:
            self._runner, self.base_url = future.result(timeout=10)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            raise
        self._stopped = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.close()

    def stop(self) -> None:
        """Stop serving (hanging answers end at once), then end the loop and its thread."""
        if self._stopped:
            return
        self._stopped = True
        self._loop.call_soon_threadsafe(self.state.closing.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=_SHUTDOWN_TIMEOUT_S + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SimulatorHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatorHandle({self.base_url!r})"


def start_simulator(
    config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0, *, clock: Callable[[], float] | None = None
) -> SimulatorHandle:
    """Serve a simulator on ``host:port`` (0 = a free port) in the background; returns once it listens.

    ``clock`` (unix seconds; default ``time.time``) lets a test move job time forward without sleeping.
    """
    return SimulatorHandle(config or SimConfig(), host, port, clock)


async def _serve(config: SimConfig, host: str, port: int) -> None:
    state = SimState(config)
    runner, url = await _start(build_app(config, state), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"provider simulator listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        state.closing.set()
        await runner.cleanup()


def serve_forever(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Serve in the foreground until SIGINT or SIGTERM."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_serve(config or SimConfig(), host, port))
