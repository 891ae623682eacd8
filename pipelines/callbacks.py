"""Webhooks genline sends, signed per Standard Webhooks and retried until they land or time runs out.

Two kinds, one mechanism (rows of ``callback_deliveries``, ``storage/models.py``):

- **pipeline_ended**: a pipeline with a ``callback_url`` reached its end. Recorded and tried once at
  once by the worker that ended it (``pipeline_ended``); further tries come from the sweeper.
- **alert**: an operators' alert (``GENLINE_ALERT_WEBHOOK_URL``): the provider account paused, a
  copy at risk, a spend cap reached. ``provider/stages.py`` ``alert`` must never wait on a slow URL
  (it runs inside provider calls), so it only appends the alert to a small outbox in the shared
  state (``queue_alert``: two writes); the sweeper turns the outbox into rows and sends them. A
  spend cap that reached 100% is read from its ledger row (``spend_caps.alerted_pct``), where the
  spend code marks it: the code that crosses a cap has no runtime at hand to queue anything.

**Signing** (https://www.standardwebhooks.com, spec 1.0): headers ``webhook-id`` (``msg_...``, the
same on every try of one delivery: the receiver's idempotency key), ``webhook-timestamp`` (unix
seconds of this try) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` of
``{webhook-id}.{webhook-timestamp}.{body}`` keyed by the base64-decoded part of each
``GENLINE_WEBHOOK_SECRET`` after ``whsec_``; with several secrets (a rotation) one signature per
secret, space-separated, the first secret's first. The body is compact key-sorted JSON, the same
bytes on every try. Without a secret the webhook goes unsigned (id and timestamp only). Signing is
hand-written over the standard library's ``hmac`` (a few lines) on purpose: the ``standardwebhooks``
package is what the tests verify with, so it stays an independent implementation of the spec.

**A try** is one POST through ``rt.downloads`` (``provider/safe_http.py``: public addresses only,
resolved and checked again at every try, whatever the address was at submit), following no
redirect, within ``TRY_DEADLINE_S`` (the worker's first try: ``FIRST_TRY_DEADLINE_S``, as long as
callbacks always took), its answer's body never read. A 2xx delivers; a 3xx (not
followed), any other status, a timeout or a connection error is a failed try, recorded
(``attempts``, ``last_status_code``, ``last_error``). A 410 Gone, or an address genline refuses to
reach, ends the delivery at once (``failed``). Otherwise the next try comes after ``SCHEDULE_S``
(the spec's example: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, then every 24 h), plus up to
10% jitter, or after the receiver's ``Retry-After`` if that is longer, as long as it falls within
``GENLINE_WEBHOOK_RETRY_FOR_S`` of the delivery's creation; then the delivery is ``failed`` for
good and an error-level log event marked ``alert`` says so.

**Claims**: a sweeper claims a due row by moving its ``next_try_at`` ``CLAIM_S`` ahead in a
conditional UPDATE only one sweeper can win, so a try is not made twice at once; a process that
dies mid-try leaves the row due again after the claim. A receiver may still see a webhook twice
(an answer lost on the way back): that is what ``webhook-id`` is for.

Neither a secret nor a signature is ever logged or stored, nor the URL (it may carry a token).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import httpx
from sqlalchemy import Table, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from genline.config.clock import utcnow
from genline.config.logging import get_logger
from genline.config.settings import WEBHOOK_SECRET_PREFIX, Secret
from genline.provider.safe_http import UnsafeURL, deadline_in
from genline.storage.models import CallbackDelivery, Pipeline, SpendCap, new_id

if TYPE_CHECKING:
    from genline.pipelines.runtime import Runtime
    from genline.provider.shared_state import SharedState

log = get_logger("genline.callbacks")
DELIVERIES = cast(Table, CallbackDelivery.__table__)

KIND_PIPELINE, KIND_ALERT = "pipeline_ended", "alert"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
EVENT_PIPELINE_ENDED = "pipeline.ended"
SCHEDULE_S = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)  # after the 1st, 2nd, ... failed try
JITTER = 0.1  # each wait is lengthened by up to this share, so receivers that failed together are not retried together
TRY_DEADLINE_S = 15.0  # one try from the sweeper, in all (the spec recommends 15 to 30 s)
FIRST_TRY_DEADLINE_S = 10.0  # the first try, made by the worker that ended the pipeline: it waits no longer
CLAIM_S = 60.0  # a claimed try not settled by then is due again (its process died)
MAX_RETRY_AFTER_S = 86400.0
SEND_THREADS = 8  # tries the sweeper makes at once
CAP_LOOKBACK_S = 3600.0  # a spend cap that reached its limit this recently is looked at for an alert

# The alert outbox in the shared state: a counter, one slot per alert, and how far sweepers have read.
OUTBOX_SEQ = "webhooks:alerts:seq"
OUTBOX_READ = "webhooks:alerts:read"
OUTBOX_SLOT = "webhooks:alerts:slot:"
OUTBOX_TTL_S = 86400.0
OUTBOX_COUNTER_TTL_S = 10 * 365 * 86400.0  # the counter must not restart under slots still alive
OUTBOX_BATCH = 200


# --- signing ---------------------------------------------------------------------------------------
def signing_keys(secrets: Sequence[Secret]) -> list[bytes]:
    """The HMAC keys of ``whsec_`` secrets (validated at start-up by ``config/settings.py``)."""
    keys = []
    for secret in secrets:
        body = secret.reveal()[len(WEBHOOK_SECRET_PREFIX) :]
        keys.append(base64.b64decode(body + "=" * (-len(body) % 4)))
    return keys


def sign(keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64>`` per key, space-separated."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode() for key in keys)


def encode(payload: Mapping[str, Any]) -> bytes:
    """The body: compact, key-sorted JSON, so every try sends (and signs) the same bytes."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def headers_for(keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
    }
    if keys:
        headers["webhook-signature"] = sign(keys, webhook_id, timestamp, body)
    return headers


