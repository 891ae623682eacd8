"""``genline metrics``: serve Prometheus's /metrics for genline (docs/METRICS.md).

A process of its own, not the poller's: it must keep answering while the poller is busy or
restarting, it reads the counts of every worker and poller that share GENLINE_METRICS_DIR (on
one host, or through a shared volume), and a scrape's database reads never take the poller's
connections. Loopback by default: the numbers describe the business; expose them on purpose.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any

import click

from genline.cli.output import fail
from genline.config.errors import GenlineError
from genline.config.logging import configure_logging, get_logger
from genline.config.settings import Settings, load_settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from genline.storage.db import Database

log = get_logger("genline.metrics")


def build_registry(settings: Settings) -> tuple[CollectorRegistry, Database]:
    """The exporter's registry: every process's counts, and the state read at scrape time."""
    from prometheus_client import CollectorRegistry

    from genline.cli.provider import _reader  # where the workers keep the pause, read strictly
    from genline.config.catalog import load_catalog
    from genline.pipelines.metrics import StateCollector, StateSnapshot, read_database, read_shared
    from genline.provider.metrics import ProcessFilesCollector, metrics_root
    from genline.storage.db import Database

    root = metrics_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    models = sorted(load_catalog(settings.catalog_file).models)
    db = Database(settings.database_url, pool_size=1)

    def read(snapshot: StateSnapshot) -> None:
        reader = _reader(settings)
        try:
            read_shared(reader, models, snapshot)
        finally:
            reader.close()
        read_database(db, settings.copy_risk_margin_s, snapshot)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProcessFilesCollector(root))
    registry.register(StateCollector(read, models))
    return registry, db


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=9464, show_default=True, type=int, help="Port for /metrics (0 picks a free one).")
def metrics(host: str, port: int) -> None:
    """Serve /metrics for Prometheus: provider calls, errors, rate limits, cache hits, spend and cap
    alerts from every worker and poller sharing GENLINE_METRICS_DIR, and breakers, the pause, jobs
    in flight, copies at risk and the oldest due poll read at each scrape."""
    try:
        settings: Any = load_settings()
    except GenlineError as err:
        fail(err, as_json=False)
    configure_logging(settings.log_level)
    from prometheus_client import start_http_server

    from genline.provider.metrics import metrics_root

    registry, db = build_registry(settings)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    click.echo(f"serving metrics on http://{host}:{bound}/metrics (counts from {metrics_root(settings)})", err=True)
    log.info("metrics_serving", host=host, port=bound)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    db.dispose()
