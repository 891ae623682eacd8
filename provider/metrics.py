"""Prometheus metrics for what genline knows and Celery does not (docs/METRICS.md).

Two kinds, chosen by where the fact lives:

- **Events** — a provider call finished, a cache lookup hit or missed, a spend cap crossed a
  threshold — are counted where they happen, in whichever process they happen in: counters and a
  histogram here. Under Celery's prefork pool every child is its own process, so each writes its
  counts to its own memory-mapped file (prometheus_client's multiprocess mode,
  ``PROMETHEUS_MULTIPROC_DIR``), and the exporter adds the files up. Without it, a scrape would see
  one child's counts: a tenth to a twenty-fifth of the truth (PostHog#56109).
- **State** — breakers, the pause, jobs in flight, copies at risk, the oldest due poll — is not
  counted anywhere: ``pipelines/metrics.py`` reads it from the database and the shared state when
  Prometheus scrapes, in the exporting process, so no two processes need to agree on a gauge.

Labels are bounded sets only: the operation (chat, submit, poll, cancel), the catalog's model
names, HTTP status classes, genline's error codes, cap scopes and periods; never an id, a user or
anything a user wrote. Where OpenTelemetry's GenAI conventions name a thing, the label is their
name in Prometheus spelling (``gen_ai.request.model`` -> ``gen_ai_request_model``).

A process turns the shared mode on with ``use_process_dir`` before its first observation; the
``genline worker`` and ``genline poller`` commands do. Everywhere else (tests, the Python API,
``genline demo``) the counts stay in the process, in ``PROCESS_REGISTRY``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from genline.config.errors import ProviderError, RateLimited
from genline.config.logging import get_logger

if TYPE_CHECKING:
    from genline.config.settings import Settings
    from genline.provider.gateway import CallRecord

log = get_logger("genline.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
PREFIX = "genline_"
# Seconds: polls answer in milliseconds, chats in seconds, a stuck call hits the HTTP timeout.
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
NO_MODEL = "none"  # the label value of a call made for no model (a cancel, say)
OTHER_ERROR = "other"

# Counts stay here when no process folder is in use (tests, the Python API): never the global
# REGISTRY, which other libraries in the same process (Flower) fill with their own names.
PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)


def _error_codes() -> frozenset[str]:
    """Every provider error code genline's exception tree defines: the ``error_type`` label's values."""
    codes: set[str] = set()
    todo: list[type[ProviderError]] = [ProviderError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return frozenset(codes)


class _Metrics:
    """The event metrics, built on first use (after ``use_process_dir`` has chosen where they live)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        call = ["operation", "gen_ai_request_model"]
        self.duration = Histogram(
            "genline_provider_request_duration_seconds",
            "Provider calls by operation, model and HTTP status class (none: no answer), in seconds.",
            [*call, "status_class"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "genline_provider_errors",
            "Provider calls that failed, by genline's error code (OpenTelemetry's error.type).",
            [*call, "error_type"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "genline_provider_rate_limited",
            "Provider answers 429 (rate limited).",
            call,
            registry=registry,
        )
        self.tokens = Counter(
            "genline_provider_tokens",
            "Tokens the provider billed, by model and gen_ai.token.type (input or output).",
            ["gen_ai_request_model", "gen_ai_token_type"],
            registry=registry,
        )
        self.spend = Counter(
            "genline_provider_spend_usd",
            "US dollars booked for provider calls at the catalog's prices (estimates included until reconciled).",
            call,
            registry=registry,
        )
        self.cache = Counter(
            "genline_copy_cache_lookups",
            "Copy-cache lookups, by result (hit: no provider call was made).",
            ["result"],
            registry=registry,
        )
        self.cap_alerts = Counter(
            "genline_spend_cap_alerts",
            "Spend caps that crossed 50, 80 or 100 percent, by scope and period.",
            ["scope", "period", "threshold_percent"],
            registry=registry,
        )
        self.error_codes = _error_codes()


@functools.cache
def _metrics() -> _Metrics:
    return _Metrics(PROCESS_REGISTRY)


def _model(name: str | None) -> str:
    return name or NO_MODEL


def status_class(status_code: int | None) -> str:
    """``2xx``, ``4xx``, ``5xx``...; ``none`` when no HTTP answer came (timeout, connection error)."""
    if status_code is None or not 100 <= status_code <= 599:
        return "none"
    return f"{status_code // 100}xx"


def observe_call(record: CallRecord) -> None:
    """Count one finished provider call (the gateway's ``_finish``): never raises, so a metrics
    file that cannot be written never fails the call it describes."""
    try:
        m = _metrics()
        model = _model(record.ctx.model)
        m.duration.labels(record.operation, model, status_class(record.status_code)).observe(record.latency_ms / 1000)
        if record.error_code is not None:
            code = record.error_code if record.error_code in m.error_codes else OTHER_ERROR
            m.errors.labels(record.operation, model, code).inc()
        if record.status_code == 429 or record.error_code == RateLimited.code:
            m.rate_limited.labels(record.operation, model).inc()
        if record.prompt_tokens:
            m.tokens.labels(model, "input").inc(record.prompt_tokens)
        if record.completion_tokens:
            m.tokens.labels(model, "output").inc(record.completion_tokens)
        if record.cost_usd:
            m.spend.labels(record.operation, model).inc(float(record.cost_usd))
    except (OSError, ValueError) as exc:  # a full disk, say: the call itself went fine
        log.warning("metrics_not_recorded", what="provider_call", error=type(exc).__name__)


def observe_cache_lookup(hit: bool) -> None:
    """Count one copy-cache lookup (pipelines/cache.py)."""
    try:
        _metrics().cache.labels("hit" if hit else "miss").inc()
    except (OSError, ValueError) as exc:
        log.warning("metrics_not_recorded", what="cache_lookup", error=type(exc).__name__)


def observe_cap_alert(scope: str, period: str, percent: int) -> None:
    """Count one spend-cap threshold crossed (pipelines/spend.py ``announce``): no subject label,
    a user id is not a label."""
    try:
        _metrics().cap_alerts.labels(scope, period, str(percent)).inc()
    except (OSError, ValueError) as exc:
        log.warning("metrics_not_recorded", what="spend_cap_alert", error=type(exc).__name__)


# --- where the counts live under prefork -----------------------------------------------------------
def metrics_root(settings: Settings) -> Path:
    """GENLINE_METRICS_DIR, or ``<GENLINE_VAR_DIR>/metrics``."""
    return Path(settings.metrics_dir).expanduser().resolve() if settings.metrics_dir else settings.var_dir / "metrics"


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def use_process_dir(root: Path) -> Path:
    """Make this process, and every process it forks, keep its counts in files under ``root``: in
    a folder of this process tree's own (``<host>-<pid>``, cleared now). Folders of this host's
    earlier trees whose process has gone are removed (their counts leave the sum: Prometheus reads
    that as a counter reset, which ``rate()`` handles). Other hosts' folders are theirs to clear.
    Call before the first observation; a prefork worker's children inherit it."""
    host = _host()
    mine = root / f"{host}-{os.getpid()}"
    for folder in root.glob(f"{glob.escape(host)}-*"):
        pid = folder.name[len(host) + 1 :]  # "<host>-<pid>" exactly: not another host named "<host>-2"
        if folder == mine or (pid.isdigit() and not _alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
    mine.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(mine)
    # prometheus_client picks its value class when it is first imported; genline may have imported
    # it before the folder was known. No metric exists yet (they are built on first use), so the
    # choice can still be made again, with the folder set.
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    return mine


def process_exited(pid: int) -> None:
    """A prefork child is gone (Celery's ``worker_process_shutdown``): its live gauges leave the
    sum (``mark_process_dead``). Its counters and histograms stay, as they must."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and os.path.isdir(path):
        with contextlib.suppress(OSError):
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # untyped in prometheus_client


class ProcessFilesCollector(Collector):
    """Adds up the counts in every process folder under ``root``: every prefork child of every
    worker and poller that shares the folder (one per host in production, a shared volume in
    docker-compose). prometheus_client's own ``MultiProcessCollector`` reads one folder; its
    ``merge`` does the adding."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def collect(self) -> Iterator[Metric]:
        files = sorted(glob.glob(str(self.root / "*" / "*.db")))
        if not files:
            return iter(())
        return iter(_merge(files))


def _merge(files: Iterable[str]) -> list[Metric]:
    try:
        merged = MultiProcessCollector.merge(list(files), accumulate=True)  # type: ignore[no-untyped-call]  # untyped
        return list(merged)
    except FileNotFoundError:  # a folder cleared between the listing and the reading: next scrape
        return []
