"""The state half of genline's metrics, read when Prometheus scrapes (docs/METRICS.md).

Breakers, the pause, provider jobs in flight, copies at risk and the oldest due poll are facts of
the database and the shared state, not of any one process. Kept as gauges inside the workers,
each prefork child would hold its own guess and the exporter would have to choose between them
(or add them up); read here, at scrape time, in the exporting process, there is one answer and it
is the current one. A read that fails is not a zero: the family is left out and
``genline_state_up`` says 0, so a dashboard shows a gap and an alert can fire on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from genline.config.clock import utcnow
from genline.config.constants import JobStatus, StepKind, StepStatus
from genline.config.logging import get_logger
from genline.provider.metrics import NO_MODEL
from genline.provider.stages import KeyReader, read_pause
from genline.storage.db import Database
from genline.storage.models import ProviderJob, Step

log = get_logger("genline.metrics")

IN_FLIGHT = (JobStatus.PENDING.value, JobStatus.PROCESSING.value)  # what the poller polls
BREAKER_STATES = ("closed", "half_open", "open")


def breaker_keys(model: str) -> tuple[str, str]:
    """The shared-state keys of a model's breaker: open, tripped (provider/stages.CircuitBreaker)."""
    return f"breaker:{model}:open", f"breaker:{model}:tripped"


@dataclass
class StateSnapshot:
    """What the state gauges show, read in one go."""

    paused: bool = False
    breakers: dict[str, str] = field(default_factory=dict)  # model -> closed | half_open | open
    jobs_in_flight: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, model) -> count
    copies_at_risk: int = 0
    oldest_due_poll_age_s: float = 0.0


def read_shared(reader: KeyReader, models: list[str], snapshot: StateSnapshot) -> None:
    """The pause and each model's breaker, from where the workers share them."""
    snapshot.paused = read_pause(reader) is not None
    for model in models:
        open_key, tripped_key = breaker_keys(model)
        if reader.get(open_key):
            snapshot.breakers[model] = "open"
        elif reader.get(tripped_key):
            snapshot.breakers[model] = "half_open"  # cooled down: one probe call decides
        else:
            snapshot.breakers[model] = "closed"


def read_database(db: Database, copy_risk_margin_s: float, snapshot: StateSnapshot) -> None:
    """Jobs in flight, copies at risk (the sweeper's own test) and how overdue the oldest due poll is."""
    now = utcnow()
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(ProviderJob.kind, ProviderJob.model, func.count())
            .where(ProviderJob.status.in_(IN_FLIGHT))
            .group_by(ProviderJob.kind, ProviderJob.model)
        ).all()
        snapshot.jobs_in_flight = {(str(kind), str(model or NO_MODEL)): int(n) for kind, model, n in rows}
        snapshot.copies_at_risk = int(
            conn.scalar(
                select(func.count()).where(
                    Step.kind == StepKind.STORE,
                    Step.status.in_([StepStatus.QUEUED, StepStatus.RUNNING]),
                    Step.deadline_at < now + timedelta(seconds=copy_risk_margin_s),
                )
            )
            or 0
        )
        oldest = conn.scalar(
            select(func.min(ProviderJob.next_poll_at)).where(
                ProviderJob.status.in_(IN_FLIGHT), ProviderJob.next_poll_at <= now
            )
        )
    snapshot.oldest_due_poll_age_s = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0


class StateCollector(Collector):
    """Yields the state gauges; ``read`` fills a snapshot (raising when a store cannot be read)."""

    def __init__(self, read: Callable[[StateSnapshot], None], models: list[str]) -> None:
        self._read, self._models = read, models

    def collect(self) -> Iterator[Metric]:
        snapshot = StateSnapshot()
        started = time.perf_counter()
        try:
            self._read(snapshot)
            up = 1.0
        except Exception as exc:  # noqa: BLE001 - any store error: reported as up=0, never a scrape failure
            log.warning("metrics_state_unreadable", error=type(exc).__name__)
            up = 0.0
        elapsed = time.perf_counter() - started
        yield GaugeMetricFamily("genline_state_up", "1 when the last scrape could read the state, else 0.", value=up)
        yield GaugeMetricFamily(
            "genline_state_read_duration_seconds", "Seconds the scrape spent reading the state.", value=elapsed
        )
        if not up:
            return
        yield GaugeMetricFamily(
            "genline_provider_paused",
            "1 while paid provider work is paused (after a 401 or 402).",
            value=snapshot.paused,
        )
        breaker = GaugeMetricFamily(
            "genline_provider_circuit_state",
            "Each model's circuit breaker: 1 for its current state (closed, half_open or open).",
            labels=["gen_ai_request_model", "state"],
        )
        for model in self._models:
            current = snapshot.breakers.get(model, "closed")
            for state in BREAKER_STATES:
                breaker.add_metric([model, state], 1.0 if state == current else 0.0)
        yield breaker
        jobs = GaugeMetricFamily(
            "genline_provider_jobs_in_flight",
            "Provider jobs submitted and not finished (pending or processing), by kind and model.",
            labels=["kind", "gen_ai_request_model"],
        )
        for (kind, model), count in sorted(snapshot.jobs_in_flight.items()):
            jobs.add_metric([kind, model], count)
        yield jobs
        yield GaugeMetricFamily(
            "genline_copies_at_risk",
            "Copies of provider results not done within GENLINE_COPY_RISK_MARGIN_S of their link's expiry.",
            value=snapshot.copies_at_risk,
        )
        yield GaugeMetricFamily(
            "genline_poll_oldest_due_age_seconds",
            "How long the most overdue provider job has been due for a poll (0: none is overdue).",
            value=snapshot.oldest_due_poll_age_s,
        )