# --- one try ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What one try came to; ``error`` is a plain sentence that never repeats the URL."""

    delivered: bool
    status_code: int | None = None
    error: str | None = None
    final: bool = False  # no further try makes sense (410 Gone, an address genline will not reach)
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Pending:
    """What a try needs from a row, read in a transaction and used after it."""

    id: str
    webhook_id: str
    url: str
    payload: dict[str, Any]
    attempts: int


def attempt(rt: Runtime, item: Pending, deadline_s: float = TRY_DEADLINE_S) -> Outcome:
    """POST ``item`` once, within ``deadline_s`` in all; never raises for the receiver's sake."""
    timestamp = int(utcnow().timestamp())
    body = encode(item.payload)
    headers = headers_for(signing_keys(rt.settings.webhook_secrets), item.webhook_id, timestamp, body)
    try:
        with rt.downloads.stream(
            "POST",
            item.url,
            content=body,
            headers=headers,
            follow_redirects=False,
            extensions=deadline_in(deadline_s),
        ) as answer:
            code = answer.status_code
            retry_after = _retry_after(answer.headers.get("retry-after"))
    except UnsafeURL as exc:
        return Outcome(False, error=f"Refused: {exc.message}", final=True)
    except httpx.TimeoutException:
        return Outcome(False, error=f"The receiver did not answer within {deadline_s:g} s.")
    except httpx.HTTPError as exc:
        return Outcome(False, error=f"The request could not be made ({type(exc).__name__}).")
    if 200 <= code < 300:
        return Outcome(True, status_code=code)
    if 300 <= code < 400:
        return Outcome(
            False, code, f"The receiver answered a redirect (HTTP {code}), which is not followed: give the final URL."
        )
    if code == 410:
        return Outcome(False, code, "The receiver answered 410 Gone: it wants no more webhooks.", final=True)
    return Outcome(False, code, f"The receiver answered HTTP {code}.", retry_after_s=retry_after)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the date form is not worth trusting a stranger's clock for)."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), MAX_RETRY_AFTER_S)


def next_try_at(attempts: int, now: datetime, retry_after_s: float | None = None) -> datetime:
    """When the try after ``attempts`` failed ones comes."""
    wait = float(SCHEDULE_S[min(attempts, len(SCHEDULE_S)) - 1])
    wait *= 1 + random.uniform(0, JITTER)
    if retry_after_s is not None:
        wait = max(wait, retry_after_s)
    return now + timedelta(seconds=wait)


def settle(rt: Runtime, item: Pending, outcome: Outcome) -> None:
    """Record a try: delivered, due again later, or failed for good."""
    now = utcnow()
    window = timedelta(seconds=rt.settings.webhook_retry_for_s)
    with rt.db.transaction() as s:
        row = s.get(CallbackDelivery, item.id)
        if row is None or row.state != PENDING:
            return
        row.attempts += 1
        row.updated_at = now
        row.last_status_code = outcome.status_code
        fields = {
            "delivery_id": row.id,
            "webhook_id": row.webhook_id,
            "webhook_event": row.event,
            "attempts": row.attempts,
        }
        if row.pipeline_id:
            fields["pipeline_id"] = row.pipeline_id
        if outcome.delivered:
            row.state, row.delivered_at, row.next_try_at, row.last_error = DELIVERED, now, None, None
            log.info("webhook_delivered", status_code=outcome.status_code, **fields)
            return
        row.last_error = (outcome.error or "The try failed.")[:300]
        later = next_try_at(row.attempts, now, outcome.retry_after_s)
        if outcome.final or later > row.created_at + window:
            row.state, row.next_try_at = FAILED, None
            log.error(
                "webhook_failed",
                alert=True,
                status_code=outcome.status_code,
                error=row.last_error,
                why="refused" if outcome.final else "retry_window_over",
                **fields,
            )
            return
        row.next_try_at = later
        log.warning(
            "webhook_try_failed",
            status_code=outcome.status_code,
            error=row.last_error,
            next_try_in_s=round((later - now).total_seconds()),
            **fields,
        )


