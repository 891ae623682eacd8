"""Overnight batch windows, and the batch's share of the workers.

A batch window is a time of day in UTC, ``"HH:MM-HH:MM"`` (``"01:00-06:00"``); it may wrap past
midnight (``"22:00-04:00"``), and its start is inside it, its end is not. A pipeline with a window
(``pipelines.batch_window``) starts only inside it, and the WORKER enforces that, not the
submitter: ``batch_hold``, called by the engine in the claiming transaction, leaves a step that
is outside its window QUEUED with ``not_before`` at the next opening, and the sweeper
(``workers/sweeper.py``) sends it again then. Only a pipeline's start is held: once its first
step ran, the pipeline goes on to its end whatever the hour, because the provider's result links
it depends on expire (a video copied a day late is a video paid for and lost).

Batch work (priority ``batch``) gets at most ``GENLINE_BATCH_MAX_RUNNING`` steps running at once
across the fleet, whatever the number of worker processes that take from its queue: above that
count ``batch_hold`` puts the step back for ``GENLINE_BATCH_THROTTLE_S`` (with jitter), so
interactive work always finds its workers. Copies to storage are not throttled: their links
expire, a store nudge runs whichever copy is most urgent (a throttled batch copy would leave an
interactive one waiting for the next nudge), and there are only as many batch copies as batch
videos, which the throttle already paces. On PostgreSQL the count is taken under a transaction
advisory lock, so two workers cannot both see room for one more; SQLite's ``BEGIN IMMEDIATE``
already runs claims one at a time.

``submit_in_window`` is how ``genline batch --window`` accepts a request: the pipeline row is
written with its window, in the submit's one transaction.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from genline.config.constants import PipelineStatus, StepKind, StepStatus
from genline.config.errors import ValidationError
from genline.config.logging import get_logger
from genline.pipelines.request import PipelineRequest
from genline.pipelines.runtime import Runtime
from genline.storage.models import Pipeline, Step

if TYPE_CHECKING:
    from genline.pipelines.submit import Accepted

log = get_logger("genline.windows")
STEPS = cast(Table, Step.__table__)
PIPELINES = cast(Table, Pipeline.__table__)
BATCH = "batch"
_FORM = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
_DAY = timedelta(days=1)
# pg_advisory_xact_lock's key for "a batch step is being claimed": any constant no other lock uses.
_BATCH_CLAIM_LOCK = 0x67656E6C696E6562  # "genlineb"


@dataclass(frozen=True)
class Window:
    """A daily window in UTC; ``start`` is inside it, ``end`` is not."""

    start: time
    end: time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    @property
    def wraps(self) -> bool:
        """It runs past midnight (22:00-04:00)."""
        return self.end < self.start

    def contains(self, now: datetime) -> bool:
        t = _utc(now).time()
        if self.wraps:
            return t >= self.start or t < self.end
        return self.start <= t < self.end


def parse_window(text: str) -> Window:
    """``"HH:MM-HH:MM"`` (UTC, 24-hour clock) as a ``Window``; anything else is ``window_invalid``."""
    match = _FORM.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValidationError(
            "A batch window is two UTC times of day, HH:MM-HH:MM, such as 01:00-06:00.",
            code="window_invalid",
            field="window",
        )
    hours_1, minutes_1, hours_2, minutes_2 = (int(g) for g in match.groups())
    if not (hours_1 < 24 and hours_2 < 24 and minutes_1 < 60 and minutes_2 < 60):
        raise ValidationError(
            "A batch window's times must be real times of day, from 00:00 to 23:59.",
            code="window_invalid",
            field="window",
        )
    window = Window(time(hours_1, minutes_1), time(hours_2, minutes_2))
    if window.start == window.end:
        raise ValidationError(
            "A batch window must not start and end at the same time; leave --window out to run at any hour.",
            code="window_invalid",
            field="window",
        )
    return window


def next_opening(window: Window | str, now: datetime) -> datetime | None:
    """When ``window`` next opens after ``now`` (aware, UTC); ``None`` when ``now`` is inside it."""
    w = parse_window(window) if isinstance(window, str) else window
    now = _utc(now)
    if w.contains(now):
        return None
    opening = datetime.combine(now.date(), w.start, tzinfo=UTC)
    return opening if opening > now else opening + _DAY


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("a batch window is checked against an aware datetime (UTC)")
    return moment.astimezone(UTC)


# --- the worker side: held outside the window, throttled inside it --------------------------------
_DEFER = (
    update(STEPS)
    .where(
        STEPS.c.id == bindparam("b_id"),
        STEPS.c.status == StepStatus.QUEUED.value,
        STEPS.c.updated_at == bindparam("b_seen"),
    )
    .values(not_before=bindparam("b_at"), updated_at=bindparam("b_now"))
)
_BATCH_RUNNING = (
    select(func.count())
    .select_from(STEPS.join(PIPELINES, PIPELINES.c.id == STEPS.c.pipeline_id))
    .where(STEPS.c.status == StepStatus.RUNNING.value, PIPELINES.c.priority == BATCH)
)


def batch_hold(s: Session, rt: Runtime, row: Any, now: datetime) -> datetime | None:
    """In the engine's claiming transaction, for a step of a pipeline with a window or of batch
    priority (``row`` is its claim row): when it is due instead, if not now. The step is then left
    QUEUED with ``not_before`` at that time (a conditional UPDATE: nothing if the row changed
    since it was read), for the sweeper to send again; ``None`` means claim it now."""
    at = _window_hold(row, now)
    if at is None and row.priority == BATCH and row.kind != StepKind.STORE:
        at = _throttle(s, rt, now)
    if at is None:
        return None
    s.connection().execute(_DEFER, {"b_id": row.id, "b_seen": row.updated_at, "b_at": at, "b_now": now})
    return at


def _window_hold(row: Any, now: datetime) -> datetime | None:
    """The next opening of a pipeline's window, when it has one, has not started, and now is outside."""
    if not row.batch_window or row.pipeline_status != PipelineStatus.PENDING:
        return None
    try:
        window = parse_window(row.batch_window)
    except ValidationError:  # written by hand, past the API's check: run it rather than hold it forever
        log.warning("batch_window_unreadable", pipeline_id=row.pipeline_id)
        return None
    opening = next_opening(window, now)
    if opening is not None:
        log.info("batch_held_for_window", step_id=row.id, pipeline_id=row.pipeline_id, opens_at=opening.isoformat())
    return opening


