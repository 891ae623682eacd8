"""The long-running parts: ``worker``, ``poller``, ``simulator``, ``flower``, and ``db upgrade``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
from typing import Any

import click

from genline.cli.output import fail
from genline.config.constants import ALL_QUEUES
from genline.config.errors import GenlineError
from genline.config.logging import configure_logging
from genline.config.loop import run as run_loop
from genline.config.settings import load_settings


def _settings() -> Any:
    try:
        settings = load_settings()
    except GenlineError as err:
        fail(err, as_json=False)
    configure_logging(settings.log_level)
    return settings


def _ready(settings: Any) -> None:
    """Start-up checks of a long-running part: the database exists, answers and has genline's
    schema; the broker, the bucket and the provider key answer (waiting up to
    GENLINE_STARTUP_WAIT_S for a part that does not answer yet). A failure is a plain error with
    its code (exit 2), not a traceback, and a SQLite file that is not there is not created (nor its
    folder) only to be found empty."""
    from genline.config.boundary import check_ready, wait_until_ready
    from genline.storage.db import Database
    from genline.storage.migrate import require_current, require_database

    def check() -> None:
        require_database(settings.database_url, var_dir=settings.var_dir)
        db = Database(settings.database_url)
        try:
            db.check()
        finally:
            db.dispose()
        require_current(settings.database_url, var_dir=settings.var_dir)
        check_ready(settings, provider_key=True)  # broker, bucket and key answer (config/boundary.py)

    try:
        wait_until_ready(check, settings.startup_wait_s)  # a part restarting with us: GENLINE_STARTUP_WAIT_S
    except GenlineError as err:
        fail(err, as_json=False)


def _count_in_shared_files(settings: Any) -> None:
    """Prometheus counts of this process and every prefork child it starts go to files of their
    own under GENLINE_METRICS_DIR (PROMETHEUS_MULTIPROC_DIR, set and cleared here), which
    ``genline metrics`` adds up: one child's counts alone would be a fraction of the truth."""
    from genline.provider.metrics import metrics_root, use_process_dir

    use_process_dir(metrics_root(settings))


@click.command()
@click.option(
    "--queues",
    "-Q",
    default=",".join(ALL_QUEUES),
    show_default=True,
    help="Comma-separated queues this worker serves (one kind of work per worker scales best).",
)
@click.option("--concurrency", "-c", type=int, default=None, help="Worker processes [GENLINE_WORKER_CONCURRENCY].")
@click.option("--hostname", "-n", default=None, help="Celery node name, e.g. media@%h.")
@click.option("--loglevel", default="WARNING", show_default=True, help="Celery's own log level.")
def worker(queues: str, concurrency: int | None, hostname: str | None, loglevel: str) -> None:
    """Run a Celery worker for genline's steps (late acks, prefetch 1)."""
    settings = _settings()
    unknown = sorted(set(queues.split(",")) - set(ALL_QUEUES))
    if unknown:
        raise click.BadParameter(f"unknown queue {unknown[0]}; known: {', '.join(ALL_QUEUES)}", param_hint="--queues")
    from genline.tasks.task import celery_app

    _ready(settings)
    _count_in_shared_files(settings)
    app = celery_app(settings)
    argv = [
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency or settings.worker_concurrency),
        "--loglevel",
        loglevel,
        "--without-mingle",
        "--without-gossip",
    ]
    if hostname:
        argv += ["-n", hostname]
    app.worker_main(argv)


@click.command()
@click.option("--once", is_flag=True, help="Poll the jobs that are due once, then exit.")
def poller(once: bool) -> None:
    """Watch in-flight provider jobs (every GENLINE_POLL_INTERVAL_S) and move finished ones on.
    Also runs the sweeper that re-sends lost step messages."""
    settings = _settings()
    from genline.pipelines.runtime import Runtime
    from genline.tasks.app import CeleryDispatcher, make_celery
    from genline.workers.broker import prune_delivered
    from genline.workers.poller import Poller

    _ready(settings)
    _count_in_shared_files(settings)
    rt = Runtime.from_settings(settings, CeleryDispatcher(make_celery(settings)))
    the_poller = Poller(rt)

    async def main() -> None:
        if once:
            await the_poller.run_once()
            await the_poller.aclose()
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def housekeeping() -> None:
            while not stop.is_set():
                await asyncio.to_thread(prune_delivered, settings)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=30)

        await asyncio.gather(the_poller.run(stop), housekeeping())

    run_loop(main())  # uvloop where installed (config/loop.py)
    rt.close()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8750, show_default=True, type=int, help="Port (0 picks a free one).")
