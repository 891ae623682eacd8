"""genline's Prometheus metrics: right under Celery's prefork pool, named by Prometheus's rules,
labelled without ids or user text, and everything the Grafana dashboard asks for is exported."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from genline.config.settings import load_settings
from genline.pipelines.api import Genline
from genline.pipelines.metrics import StateCollector, StateSnapshot, breaker_keys
from genline.pipelines.runtime import Runtime
from genline.provider.metrics import PROCESS_REGISTRY, _metrics, status_class
from genline.provider.simulator import SimConfig, start_simulator
from genline.provider.stages import CircuitBreaker
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, ProviderCall
from genline.tasks.app import CeleryDispatcher, make_celery
from genline.workers.drain import drain
from genline.workers.processes import ProcessGroup
from tests.support.processes import wait_for
from tests.support.s3_server import free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
# Label names that would carry an id or a user's words: never a label (unbounded series, and data
# that is not for a metrics store).
FORBIDDEN_LABELS = {"user_id", "pipeline_id", "step_id", "request_id", "task_id", "idempotency_key", "subject"}
FORBIDDEN_LABELS |= {"description", "prompt", "text", "url", "image", "callback_url", "error_message", "job_id"}
BASE_UNIT_SUFFIXES = ("_seconds", "_bytes", "_usd", "_ratio", "_percent")
NOT_BASE_UNITS = re.compile(r"_(ms|milliseconds|minutes|hours|kilobytes|megabytes|cents)(_|$)")


def families(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))


def check_names_and_labels(found: Iterable[Metric], forbidden_values: Iterable[str] = ()) -> None:
    """Prometheus's naming rules and genline's label rule, on parsed exposition."""
    forbidden_values = [v for v in forbidden_values if v]
    for family in found:
        if not family.name.startswith("genline_"):
            continue
        assert re.fullmatch(r"genline_[a-z0-9_]+", family.name), family.name
        assert not NOT_BASE_UNITS.search(family.name), f"{family.name}: use base units (seconds, bytes)"
        if family.type == "counter":
            # the parser strips _total from a counter family's name; every sample carries it
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
            assert not family.name.endswith("_total")
        if family.type == "histogram":
            assert family.name.endswith(BASE_UNIT_SUFFIXES), f"{family.name}: a histogram names its unit"
        for sample in family.samples:
            names = set(sample.labels) - {"le"}
            assert not names & FORBIDDEN_LABELS, f"{sample.name} is labelled {names & FORBIDDEN_LABELS}"
            for value in sample.labels.values():
                assert len(value) <= 64, f"{sample.name}: label value too long to be a bounded set"
                for bad in forbidden_values:
                    assert bad not in value, f"{sample.name} carries {bad!r} in a label"


def sample_value(found: list[Metric], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in found:
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_a_prefork_workers_counts_add_up_to_every_call_the_provider_saw(
    tmp_path: Path, request_fields: Callable[..., dict[str, Any]]
) -> None:
    """A real Celery worker with three prefork children, a real poller and `genline metrics`, all
    separate processes: the scraped counts equal the simulator's own counts of the calls it
    answered and the audit log's rows, not the share of one child."""
    key = "test-key-" + uuid.uuid4().hex
    # Slow answers keep each child busy, so the prefork pool spreads the copies over its children.
    config = SimConfig(api_key=key, image_seconds=0.2, video_seconds=0.3, latency_s=0.15, video_bytes=65536)
    with start_simulator(config) as sim:
        env = {
            "GENLINE_VAR_DIR": str(tmp_path / "var"),
            "APIMART_BASE_URL": sim.base_url,
            "APIMART_API_KEY": key,
            "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",
            "GENLINE_POLL_INTERVAL_S": "0.2",
        }
        settings = load_settings(env)
        upgrade(settings.database_url)
        port = free_port()
        group = ProcessGroup(log_dir=tmp_path / "logs", env=env)
        rt = Runtime.from_settings(settings, CeleryDispatcher(make_celery(settings)))
        try:
            group.start_worker("pool", concurrency=3)
            group.start_poller()
            group.start("metrics", "metrics", "--port", str(port))
            api = Genline(runtime=rt)
            descriptions = ["Hand-thrown stoneware mug, speckled glaze.", "Oak cutting board, oiled, 40 cm."]
            pids = [
                api.submit(request_fields(description=descriptions[n % 2])).pipeline_id  # repeats: cache hits
                for n in range(9)
            ]

            def all_ended() -> bool:
                with rt.db.transaction() as s:
                    done = s.scalar(
                        select(func.count()).where(
                            Pipeline.id.in_(pids), Pipeline.status.in_(["succeeded", "failed", "cancelled"])
                        )
                    )
                return done == len(pids)

            wait_for("every pipeline to end", all_ended, 180, group)

            def scrape() -> str | None:
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
                except httpx.TransportError:
                    return None
                return answer.text if answer.status_code == 200 else None

            text = wait_for("the metrics endpoint", scrape, 30, group)
            # The poller books its rounds' audit rows after the call: the counts settle at once,
            # the last row may trail by a round.
            stats = httpx.get(f"{sim.base_url}/_sim/stats").json()
        finally:
            group.stop()
            rt.close()
        with rt.db.transaction() as s:
            statuses = Counter(s.scalars(select(Pipeline.status).where(Pipeline.id.in_(pids))))
            audited = Counter(
                (op, bool(hit)) for op, hit in s.execute(select(ProviderCall.operation, ProviderCall.cache_hit)).all()
            )
            user_ids = {str(u) for u in s.scalars(select(Pipeline.user_id))}
    assert statuses == {"succeeded": len(pids)}

    found = families(text)
    calls = "genline_provider_request_duration_seconds_count"
    submits = sum(stats["submit_calls"].values()) + sum(stats["keyless"].values())
    assert sample_value(found, calls, operation="chat") == stats["chat_calls"] == audited[("chat", False)]
    assert sample_value(found, calls, operation="submit") == submits == audited[("submit", False)]
    assert sample_value(found, calls, operation="poll") == stats["polls_total"]
    assert stats["chat_calls"] >= 2 and submits >= 2 * len(pids)  # work that was really spread
    hits = sample_value(found, "genline_copy_cache_lookups_total", result="hit")
    misses = sample_value(found, "genline_copy_cache_lookups_total", result="miss")
    assert hits == audited[("chat", True)] and hits + misses == len(pids)
    spend = sample_value(found, "genline_provider_spend_usd_total")
    assert spend == pytest.approx(stats["billed_usd"], rel=1e-6, abs=1e-6)
    # More than one child counted: the sum above is several processes' files, not one's.
    worker_files = list((settings.var_dir / "metrics").glob("*/histogram_*.db"))
    assert len(worker_files) >= 3  # three or more children and the poller
    # State read at the scrape: nothing in flight, nothing paused, every breaker closed.
    assert sample_value(found, "genline_state_up") == 1
    assert sample_value(found, "genline_provider_paused") == 0
    assert sample_value(found, "genline_provider_jobs_in_flight") == 0
    assert sample_value(found, "genline_provider_circuit_state", state="closed") >= 1
    assert sample_value(found, "genline_provider_circuit_state", state="open") == 0
    check_names_and_labels(found, forbidden_values=[*pids, *user_ids, *descriptions, key])