def _throttle(s: Session, rt: Runtime, now: datetime) -> datetime | None:
    """A later time when the batch's share of running steps is taken, else ``None``."""
    conn = s.connection()
    if rt.db.is_postgres:  # held to the end of the claiming transaction: claims of batch steps queue here
        conn.execute(select(func.pg_advisory_xact_lock(_BATCH_CLAIM_LOCK)))
    running = int(conn.execute(_BATCH_RUNNING).scalar() or 0)
    if running < rt.settings.batch_max_running:
        return None
    wait = rt.settings.batch_throttle_s
    return now + timedelta(seconds=random.uniform(wait, 2 * wait))


# --- the submitting side ---------------------------------------------------------------------------
def submit_in_window(rt: Runtime, request: PipelineRequest, window: Window | None) -> Accepted:
    """``submit_pipeline`` for batch work: a batch request given a window is written with it, in the
    submit's own transaction, so no worker ever sees the pipeline without its window. A pipeline
    already accepted under the key is answered as it is (the window is not part of the request's
    identity: resubmitting a file with another window changes nothing)."""
    from genline.pipelines.submit import submit_pipeline  # submit imports the engine, which imports this module

    if window is not None and request.priority == BATCH:
        request = replace(request, batch_window=str(window))
    return submit_pipeline(rt, request)
