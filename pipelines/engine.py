"""Moving pipelines forward: run a step, finish it, fail it, hand the next step to the broker.

Every transition happens inside one database transaction and is safe to repeat: a task that runs
twice, late, or on another machine re-reads the rows and does nothing a second time. Messages to
the broker are sent only after the transaction that justifies them has committed.

A worker's step costs two transactions on its usual path: the claim (one SELECT of the pipeline
and its steps, then a conditional UPDATE that only one worker can win, plus the step's prepare
hook) and the completion (the held audit row and the step's own rows, the step, then the next
step or the pipeline, each a conditional UPDATE). The claim's conditions are what a row lock used
to guard: ``status = 'queued'`` (and the attempts and ``updated_at`` read) in the UPDATE means a
redelivered or concurrent message, or one that read the step before another worker had it, finds
nothing to do; completion UPDATEs never overwrite a finished step or a
pipeline that ended (cancelled, failed) meanwhile.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import httpx
from sqlalchemy import Table, bindparam, exists, func, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from genline.config.clock import utcnow
from genline.config.constants import PIPELINE_TERMINAL, STEP_TERMINAL, JobStatus, PipelineStatus, StepKind, StepStatus
from genline.config.errors import ConfigError, GenlineError, ProviderError, ProviderPaused
from genline.config.logging import get_logger, scrub_text
from genline.pipelines.audit import AuditHold, holding, write_audit
from genline.pipelines.context import Done, StepContext
from genline.pipelines.dispatch import about, nudge
from genline.pipelines.runtime import Runtime
from genline.pipelines.spend import holds_any, release
from genline.pipelines.steps import PREPARE, STEP_FUNCTIONS
from genline.pipelines.windows import batch_hold
from genline.provider.stages import read_pause
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, Step, StoredObject

log = get_logger("genline.engine")
STEPS = cast(Table, Step.__table__)
PIPELINES = cast(Table, Pipeline.__table__)
CALLS = cast(Table, ProviderCall.__table__)
JOBS = cast(Table, ProviderJob.__table__)
STORED = cast(Table, StoredObject.__table__)
_ENDED_PIPELINE = [str(x) for x in PIPELINE_TERMINAL]
_ENDED_STEP = [str(x) for x in STEP_TERMINAL]


@dataclass
class Effects:
    """What to do once the transaction has committed."""

    nudges: list[tuple[str, str]] = field(default_factory=list)  # (step_id, queue)
    finished: list[str] = field(default_factory=list)  # pipeline ids that reached an end with a callback_url

    def merge(self, other: Effects) -> None:
        self.nudges.extend(other.nudges)
        self.finished.extend(other.finished)


def apply_effects(rt: Runtime, effects: Effects) -> None:
    for pair in effects.nudges:
        step_id, queue = pair
        try:
            rt.dispatcher.send(step_id, queue, **about(pair))  # kind and pipeline id: the task's name, Flower's search
        except Exception as exc:  # noqa: BLE001  # the broker is down: the sweeper re-sends later
            log.warning("nudge_failed", step_id=step_id, error=type(exc).__name__)
    for pipeline_id in effects.finished:
        notify_callback(rt, pipeline_id)


# --- transitions (called inside a transaction) -----------------------------------------------------
def earliest_expiry(output: dict[str, Any]) -> datetime | None:
    """When the first of this step's provider links runs out: the deadline of the copy step
    after it (the video's links, for the store step). The image's links do not set it: the video
    step copies the image once the video is submitted, and an image whose link runs out anyway
    costs the image (reported), never the video, so its expiry must not cut the video's copy short."""
    assets = list(output.get("assets", []))
    times = [datetime.fromisoformat(a["expires_at"]) for a in assets if a.get("expires_at")]
    return min(times) if times else None


def fail_step(s: Session, step: Step, code: str, message: str) -> Effects:
    effects = Effects()
    message = scrub_text(message) or ""  # provider text: stored and shown, so scrubbed like a log line
    now = utcnow()
    if step.status not in STEP_TERMINAL:
        step.status = StepStatus.FAILED
        step.error_code, step.error_message = code, message
        step.finished_at = now
    for job in s.scalars(
        select(ProviderJob).where(ProviderJob.step_id == step.id, ProviderJob.status == JobStatus.INTENT)
    ):
        # A submit whose answer never came: the provider may have started this job. It is
        # recorded as such (and its key never reused for anything else), not silently dropped.
        job.status = JobStatus.UNKNOWN
        job.error_code, job.error_message = "submit_outcome_unknown", "the provider may have started this job"
        log.error("orphan_suspected", alert=True, step_id=step.id, job_id=job.id, model=job.model)
    pipeline = step.pipeline
    if pipeline.status in PIPELINE_TERMINAL:
        return effects
    for other in pipeline.steps:
        if other.position > step.position and other.status not in STEP_TERMINAL:
            other.status = StepStatus.CANCELLED
    pipeline.status = PipelineStatus.FAILED
    pipeline.error_code = code
    pipeline.error_message = f"The {step.kind} step failed: {message}"
    pipeline.finished_at = now
    pipeline.cost_usd = pipeline_cost(s, pipeline.id)
    release(s.connection(), pipeline.id)
    if pipeline.callback_url:
        effects.finished.append(pipeline.id)
    return effects


def pipeline_cost(s: Session, pipeline_id: str) -> Decimal:
    """The audit log is the one record of spend; a pipeline's cost is derived from it."""
    total = s.scalar(
        select(func.coalesce(func.sum(ProviderCall.cost_usd), 0)).where(ProviderCall.pipeline_id == pipeline_id)
    )
    return Decimal(str(total or 0))


# --- running a step --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """A step this worker has claimed, with what its completion needs from the claiming read."""

    ctx: StepContext
    next_step_id: str | None
    next_kind: str | None
    priority: str
    callback_url: str | None


_CLAIM_COLUMNS = (
    STEPS.c.id,
    STEPS.c.position,
    STEPS.c.kind,
    STEPS.c.status,
    STEPS.c.attempts,
    STEPS.c.output,
    STEPS.c.deadline_at,
    STEPS.c.started_at,
    STEPS.c.updated_at,
    # Rows an earlier run of the step left behind (its provider jobs, its stored objects): when
    # there are none, as on every first run, the prepare hook has nothing to read.
    (
        select(func.count()).where(JOBS.c.step_id == STEPS.c.id).scalar_subquery()
        + select(func.count()).where(STORED.c.step_id == STEPS.c.id).scalar_subquery()
    ).label("left_behind"),
    PIPELINES.c.id.label("pipeline_id"),
    PIPELINES.c.status.label("pipeline_status"),
    PIPELINES.c.user_id,
    PIPELINES.c.feature,
    PIPELINES.c.profile,
    PIPELINES.c.description,
    PIPELINES.c.image_url,
    PIPELINES.c.image_ref,
    PIPELINES.c.models,
    PIPELINES.c.priority,
    PIPELINES.c.callback_url,
    PIPELINES.c.no_cache,
    PIPELINES.c.batch_window,
)


# The step path's statements, built once (building and cache-keying a statement per call was a
# third of the step's CPU); each is executed with its parameters.
_of_step = select(STEPS.c.pipeline_id).where(STEPS.c.id == bindparam("step_id")).scalar_subquery()
_PIPELINE_ROWS = (
    select(*_CLAIM_COLUMNS)
    .join_from(STEPS, PIPELINES, PIPELINES.c.id == STEPS.c.pipeline_id)
    .where(STEPS.c.pipeline_id == _of_step)
    .order_by(STEPS.c.position)
)
# A step queued for a retry is not due before its ``not_before``: no worker runs it sooner.
_due = or_(STEPS.c.not_before.is_(None), STEPS.c.not_before <= bindparam("b_now"))
# The most urgent copy that is due: one whose retry waits out its backoff never takes the turn of
# one that can run now.
_URGENT_COPY = (
    select(STEPS.c.id)
    .where(STEPS.c.kind == StepKind.STORE.value, STEPS.c.status == StepStatus.QUEUED.value, _due)
    .order_by(STEPS.c.deadline_at.is_(None), STEPS.c.deadline_at)
    .limit(1)
)
_URGENT_COPY_LOCKED = _URGENT_COPY.with_for_update(skip_locked=True)
_CANCEL_QUEUED = (
    update(STEPS)
    .where(STEPS.c.id == bindparam("b_id"), STEPS.c.status == StepStatus.QUEUED.value)
    .values(status=StepStatus.CANCELLED.value, updated_at=bindparam("b_now"))
)
_PIPELINE_RUNNING = (
    update(PIPELINES)
    .where(PIPELINES.c.id == bindparam("b_id"), PIPELINES.c.status == PipelineStatus.PENDING.value)
    .values(status=PipelineStatus.RUNNING.value, updated_at=bindparam("b_now"))
)
_CLAIM = (
    update(STEPS)
    .where(
        STEPS.c.id == bindparam("b_id"),
        STEPS.c.status == StepStatus.QUEUED.value,
        STEPS.c.attempts == bindparam("b_attempts"),
        STEPS.c.updated_at == bindparam("b_seen"),  # unchanged since the read, whatever happened between
        _due,
    )
    .values(
        status=StepStatus.RUNNING.value,
        attempts=bindparam("b_next_attempts"),
        started_at=bindparam("b_started"),
        updated_at=bindparam("b_now"),
        lease_owner=bindparam("b_owner"),
        lease_until=bindparam("b_lease"),
        not_before=None,
    )
)
_STEP_SUCCEEDED = (
    update(STEPS)
    .where(STEPS.c.id == bindparam("b_id"), STEPS.c.status.not_in(_ENDED_STEP))
    .values(
        status=StepStatus.SUCCEEDED.value,
        output=bindparam("b_output"),
        finished_at=bindparam("b_now"),
        error_code=None,
        error_message=None,
        updated_at=bindparam("b_now"),
    )
)
_alive = exists().where(PIPELINES.c.id == bindparam("b_pipeline"), PIPELINES.c.status.not_in(_ENDED_PIPELINE))
_NEXT_QUEUED = (
    update(STEPS)
    .where(STEPS.c.id == bindparam("b_id"), STEPS.c.status == StepStatus.PENDING.value, _alive)
    .values(status=StepStatus.QUEUED.value, deadline_at=bindparam("b_deadline"), updated_at=bindparam("b_now"))
)
# PostgreSQL: the step's success and its next step's queueing in one statement (one round trip
# instead of two); the next step is queued only if the step's own UPDATE found it unfinished, as
# ``finish_step``'s two statements do on SQLite. Returns how many rows each UPDATE changed.
_done = _STEP_SUCCEEDED.returning(STEPS.c.id).cte("done")
_queued = (
    update(STEPS)
    .where(
        STEPS.c.id == bindparam("b_next"), STEPS.c.status == StepStatus.PENDING.value, _alive, exists(_done.select())
    )
    .values(status=StepStatus.QUEUED.value, deadline_at=bindparam("b_deadline"), updated_at=bindparam("b_now"))
    .returning(STEPS.c.id)
    .cte("queued")
)
_SUCCEEDED_AND_NEXT_QUEUED = select(
    select(func.count()).select_from(_done).scalar_subquery().label("finished"),
    select(func.count()).select_from(_queued).scalar_subquery().label("queued"),
)
_cost_of = (
    select(func.coalesce(func.sum(CALLS.c.cost_usd), 0))
    .where(CALLS.c.pipeline_id == bindparam("b_pipeline"))
    .scalar_subquery()
)
PIPELINE_COST = (
    update(PIPELINES)
    .where(PIPELINES.c.id == bindparam("b_pipeline"))
    .values(cost_usd=_cost_of, updated_at=bindparam("b_now"))
)
_PIPELINE_SUCCEEDED = (
    update(PIPELINES)
    .where(PIPELINES.c.id == bindparam("b_pipeline"), PIPELINES.c.status.not_in(_ENDED_PIPELINE))
    .values(
        status=PipelineStatus.SUCCEEDED.value,
        finished_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        cost_usd=_cost_of,
    )
)
_PIPELINE_SUCCEEDED_PG = _PIPELINE_SUCCEEDED.returning(holds_any("b_pipeline").label("holds"))


def pipeline_rows(s: Session, step_id: str) -> Sequence[Any]:
    """Every step of ``step_id``'s pipeline, in order, each with its pipeline's columns: one SELECT."""
    rows: Sequence[Any] = s.connection().execute(_PIPELINE_ROWS, {"step_id": step_id}).all()
    return rows


def _most_urgent_copy(s: Session, rt: Runtime, nudged: str) -> str:
    """Copies run earliest-deadline first: a nudge for any copy step runs the most urgent one
    that is waiting (every copy step has its own nudge, so none is left behind). On PostgreSQL
    the row is locked and copies other workers hold are skipped."""
    query = _URGENT_COPY_LOCKED if rt.db.is_postgres else _URGENT_COPY
    found: str | None = s.connection().execute(query, {"b_now": utcnow()}).scalar()
    return found or nudged


def _begin(rt: Runtime, step_id: str) -> Claim | None:
    """Claim the step in one transaction, or find there is nothing to do. Safe to repeat."""
    with rt.db.transaction() as s:
        rows = pipeline_rows(s, step_id)
        me = next((r for r in rows if r.id == step_id), None)
        if me is not None and me.kind == StepKind.STORE:
            urgent = _most_urgent_copy(s, rt, step_id)
            if urgent != step_id:
                rows = pipeline_rows(s, urgent)
                me = next((r for r in rows if r.id == urgent), None)
        if me is None:
            log.warning("unknown_step", step_id=step_id)
            return None
        if me.status != StepStatus.QUEUED:
            # Done already, owned by the poller, or running elsewhere right now. A step whose
            # worker died stays RUNNING until the sweeper finds it stale and queues it again.
            return None
        now = utcnow()
        if me.pipeline_status in PIPELINE_TERMINAL:
            s.connection().execute(_CANCEL_QUEUED, {"b_id": me.id, "b_now": now})
            return None
        earlier = [x for x in rows if x.position < me.position]
        if any(x.status != StepStatus.SUCCEEDED for x in earlier):
            return None  # out of order nudge; the right one comes when the earlier step finishes
        if (me.batch_window or me.priority == "batch") and batch_hold(s, rt, me, now) is not None:
            return None  # outside its window, or the batch's share of workers is taken: due later
        profile = rt.catalog.profiles.get(me.profile)
        if profile is None:
            raise ConfigError(f"Profile {me.profile!r} is no longer in the catalog.")
        conn = s.connection()
        if me.pipeline_status == PipelineStatus.PENDING:  # the pipeline's row first, as cancel locks it
            conn.execute(_PIPELINE_RUNNING, {"b_id": me.pipeline_id, "b_now": now})
        won = conn.execute(
            _CLAIM,
            {
                "b_id": me.id,
                "b_attempts": me.attempts,
                "b_next_attempts": me.attempts + 1,
                "b_started": me.started_at or now,
                "b_seen": me.updated_at,
                "b_now": now,
                "b_owner": rt.leases.owner,
                "b_lease": now + timedelta(seconds=rt.settings.lease_s),
            },
        )
        if won.rowcount != 1:
            return None  # another worker claimed it (or it was cancelled) since the read
        ctx = StepContext(
            step_id=me.id,
            pipeline_id=me.pipeline_id,
            kind=me.kind,
            attempt=me.attempts + 1,
            user_id=me.user_id,
            feature=me.feature,
            profile=profile,
            description=me.description,
            image_url=me.image_url,
            image_ref=me.image_ref,
            models=dict(me.models or {}),
            outputs={x.kind: dict(x.output or {}) for x in earlier},
            deadline_at=me.deadline_at,
            first_run=not me.left_behind,
            no_cache=bool(me.no_cache),
            batch=me.priority == "batch",
        )
        prepare = PREPARE.get(ctx.kind)
        if prepare is not None:
            ctx = replace(ctx, prepared=prepare(s, rt, ctx))
        nxt = next((x for x in rows if x.position == me.position + 1), None)
        return Claim(
            ctx=ctx,
            next_step_id=nxt.id if nxt is not None else None,
            next_kind=nxt.kind if nxt is not None else None,
            priority=me.priority,
            callback_url=me.callback_url,
        )


@dataclass(frozen=True)
class Finish:
    """What a step's completion writes, and what it needs to know of the steps after it."""

    step_id: str
    pipeline_id: str
    output: dict[str, Any]
    next_step_id: str | None
    next_kind: str | None
    priority: str
    callback_url: str | None


def finish_step(s: Session, finish: Finish, now: datetime) -> Effects:
    """In the caller's transaction: the step succeeded, then the next step queued or the pipeline
    ended (its cost summed in the same statement). Each UPDATE is conditional, so a cancel or a
    repeat in between changes nothing (on PostgreSQL the first two are one statement). The
    worker's completions and the poller's both end here."""
    effects, conn = Effects(), s.connection()
    if finish.next_step_id is not None and conn.dialect.name == "postgresql":
        assert finish.next_kind is not None
        both = conn.execute(
            _SUCCEEDED_AND_NEXT_QUEUED,
            {
                "b_id": finish.step_id,
                "b_output": finish.output,
                "b_now": now,
                "b_next": finish.next_step_id,
                "b_pipeline": finish.pipeline_id,
                "b_deadline": earliest_expiry(finish.output),
            },
        ).one()
        if both.queued == 1:
            effects.nudges.append(nudge(finish.next_step_id, finish.next_kind, finish.priority, finish.pipeline_id))
        return effects
    finished = conn.execute(_STEP_SUCCEEDED, {"b_id": finish.step_id, "b_output": finish.output, "b_now": now})
    if finished.rowcount != 1:
        return effects
    if finish.next_step_id is not None:
        assert finish.next_kind is not None
        deadline = earliest_expiry(finish.output)
        queued = conn.execute(
            _NEXT_QUEUED,
            {"b_id": finish.next_step_id, "b_pipeline": finish.pipeline_id, "b_deadline": deadline, "b_now": now},
        )
        if queued.rowcount == 1:
            effects.nudges.append(nudge(finish.next_step_id, finish.next_kind, finish.priority, finish.pipeline_id))
        return effects
    params = {"b_pipeline": finish.pipeline_id, "b_now": now}
    if conn.dialect.name == "postgresql":  # with whether it holds anything on a cap: most hold nothing
        row = conn.execute(_PIPELINE_SUCCEEDED_PG, params).first()
        ended, holds = row is not None, bool(row is not None and row.holds)
    else:
        ended = holds = conn.execute(_PIPELINE_SUCCEEDED, params).rowcount == 1
    if ended:
        if holds:
            release(conn, finish.pipeline_id)  # what the caps still hold for it, not spent
        if finish.callback_url:
            effects.finished.append(finish.pipeline_id)
    return effects


def finish_from_rows(rows: Sequence[Any], step_id: str, output: dict[str, Any]) -> Finish | None:
    """``Finish`` for ``step_id`` from its pipeline's rows (``pipeline_rows``); None if it has none."""
    me = next((r for r in rows if r.id == step_id), None)
    if me is None:
        return None
    nxt = next((r for r in rows if r.position == me.position + 1), None)
    return Finish(
        step_id=step_id,
        pipeline_id=me.pipeline_id,
        output=output,
        next_step_id=nxt.id if nxt is not None else None,
        next_kind=nxt.kind if nxt is not None else None,
        priority=me.priority,
        callback_url=me.callback_url,
    )


def _complete(rt: Runtime, claim: Claim, done: Done, hold: AuditHold) -> Effects:
    """The step's completion in one transaction: the audit rows held for it, the step's own rows,
    then ``finish_step``."""
    ctx = claim.ctx
    finish = Finish(
        step_id=ctx.step_id,
        pipeline_id=ctx.pipeline_id,
        output=done.output,
        next_step_id=claim.next_step_id,
        next_kind=claim.next_kind,
        priority=claim.priority,
        callback_url=claim.callback_url,
    )
    with hold.committed_with() as records, rt.db.transaction() as s:
        write_audit(s, records)
        if done.write is not None:
            done.write(s)
        return finish_step(s, finish, utcnow())


@dataclass(frozen=True)
class StepOutcome:
    """Where ``run_step`` left the step it ran, in ids (for the broker's task and Flower): ``state``
    is "succeeded", "waiting" (its provider job is in flight), "retry" (queued again) or "failed"
    (for good, its pipeline with it; ``code`` and ``message`` are the stored, scrubbed reason)."""

    step_id: str
    pipeline_id: str
    kind: str
    state: str
    code: str | None = None
    message: str | None = None


def run_step(rt: Runtime, step_id: str) -> StepOutcome | None:
    """Run one step to its next resting point. Safe to call any number of times. None: there
    was nothing to do (done already, running elsewhere, not due)."""
    claim = _begin(rt, step_id)
    if claim is None:
        return None
    ctx = claim.ctx
    try:
        # Successful provider calls' audit rows are held and committed with the transaction that
        # uses their answer; if the step raises first, the hold writes them on their own. The
        # step's lease is renewed for as long as it runs.
        with rt.leases.held(ctx.step_id), holding(rt.gateway.audit) as hold:
            outcome = STEP_FUNCTIONS[ctx.kind](rt, ctx)
            effects = _complete(rt, claim, outcome, hold) if isinstance(outcome, Done) else None
    except GenlineError as err:
        return _after_error(
            rt,
            ctx,
            err.code,
            err.message,
            retryable=err.retryable,
            refund=isinstance(err, ProviderError) and err.nothing_sent,
            wait_s=getattr(err, "retry_after", None),
        )
    except (OperationalError, httpx.HTTPError) as exc:  # database or network hiccup
        return _after_error(
            rt,
            ctx,
            "transient_error",
            f"a database or network error kept recurring ({type(exc).__name__})",
            retryable=True,
            refund=False,
        )
    if effects is not None:
        apply_effects(rt, effects)
        log.info("step_succeeded", step_id=ctx.step_id, pipeline_id=ctx.pipeline_id, kind=ctx.kind, attempt=ctx.attempt)
        return StepOutcome(ctx.step_id, ctx.pipeline_id, ctx.kind, "succeeded")
    log.info("step_waiting", step_id=ctx.step_id, pipeline_id=ctx.pipeline_id, kind=ctx.kind, attempt=ctx.attempt)
    return StepOutcome(ctx.step_id, ctx.pipeline_id, ctx.kind, "waiting")


def may_retry(rt: Runtime, kind: str, attempts: int, deadline: datetime | None) -> bool:
    """A copy is retried until its link expires; any other step up to its attempt budget."""
    if kind == StepKind.STORE and deadline is not None:
        return utcnow() < deadline
    return attempts < rt.settings.step_max_attempts


def retry_at(rt: Runtime, attempts: int, now: datetime, deadline: datetime | None) -> datetime:
    """When a step that failed its ``attempts``-th run is due again: an exponential backoff with
    jitter (``GENLINE_STEP_RETRY_BACKOFF_S`` doubling up to ``GENLINE_STEP_RETRY_BACKOFF_CAP_S``),
    its own and independent of other traffic; a copy waits at most half the time its link has
    left, so its last tries still come before the link expires."""
    s = rt.settings
    delay = min(s.step_retry_backoff_cap_s, s.step_retry_backoff_s * 2 ** max(0, attempts - 1))
    delay = random.uniform(delay / 2, delay)
    if deadline is not None:
        delay = min(delay, max(0.0, (deadline - now).total_seconds() / 2))
    return now + timedelta(seconds=delay)


def _after_error(
    rt: Runtime,
    ctx: StepContext,
    code: str,
    message: str,
    *,
    retryable: bool,
    refund: bool,
    wait_s: float | None = None,
) -> StepOutcome:
    bound = log.bind(step_id=ctx.step_id, pipeline_id=ctx.pipeline_id, kind=ctx.kind, attempt=ctx.attempt)
    if retryable and (refund or may_retry(rt, ctx.kind, ctx.attempt, ctx.deadline_at)):
        _requeue(rt, ctx.step_id, code, message, refund=refund, wait_s=wait_s)
        bound.warning("step_will_retry", code=code, message=message)
        return StepOutcome(ctx.step_id, ctx.pipeline_id, ctx.kind, "retry", code)
    bound.warning("step_failed", code=code, message=message)
    _fail(rt, ctx.step_id, code, message)
    return StepOutcome(ctx.step_id, ctx.pipeline_id, ctx.kind, "failed", code, scrub_text(message) or "")


def _fail(rt: Runtime, step_id: str, code: str, message: str) -> None:
    with rt.db.transaction() as s:
        effects = fail_step(s, s.get_one(Step, step_id), code, message)
    apply_effects(rt, effects)


def _requeue(
    rt: Runtime, step_id: str, code: str, message: str, *, refund: bool = False, wait_s: float | None = None
) -> None:
    """Back to QUEUED, due again after its backoff (``retry_at``); the sweeper sends it then, so a
    retry never waits in a worker slot or in a broker countdown. A try that genline refused before
    anything reached the provider (an open breaker, a pause, the request budget) does not count as
    an attempt, and waits ``GENLINE_SWEEP_AFTER_S`` at most: less when what refused it said when it
    clears (the budget's ``retry_after``, the pause's end)."""
    pause_ends = None
    if refund and code == ProviderPaused.code:  # read before the transaction: SQLite has one writer
        pause = read_pause(rt.shared)
        pause_ends = pause.until if pause is not None else None
    with rt.db.transaction() as s:
        step = s.get_one(Step, step_id)
        if step.status == StepStatus.RUNNING:
            now = utcnow()
            step.status = StepStatus.QUEUED
            step.error_code, step.error_message = code, scrub_text(message)
            step.lease_owner = step.lease_until = None
            step.updated_at = now
            if refund:
                step.attempts = max(0, step.attempts - 1)
                step.not_before = now + timedelta(seconds=min(rt.settings.sweep_after_s, wait_s or math.inf))
                if pause_ends is not None:
                    step.not_before = min(step.not_before, pause_ends)  # due again when the pause ends
            else:
                step.not_before = retry_at(rt, step.attempts, now, step.deadline_at)


def notify_callback(rt: Runtime, pipeline_id: str) -> None:
    """Tell the application, if it asked, that a pipeline reached its end: a signed webhook,
    recorded and tried once now, then retried by the sweeper with backoff for
    GENLINE_WEBHOOK_RETRY_FOR_S; its state shows in ``genline status`` (pipelines/callbacks.py)."""
    from genline.pipelines.callbacks import pipeline_ended

    pipeline_ended(rt, pipeline_id)