def test_in_one_process_the_labels_carry_no_ids_or_user_text(rt: Runtime, request_fields: Any) -> None:
    api = Genline(runtime=rt)
    words = "Walnut desk organiser with three trays for a tidy workspace."
    pid = api.submit(request_fields(description=words, user_id="seller-metrics-77")).pipeline_id
    before = families(generate_latest(PROCESS_REGISTRY).decode())
    drain(rt)
    assert api.status(pid)["status"] == "succeeded"
    after = families(generate_latest(PROCESS_REGISTRY).decode())
    calls = "genline_provider_request_duration_seconds_count"
    assert sample_value(after, calls, operation="chat") == sample_value(before, calls, operation="chat") + 1
    assert sample_value(after, calls, operation="submit") - sample_value(before, calls, operation="submit") == 2
    check_names_and_labels(after, forbidden_values=[pid, "seller-metrics-77", words, "Walnut"])


def test_status_classes_are_a_bounded_set() -> None:
    assert [status_class(c) for c in (200, 201, 404, 429, 503, None, 42)] == ["2xx", "2xx", "4xx", "4xx", "5xx"] + [
        "none",
        "none",
    ]


def test_the_state_collector_reads_the_breaker_keys_the_breaker_writes() -> None:
    from genline.provider.shared_state import LocalSharedState

    breaker = CircuitBreaker(LocalSharedState())
    _, open_key, tripped, _ = breaker._keys("gpt-4o-mini")
    assert breaker_keys("gpt-4o-mini") == (open_key, tripped)