def _try(rt: Runtime, item: Pending, deadline_s: float = TRY_DEADLINE_S) -> None:
    settle(rt, item, attempt(rt, item, deadline_s))


def _pending(row: CallbackDelivery) -> Pending:
    return Pending(row.id, row.webhook_id, row.url, dict(row.payload), row.attempts)


# --- recording -------------------------------------------------------------------------------------
def _new_row(
    *,
    kind: str,
    url: str,
    event: str,
    payload: dict[str, Any],
    now: datetime,
    webhook_id: str | None = None,
    pipeline_id: str | None = None,
    claimed: bool = False,
) -> CallbackDelivery:
    return CallbackDelivery(
        id=new_id("whd"),
        webhook_id=webhook_id or f"msg_{uuid.uuid4().hex}",
        kind=kind,
        pipeline_id=pipeline_id,
        url=url,
        event=event,
        payload=payload,
        state=PENDING,
        attempts=0,
        next_try_at=now + timedelta(seconds=CLAIM_S) if claimed else now,
        created_at=now,
        updated_at=now,
    )


def pipeline_webhook_id(pipeline_id: str) -> str:
    """One pipeline ends once: its callback's id is derived from it (no ``.`` in it, as the spec asks)."""
    return f"msg_{pipeline_id}_ended"


def pipeline_ended(rt: Runtime, pipeline_id: str) -> None:
    """Record the callback of a pipeline that ended (if it asked for one) and try it once now."""
    now = utcnow()
    try:
        with rt.db.transaction() as s:
            pipeline = s.get(Pipeline, pipeline_id)
            if pipeline is None or not pipeline.callback_url:
                return
            webhook_id = pipeline_webhook_id(pipeline.id)
            if s.scalar(select(CallbackDelivery.id).where(CallbackDelivery.webhook_id == webhook_id)):
                return  # recorded already (this ran twice): the sweeper tries it when it is due
            row = _new_row(
                kind=KIND_PIPELINE,
                url=pipeline.callback_url,
                event=EVENT_PIPELINE_ENDED,
                payload={"pipeline_id": pipeline.id, "status": str(pipeline.status), "error_code": pipeline.error_code},
                now=now,
                webhook_id=webhook_id,
                pipeline_id=pipeline.id,
                claimed=True,  # this process tries it now; due again for the sweeper if it dies meanwhile
            )
            s.add(row)
            s.flush()
            item = _pending(row)
    except IntegrityError:
        return  # another process recorded it at the same moment
    _try(rt, item, FIRST_TRY_DEADLINE_S)


def callback_status(s: Session, pipeline_id: str) -> dict[str, Any]:
    """A pipeline's callback as ``status`` shows it: ``waiting`` until the pipeline ends."""
    row = s.scalar(
        select(CallbackDelivery).where(
            CallbackDelivery.pipeline_id == pipeline_id, CallbackDelivery.kind == KIND_PIPELINE
        )
    )
    if row is None:
        return {"state": "waiting", "attempts": 0, "last_status_code": None, "last_error": None, "next_try_at": None}
    return {
        "state": row.state,
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "next_try_at": row.next_try_at.isoformat() if row.next_try_at else None,
        "webhook_id": row.webhook_id,
    }


# --- alerts ----------------------------------------------------------------------------------------
def queue_alert(state: SharedState, event: str, fields: Mapping[str, object]) -> None:
    """Put an alert in the shared outbox for the sweeper to send (two writes, no waiting on a URL).
    Its fields are made JSON (anything else becomes its text). Never raises."""
    try:
        payload = json.dumps(
            {"event": event, "at": utcnow().isoformat(), "fields": dict(fields)}, default=str, sort_keys=True
        )
        n = state.incr(OUTBOX_SEQ, OUTBOX_COUNTER_TTL_S)
        if n > 0:  # 0: the shared state could not be reached (it fails open); the log line stays
            state.set(f"{OUTBOX_SLOT}{n}", payload, OUTBOX_TTL_S)
    except Exception as exc:  # noqa: BLE001  # an alert's delivery must never break what raised it
        log.warning("alert_not_queued", alert_event=event, error=type(exc).__name__)


