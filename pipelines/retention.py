"""Retention: how long each feature's stored outputs and audit rows are kept, and the pass that
removes what is past it (``genline retention``; the pollers' sweeper every GENLINE_RETENTION_EVERY_S).

Per feature, from the catalog's ``features`` section (``config/catalog.py``): ``outputs_days`` and
``audit_days``; absent keeps forever (the shipped catalog keeps everything).

- Outputs: the stored video and image of a pipeline that ENDED (succeeded, failed, cancelled) more
  than ``outputs_days`` ago. Objects are deleted from storage first, then their ``stored_objects``
  rows in one transaction, which also marks the store step's output ``removed_at`` (its
  ``location`` becomes null). A crash in between leaves rows naming deleted objects; the next pass
  deletes them again (deleting a missing object is fine). Pipeline and step rows stay: the status
  stays readable. At most ``batch`` pipelines per transaction.
- Audit rows (``provider_calls``) older than ``audit_days`` are rolled up into ``audit_daily_totals``
  (per UTC day, feature, model, operation and error code) and deleted, in one transaction per
  batch, so the report keeps spend and counts of old periods.
- Multipart uploads (S3) unfinished after ``STALE_UPLOAD_S`` are aborted (local store: the hidden
  temporary files of killed writes are removed).

A dry run counts the same things and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import ColumnElement, delete, func, or_, select
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import InstrumentedAttribute, Session

from genline.config.catalog import Catalog, FeaturePolicy
from genline.config.clock import utcnow
from genline.config.constants import PIPELINE_TERMINAL, StepKind
from genline.config.logging import get_logger
from genline.pipelines.runtime import Runtime
from genline.storage.models import AuditDailyTotal, Pipeline, ProviderCall, Step, StoredObject

log = get_logger("genline.retention")

# A copy is bounded by its download deadline (GENLINE_VIDEO_DOWNLOAD_DEADLINE_S: minutes) and its
# link's expiry (hours); an upload still unfinished after a day can only be an orphan.
STALE_UPLOAD_S = 86_400.0
BATCH = 500  # pipelines per transaction
AUDIT_BATCH = 5_000  # audit rows per transaction
NO_FEATURE = "(none)"  # how audit rows without a feature are reported
RATE_LIMITED_CODE = "provider_rate_limited"  # as pipelines/report.py counts rate-limit hits
_TERMINAL = [str(status) for status in PIPELINE_TERMINAL]
_last_pass = 0.0  # this process's last scheduled pass (time.monotonic); see maybe_run_retention


@dataclass
class FeatureFigures:
    """What goes (dry run) or went for one feature."""

    outputs_days: int | None
    audit_days: int | None
    pipelines: int = 0
    objects: int = 0
    bytes: int = 0
    audit_rows: int = 0
    audit_cost_usd: Decimal = Decimal(0)


@dataclass
class RetentionResult:
    dry_run: bool
    features: dict[str, FeatureFigures] = field(default_factory=dict)
    uploads_aborted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "features": {
                name: {**asdict(f), "audit_cost_usd": str(f.audit_cost_usd)}
                for name, f in sorted(self.features.items())
            },
            "uploads_aborted": self.uploads_aborted,
            "stale_upload_after_s": STALE_UPLOAD_S,
        }


Scope = tuple[str, Callable[[InstrumentedAttribute[Any]], ColumnElement[bool]], FeaturePolicy]


def _scopes(catalog: Catalog) -> list[Scope]:
    """Each listed feature, then ``default`` for every other feature (and for none)."""
    listed = sorted(catalog.features)
    scopes: list[Scope] = [
        (name, lambda col, name=name: col == name, catalog.features[name])  # type: ignore[misc]
        for name in listed
    ]

    def others(col: InstrumentedAttribute[Any]) -> ColumnElement[bool]:
        return or_(col.is_(None), col.not_in(listed)) if listed else or_(col.is_(None), col.is_not(None))

    scopes.append(("default", others, catalog.default_feature))
    return scopes


def _figures(result: RetentionResult, feature: str | None, policy: FeaturePolicy) -> FeatureFigures:
    name = feature or NO_FEATURE
    if name not in result.features:
        result.features[name] = FeatureFigures(outputs_days=policy.outputs_days, audit_days=policy.audit_days)
    return result.features[name]


def run_retention(
    rt: Runtime, *, dry_run: bool = False, batch: int = BATCH, audit_batch: int = AUDIT_BATCH
) -> RetentionResult:
    """One retention pass over every feature; see the module docstring."""
    now = utcnow()
    result = RetentionResult(dry_run=dry_run)
    for _, clause, policy in _scopes(rt.catalog):
        if policy.outputs_days is not None:
            cutoff = now - timedelta(days=policy.outputs_days)
            _outputs(rt, result, clause(Pipeline.feature), policy, cutoff, dry_run, batch, now)
        if policy.audit_days is not None:
            cutoff = now - timedelta(days=policy.audit_days)
            _audit(rt, result, clause(ProviderCall.feature), policy, cutoff, dry_run, audit_batch)
    result.uploads_aborted = rt.store.abort_stale_uploads(STALE_UPLOAD_S, dry_run=dry_run)
    if not dry_run and (result.features or result.uploads_aborted):
        log.info(
            "retention_pass",
            uploads_aborted=result.uploads_aborted,
            **{
                f"{name}_objects": f.objects for name, f in result.features.items() if f.objects
            },  # counts only; never keys or user text
        )
    return result


def maybe_run_retention(rt: Runtime) -> RetentionResult | None:
    """The sweeper's call: a pass at most every GENLINE_RETENTION_EVERY_S, in one poller at a time
    (a shared-state key), and never more often in this process (should shared state fail open)."""
    global _last_pass
    every = rt.settings.retention_every_s
    if _last_pass and time.monotonic() - _last_pass < every:
        return None
    _last_pass = time.monotonic()
    if not rt.shared.set_if_absent("retention:pass", "1", every):
        return None
    try:
        return run_retention(rt)
    except Exception as exc:  # noqa: BLE001  # the sweep goes on; the next pass tries again
        log.error("retention_failed", alert=True, error=type(exc).__name__)
        return None


# --- outputs ---------------------------------------------------------------------------------------
def _outputs(
    rt: Runtime,
    result: RetentionResult,
    feature_clause: ColumnElement[bool],
    policy: FeaturePolicy,
    cutoff: datetime,
    dry_run: bool,
    batch: int,
    now: datetime,
) -> None:
    where = (Pipeline.status.in_(_TERMINAL), Pipeline.finished_at < cutoff, feature_clause)
    if dry_run:
        with rt.db.transaction() as s:
            rows = s.execute(
                select(
                    Pipeline.feature,
                    func.count(func.distinct(StoredObject.pipeline_id)),
                    func.count(StoredObject.id),
                    func.coalesce(func.sum(StoredObject.size), 0),
                )
                .join(Pipeline, Pipeline.id == StoredObject.pipeline_id)
                .where(*where)
                .group_by(Pipeline.feature)
            ).all()
        for feature, pipelines, objects, size in rows:
            figures = _figures(result, feature, policy)
            figures.pipelines += int(pipelines)
            figures.objects += int(objects)
            figures.bytes += int(size)
        return
    while True:
        with rt.db.transaction() as s:
            ids = list(
                s.scalars(
                    select(StoredObject.pipeline_id)
                    .join(Pipeline, Pipeline.id == StoredObject.pipeline_id)
                    .where(*where)
                    .distinct()
                    .limit(batch)
                )
            )
            if not ids:
                return
            stored = s.execute(
                select(StoredObject.id, StoredObject.key, StoredObject.size, StoredObject.pipeline_id, Pipeline.feature)
                .join(Pipeline, Pipeline.id == StoredObject.pipeline_id)
                .where(StoredObject.pipeline_id.in_(ids))
            ).all()
        for _, key, _, _, _ in stored:  # storage first: a crash after this leaves rows the next pass redoes
            rt.store.delete(key)
        with rt.db.transaction() as s:
            s.execute(delete(StoredObject).where(StoredObject.id.in_([o.id for o in stored])))
            _mark_removed(s, ids, {o.key for o in stored}, now)
        for _, _, size, _, feature in stored:
            figures = _figures(result, feature, policy)
            figures.objects += 1
            figures.bytes += int(size)
        for _, feature in {(o.pipeline_id, o.feature) for o in stored}:
            _figures(result, feature, policy).pipelines += 1


def _mark_removed(s: Session, pipeline_ids: list[str], keys: set[str], now: datetime) -> None:
    """The store step's output keeps what was stored (key, size, sha256) with ``location`` null and
    ``removed_at`` set, so the status says the output existed and was removed by retention."""
    steps = s.scalars(select(Step).where(Step.pipeline_id.in_(pipeline_ids), Step.kind == StepKind.STORE))
    for step in steps:
        output = dict(step.output or {})
        changed = False
        for kind in ("video", "image"):
            entry = output.get(kind)
            if isinstance(entry, dict) and entry.get("key") in keys:
                output[kind] = {**entry, "location": None, "removed_at": now.isoformat()}
                changed = True
        if changed:
            step.output = output


# --- audit -----------------------------------------------------------------------------------------
def _audit(
    rt: Runtime,
    result: RetentionResult,
    feature_clause: ColumnElement[bool],
    policy: FeaturePolicy,
    cutoff: datetime,
    dry_run: bool,
    batch: int,
) -> None:
    where = (ProviderCall.ts < cutoff, feature_clause)
    if dry_run:
        with rt.db.transaction() as s:
            rows = s.execute(
                select(ProviderCall.feature, func.count(), func.coalesce(func.sum(ProviderCall.cost_usd), 0))
                .where(*where)
                .group_by(ProviderCall.feature)
            ).all()
        for feature, n, cost in rows:
            figures = _figures(result, feature, policy)
            figures.audit_rows += int(n)
            figures.audit_cost_usd += _micros(cost) / Decimal(1_000_000)
        return
    while True:
        with rt.db.transaction() as s:
            calls = list(s.scalars(select(ProviderCall).where(*where).order_by(ProviderCall.id).limit(batch)))
            if not calls:
                return
            done = s.execute(delete(ProviderCall).where(ProviderCall.id.in_([c.id for c in calls])))
            deleted = cast(CursorResult[Any], done).rowcount
            if deleted != len(calls):  # another pass rolled some up meanwhile: roll back, count nothing twice
                raise RuntimeError("Audit rows changed during the retention pass; it will run again.")
            _roll_up(s, calls)
            for call in calls:
                figures = _figures(result, call.feature, policy)
                figures.audit_rows += 1
                figures.audit_cost_usd += _micros(call.cost_usd) / Decimal(1_000_000)


def _micros(amount: Any) -> int:
    return int((Decimal(str(amount or 0)) * 1_000_000).to_integral_value())


def _roll_up(s: Session, calls: list[ProviderCall]) -> None:
    totals: dict[tuple[str, str, str, str, str], AuditDailyTotal] = {}
    now = utcnow()
    for call in calls:
        pk = (call.ts.date().isoformat(), call.feature or "", call.model or "", call.operation, call.error_code or "")
        row = totals.get(pk) or s.get(AuditDailyTotal, pk)
        if row is None:
            row = AuditDailyTotal(
                day=pk[0], feature=pk[1], model=pk[2], operation=pk[3], error_code=pk[4],
                requests=0, rate_limited=0, cache_hits=0, cost_micros=0, estimated_cost_micros=0,
                latency_ms_sum=0.0, prompt_tokens=0, completion_tokens=0, units=0.0,
            )  # fmt: skip
            s.add(row)
        totals[pk] = row
        cost = _micros(call.cost_usd)
        row.requests += 1
        row.rate_limited += int(call.status_code == 429 or call.error_code == RATE_LIMITED_CODE)
        row.cache_hits += int(bool(call.cache_hit))
        row.cost_micros += cost
        row.estimated_cost_micros += cost if call.cost_estimated else 0
        row.latency_ms_sum += float(call.latency_ms or 0.0)
        row.prompt_tokens += call.prompt_tokens or 0
        row.completion_tokens += call.completion_tokens or 0
        row.units += float(call.units or 0.0)
        row.updated_at = now