def test_a_state_that_cannot_be_read_is_reported_down_not_zero() -> None:
    def broken(snapshot: StateSnapshot) -> None:
        raise OSError("database unreachable")

    found = list(StateCollector(broken, ["m"]).collect())
    names = {f.name for f in found}
    assert [f.samples[0].value for f in found if f.name == "genline_state_up"] == [0.0]
    assert "genline_provider_paused" not in names and "genline_copies_at_risk" not in names


def _exported_sample_names() -> set[str]:
    """Every sample name the code can export: the event metrics and the state gauges."""
    _metrics()  # built on first use
    text = generate_latest(PROCESS_REGISTRY).decode()

    def everything(snapshot: StateSnapshot) -> None:
        snapshot.jobs_in_flight = {("video", "m"): 1}

    state = list(StateCollector(everything, ["m"]).collect())
    names: set[str] = set()
    for family in [*families(text), *state]:
        kind = family.type
        if kind == "counter":
            names.add(family.name if family.name.endswith("_total") else family.name + "_total")
        elif kind == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or"}


def dashboard_metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers outside label matchers and grouping
    clauses that are not functions or keywords."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    stripped = re.sub(r"\{[^}]*\}", "", stripped)  # label matchers
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)  # grouping labels
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        word, rest = match.group(0), stripped[match.end() :].lstrip()
        if rest.startswith("(") or word in _PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(word)
    return names


def test_every_metric_the_dashboard_queries_is_one_the_code_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    exported = _exported_sample_names()
    queried: set[str] = set()
    for expr in exprs:
        names = dashboard_metric_names(expr)
        assert names, f"{expr!r} queries no metric"
        queried |= names
    assert queried <= exported, f"the dashboard queries what the code does not export: {sorted(queried - exported)}"
    # and the dashboard shows each thing the operators asked for
    for wanted in (
        "genline_provider_request_duration_seconds_bucket",
        "genline_provider_errors_total",
        "genline_provider_rate_limited_total",
        "genline_copy_cache_lookups_total",
        "genline_provider_spend_usd_total",
        "genline_spend_cap_alerts_total",
        "genline_provider_circuit_state",
        "genline_provider_paused",
        "genline_provider_jobs_in_flight",
        "genline_copies_at_risk",
        "genline_poll_oldest_due_age_seconds",
    ):
        assert wanted in queried, wanted


def test_the_dashboard_parser_finds_names_and_skips_functions_and_labels() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, operation) (rate(foo_bucket{a="b"}[5m]))) / bar'
    assert dashboard_metric_names(expr) == {"foo_bucket", "bar"}


def test_the_exported_names_follow_prometheus_naming() -> None:
    _metrics()
    check_names_and_labels(families(generate_latest(PROCESS_REGISTRY).decode()))