def _alert_payload(event: str, at: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": f"alert.{event}", "timestamp": at, "data": dict(data)}


def _collect_outbox(rt: Runtime, now: datetime) -> int:
    """Move the alerts queued since the last look into rows (for the operators' URL)."""
    state, url = rt.shared, rt.settings.alert_webhook_url
    top = int(state.get(OUTBOX_SEQ) or 0)
    read = int(state.get(OUTBOX_READ) or 0)
    if read > top:
        read = 0  # the counter was lost (a Redis flush): start again
    if top == read:
        return 0
    if url is None:  # nowhere to send them: the log lines were the alerts
        state.set(OUTBOX_READ, str(top), OUTBOX_COUNTER_TTL_S)
        return 0
    rows: list[CallbackDelivery] = []
    reached = read
    for n in range(max(read, top - OUTBOX_BATCH) + 1, top + 1):
        slot = f"{OUTBOX_SLOT}{n}"
        raw = state.get(slot)
        if raw is None:
            # Counted but not written yet (its writer is between the two writes): look again next
            # sweep. Still missing then, it is lost (expired, or its write failed) and skipped.
            if state.set_if_absent(f"{slot}:missing", "1", OUTBOX_TTL_S):
                break
            reached = n
            continue
        reached = n
        if not state.set_if_absent(f"{slot}:taken", "1", OUTBOX_TTL_S):
            continue  # another sweeper has it
        try:
            item = json.loads(raw)
            payload = _alert_payload(str(item["event"]), str(item["at"]), item.get("fields") or {})
        except (ValueError, KeyError, TypeError):
            continue
        rows.append(_new_row(kind=KIND_ALERT, url=url, event=payload["type"], payload=payload, now=now))
    if rows:
        with rt.db.transaction() as s:
            s.add_all(rows)
    if reached != read:
        state.set(OUTBOX_READ, str(reached), OUTBOX_COUNTER_TTL_S)
    return len(rows)


def cap_webhook_id(cap_id: str) -> str:
    return "msg_cap_" + hashlib.sha256(cap_id.encode()).hexdigest()[:32]


def _collect_cap_alerts(rt: Runtime, now: datetime) -> int:
    """One alert per spend-cap ledger row (a cap, its subject, its period) that reached its limit."""
    url = rt.settings.alert_webhook_url
    if url is None:
        return 0
    since = now - timedelta(seconds=CAP_LOOKBACK_S)
    try:
        with rt.db.transaction() as s:
            caps = s.execute(
                select(SpendCap)
                .where(text("spend_caps.alerted_pct >= 100"), SpendCap.updated_at >= since)  # the partial index
                .limit(OUTBOX_BATCH)
            ).scalars()
            wanted = {cap_webhook_id(cap.id): cap for cap in caps}
            if not wanted:
                return 0
            have = set(s.scalars(select(CallbackDelivery.webhook_id).where(CallbackDelivery.webhook_id.in_(wanted))))
            added = 0
            for webhook_id, cap in wanted.items():
                if webhook_id in have:
                    continue
                data = {
                    "scope": cap.scope,
                    "subject": cap.subject if cap.scope != "user" else None,  # a user id is not for operators
                    "period": cap.period,
                    "period_start": cap.period_start,
                    "percent": 100,
                    "limit_usd": str(cap.limit_micros / 1_000_000),
                }
                payload = _alert_payload("spend_cap_reached", now.isoformat(), data)
                s.add(
                    _new_row(
                        kind=KIND_ALERT, url=url, event=payload["type"], payload=payload, now=now, webhook_id=webhook_id
                    )
                )
                added += 1
            return added
    except IntegrityError:
        return 0  # another sweeper recorded the same alert at the same moment


# --- the sweeper's part ----------------------------------------------------------------------------
def deliver_due(rt: Runtime, *, limit: int = 50) -> int:
    """Record the alerts raised since the last sweep, then try the deliveries that are due (several
    at once, each within ``TRY_DEADLINE_S``). Returns how many were tried."""
    now = utcnow()
    _collect_outbox(rt, now)
    _collect_cap_alerts(rt, now)
    claimed: list[Pending] = []
    with rt.db.transaction() as s:
        due = s.scalars(
            select(CallbackDelivery)
            .where(CallbackDelivery.state == PENDING, CallbackDelivery.next_try_at <= now)
            .order_by(CallbackDelivery.next_try_at)
            .limit(limit)
        ).all()
        for row in due:
            won = s.connection().execute(
                update(DELIVERIES)
                .where(DELIVERIES.c.id == row.id, DELIVERIES.c.state == PENDING, DELIVERIES.c.next_try_at <= now)
                .values(next_try_at=now + timedelta(seconds=CLAIM_S))
            )
            if won.rowcount == 1:
                claimed.append(_pending(row))
    if not claimed:
        return 0
    if len(claimed) == 1:
        _try(rt, claimed[0])
    else:
        with ThreadPoolExecutor(
            max_workers=min(SEND_THREADS, len(claimed)), thread_name_prefix="genline-webhook"
        ) as pool:
            list(pool.map(lambda item: _try(rt, item), claimed))
    return len(claimed)