@click.option(
    "--latency", "latency_s", default=0.0, show_default=True, type=float, help="Seconds added to each answer."
)
@click.option("--image-seconds", default=3.0, show_default=True, type=float, help="Render time of an image job.")
@click.option("--video-seconds", default=8.0, show_default=True, type=float, help="Render time of a video job.")
@click.option(
    "--url-ttl",
    "url_ttl_s",
    default=86400.0,
    show_default=True,
    type=float,
    help="Seconds a result URL works after completion.",
)
@click.option("--video-bytes", default=262144, show_default=True, type=int, help="Size of each generated MP4.")
@click.option("--rate-429", default=0.0, show_default=True, type=float, help="Share of calls answered 429.")
@click.option("--rate-500", default=0.0, show_default=True, type=float, help="Share of calls answered 500.")
@click.option("--rate-503", default=0.0, show_default=True, type=float, help="Share of calls answered 503.")
@click.option("--rate-timeout", default=0.0, show_default=True, type=float, help="Share of calls that hang.")
@click.option("--job-failure-rate", default=0.0, show_default=True, type=float, help="Share of jobs that fail.")
@click.option(
    "--require-key/--no-require-key",
    default=False,
    show_default=True,
    help="Demand the key from APIMART_API_KEY (or APIMART_API_KEY_FILE) as a Bearer token; never from argv.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for fault draws.")
def simulator(host: str, port: int, require_key: bool, **knobs: Any) -> None:
    """Run the provider simulator: a real HTTP server speaking the provider's API, with faults on demand.

    Admin endpoints for tests and operators: GET /_sim/stats, POST /_sim/config, POST /_sim/faults,
    POST /_sim/reset.
    """
    from genline.provider.simulator import SimConfig
    from genline.provider.simulator.runner import serve_forever

    api_key = None
    if require_key:
        api_key = os.environ.get("APIMART_API_KEY")
        key_file = os.environ.get("APIMART_API_KEY_FILE")
        if not api_key and key_file and os.path.isfile(key_file):
            with open(key_file) as handle:
                api_key = handle.read().strip()
        if not api_key:
            click.echo(
                "error [invalid_config]: --require-key needs APIMART_API_KEY or APIMART_API_KEY_FILE "
                "in the environment.",
                err=True,
            )
            sys.exit(2)
    serve_forever(SimConfig(api_key=api_key, **knobs), host, port)


@click.group()
def db() -> None:
    """Database schema commands."""


@db.command()
def upgrade() -> None:
    """Create or migrate the schema to the newest version (SQLite or PostgreSQL)."""
    settings = _settings()
    from genline.storage.db import Database
    from genline.storage.migrate import current
    from genline.storage.migrate import upgrade as do_upgrade

    Database(settings.database_url).check()
    do_upgrade(settings.database_url)
    click.echo(f"database at revision {current(settings.database_url)}")


OAUTH_VARIABLES = ("FLOWER_AUTH", "FLOWER_OAUTH2_KEY", "FLOWER_OAUTH2_SECRET", "FLOWER_OAUTH2_REDIRECT_URI")


def _loopback(address: str) -> bool:
    """Whether Flower listening on ``address`` is reachable from this machine only. A host name
    other than localhost, or "" (every address), is not."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--port", default=5555, show_default=True, type=int, help="Port for Flower's web UI.")
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address for Flower's web UI; beyond loopback only with authentication [GENLINE_FLOWER_BASIC_AUTH].",
)
def flower(port: int, address: str) -> None:
    """Run Flower, the operator's view of workers and tasks (needs a Redis or AMQP broker:
    the embedded broker cannot send events). Tasks carry only ids, never payloads or keys.

    Authentication: GENLINE_FLOWER_BASIC_AUTH (user:password), or Flower's own OAuth variables
    (FLOWER_AUTH, FLOWER_OAUTH2_KEY, FLOWER_OAUTH2_SECRET, FLOWER_OAUTH2_REDIRECT_URI, and
    FLOWER_AUTH_PROVIDER). Flower's /metrics and /healthcheck answer without it (docs/OPERATORS.md)."""
    settings = _settings()
    if settings.embedded_broker:
        click.echo(
            "error [invalid_config]: Flower needs GENLINE_BROKER_URL=redis://...; the embedded "
            "broker cannot deliver worker events.",
            err=True,
        )
        sys.exit(2)
    env = dict(os.environ)
    if settings.flower_basic_auth:  # to Flower through its environment, never its argv (ps shows argv)
        env["FLOWER_BASIC_AUTH"] = ",".join(credential.reveal() for credential in settings.flower_basic_auth)
    authenticated = bool(env.get("FLOWER_BASIC_AUTH")) or all(env.get(name) for name in OAUTH_VARIABLES)
    if not authenticated and not _loopback(address):
        click.echo(
            f"error [invalid_config]: Flower would listen on {address or 'every address'} without "
            "authentication; set GENLINE_FLOWER_BASIC_AUTH=user:password (or Flower's OAuth variables: "
            f"{', '.join(OAUTH_VARIABLES)}), or listen on 127.0.0.1.",
            err=True,
        )
        sys.exit(2)
    os.execve(
        sys.executable,
        [sys.executable, "-m", "celery", "-A", "genline.tasks.worker:flower", "flower"]
        + [f"--port={port}", f"--address={address}"],
        env,
    )
