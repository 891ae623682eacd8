"""Callbacks and alerts a receiver can trust: signed per Standard Webhooks (checked by the
``standardwebhooks`` package, an implementation of the spec that is not ours), retried with
backoff for a bounded time, never following a redirect, never reaching a refused address, each
try recorded and shown in ``status``.

The receiver is a real HTTP server on loopback (allowed by the test settings' private hosts);
time between tries is skipped with the clock seam, never slept through."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook, WebhookVerificationError

from genline.cli.output import describe_status
from genline.config.clock import utcnow
from genline.config.errors import AccountError, ConfigError
from genline.config.logging import configure_logging
from genline.config.settings import Settings, load_settings
from genline.pipelines import callbacks
from genline.pipelines.api import Genline
from genline.pipelines.engine import notify_callback
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from genline.provider.stages import alert, pause_paid_work
from genline.storage.migrate import upgrade
from genline.storage.models import CallbackDelivery, SpendCap
from genline.workers.drain import drain
from genline.workers.sweeper import sweep
from tests.support.clock import ManualClock

NEW_SECRET = "whsec_" + base64.b64encode(b"n" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"x" * 32).decode()
RequestFn = Callable[..., dict[str, Any]]


# --- a receiver that answers what the test scripts, and keeps what it was sent ----------------------
@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # taken in order; then 204
    delay_s: float = 0.0  # how long it takes to answer

    def answer(self, *answers: int | tuple[int, dict[str, str]]) -> None:
        self.answers.extend(a if isinstance(a, tuple) else (a, {}) for a in answers)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box: list[Receiver] = []
    lock, stop = threading.Lock(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  # the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            stop.wait(box[0].delay_s)
            with lock:
                box[0].requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = box[0].answers.pop(0) if box[0].answers else (204, {})
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Receiver(f"http://127.0.0.1:{server.server_address[1]}/hooks/genline"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield box[0]
    stop.set()
    server.shutdown()
    server.server_close()


def runtime(settings: Settings) -> Runtime:
    upgrade(settings.database_url)
    return Runtime.from_settings(settings)


@pytest.fixture
def make_rt(sim: SimulatorHandle, make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Runtime]]:
    """Runtimes on one SQLite database (every call: the same var folder), with settings changed."""
    made: list[Runtime] = []

    def make(**env: str) -> Runtime:
        made.append(runtime(make_settings(sim.base_url, **env)))
        return made[-1]

    yield make
    for rt in made:
        rt.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def either_make_rt(
    request: pytest.FixtureRequest, sim: SimulatorHandle, make_settings: Callable[..., Settings]
) -> Iterator[Callable[..., Runtime]]:
    """``make_rt`` on SQLite, and on PostgreSQL (integration)."""
    db = {"GENLINE_DATABASE_URL": request.getfixturevalue("pg_url")} if request.param == "postgres" else {}
    made: list[Runtime] = []

    def make(**env: str) -> Runtime:
        made.append(runtime(make_settings(sim.base_url, **db, **env)))
        return made[-1]

    yield make
    for rt in made:
        rt.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """The webhooks' clock, moved by the test (the retries' waits are skipped, not slept)."""
    manual = ManualClock()
    manual.drive(monkeypatch, callbacks)
    return manual


def delivery(rt: Runtime, **where: Any) -> CallbackDelivery:
    with rt.db.transaction() as s:
        row = s.scalars(select(CallbackDelivery).filter_by(**where)).one()
        s.expunge(row)
        return row


def spec_check(secret: str, got: Received) -> Any:
    """The standardwebhooks package's verdict (raises WebhookVerificationError)."""
    return Webhook(secret).verify(got.body, got.headers)


# --- signing --------------------------------------------------------------------------------------
def test_a_pipeline_end_is_one_signed_callback_that_the_spec_library_accepts(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn
) -> None:
    rt = make_rt(GENLINE_WEBHOOK_SECRET=NEW_SECRET)
    api = Genline(runtime=rt)
    pid = api.submit(request_fields(callback_url=receiver.url)).pipeline_id
    drain(rt)

    assert len(receiver.requests) == 1
    got = receiver.requests[0]
    assert got.path == "/hooks/genline"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["webhook-id"] == f"msg_{pid}_ended"
    assert got.headers["webhook-signature"].startswith("v1,") and " " not in got.headers["webhook-signature"]
    assert spec_check(NEW_SECRET, got) == {"pipeline_id": pid, "status": "succeeded", "error_code": None}

    with pytest.raises(WebhookVerificationError):  # a receiver with another secret refuses it
        spec_check(OTHER_SECRET, got)
    tampered = Received(got.path, got.headers, got.body.replace(b"succeeded", b"failed!!!"))
    with pytest.raises(WebhookVerificationError):  # so does one that got a changed body
        spec_check(NEW_SECRET, tampered)
    replayed = Received(got.path, {**got.headers, "webhook-timestamp": str(int(utcnow().timestamp()) + 1)}, got.body)
    with pytest.raises(WebhookVerificationError):  # the timestamp is signed too
        spec_check(NEW_SECRET, replayed)

    status = api.status(pid)
    assert status["callback"]["state"] == "delivered"
    assert status["callback"]["attempts"] == 1 and status["callback"]["last_status_code"] == 204
    assert "callback: delivered, 1 try" in describe_status(status)


def test_during_a_rotation_both_secrets_sign_and_a_receiver_with_the_old_one_accepts(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn
) -> None:
    rt = make_rt(GENLINE_WEBHOOK_SECRET=f"{NEW_SECRET}, {OLD_SECRET}")
    pid = Genline(runtime=rt).submit(request_fields(callback_url=receiver.url)).pipeline_id
    notify_callback(rt, pid)

    got = receiver.requests[0]
    signatures = got.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(sig.startswith("v1,") for sig in signatures)
    assert spec_check(OLD_SECRET, got)["pipeline_id"] == pid  # not moved to the new secret yet
    assert spec_check(NEW_SECRET, got)["pipeline_id"] == pid  # already moved
    # The first signature is the new secret's: checked with the spec's recipe written out here.
    stamp = got.headers["webhook-timestamp"]
    mac = hmac.new(b"n" * 32, f"msg_{pid}_ended.{stamp}.".encode() + got.body, hashlib.sha256).digest()
    assert signatures[0] == "v1," + base64.b64encode(mac).decode()


def test_without_a_secret_the_callback_goes_unsigned_but_keeps_its_id_and_timestamp(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn
) -> None:
    rt = make_rt()
    pid = Genline(runtime=rt).submit(request_fields(callback_url=receiver.url)).pipeline_id
    notify_callback(rt, pid)
    got = receiver.requests[0]
    assert "webhook-signature" not in got.headers
    assert got.headers["webhook-id"] == f"msg_{pid}_ended" and got.headers["webhook-timestamp"].isdigit()


def test_the_secret_is_checked_at_start_up_and_never_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"GENLINE_WEBHOOK_SECRET": f"{NEW_SECRET} whsec_c2hvcnQ="})
    assert "GENLINE_WEBHOOK_SECRET" in caught.value.message and "number 2" in caught.value.message
    assert "c2hvcnQ" not in caught.value.message and NEW_SECRET not in caught.value.message
    with pytest.raises(ConfigError, match="does not start with whsec_"):
        load_settings({"GENLINE_WEBHOOK_SECRET": "hunter2hunter2hunter2hunter2"})
    settings = load_settings({"GENLINE_WEBHOOK_SECRET": NEW_SECRET})
    assert NEW_SECRET not in repr(settings)


# --- retries --------------------------------------------------------------------------------------
def test_a_500_is_tried_again_by_the_sweeper_with_the_same_id_and_status_shows_the_tries(
    either_make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn, clock: ManualClock
) -> None:
    rt = either_make_rt(GENLINE_WEBHOOK_SECRET=NEW_SECRET)
    api = Genline(runtime=rt)
    receiver.answer(500)
    pid = api.submit(request_fields(callback_url=receiver.url)).pipeline_id
    drain(rt)

    first = api.status(pid)
    assert first["status"] == "succeeded"
    assert first["callback"]["state"] == "pending" and first["callback"]["attempts"] == 1
    assert first["callback"]["last_status_code"] == 500
    assert "HTTP 500" in first["callback"]["last_error"]
    assert "callback: pending, 1 try" in describe_status(first)

    sweep(rt)  # not due yet: the first retry waits 5 s
    assert len(receiver.requests) == 1
    clock.advance(6)
    sweep(rt)

    assert len(receiver.requests) == 2
    one, two = receiver.requests
    assert one.headers["webhook-id"] == two.headers["webhook-id"]  # the receiver's idempotency key
    assert int(two.headers["webhook-timestamp"]) >= int(one.headers["webhook-timestamp"]) + 5  # re-signed
    assert one.body == two.body
    assert spec_check(NEW_SECRET, two)["status"] == "succeeded"
    after = api.status(pid)["callback"]
    assert after["state"] == "delivered" and after["attempts"] == 2 and after["last_status_code"] == 204
    assert after["last_error"] is None


def test_retries_stop_when_the_window_is_over_and_the_delivery_is_failed(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn, clock: ManualClock
) -> None:
    rt = make_rt(GENLINE_WEBHOOK_RETRY_FOR_S="600")
    receiver.answer(*([503] * 10))
    pid = Genline(runtime=rt).submit(request_fields(callback_url=receiver.url)).pipeline_id
    notify_callback(rt, pid)
    clock.advance(6)
    assert callbacks.deliver_due(rt) == 1  # 2nd try; the 3rd comes after about 5 minutes
    clock.advance(60)
    assert callbacks.deliver_due(rt) == 0
    clock.advance(300)
    assert callbacks.deliver_due(rt) == 1  # 3rd try; the 4th would come 30 minutes later: past 10 minutes

    row = delivery(rt, pipeline_id=pid)
    assert (row.state, row.attempts, row.next_try_at) == ("failed", 3, None)
    clock.advance(86400)
    assert callbacks.deliver_due(rt) == 0
    assert len(receiver.requests) == 3


def test_a_410_gone_ends_the_delivery_at_once(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn
) -> None:
    rt = make_rt()
    receiver.answer(410)
    pid = Genline(runtime=rt).submit(request_fields(callback_url=receiver.url)).pipeline_id
    notify_callback(rt, pid)
    row = delivery(rt, pipeline_id=pid)
    assert (row.state, row.attempts, row.last_status_code) == ("failed", 1, 410)


def test_a_receiver_slower_than_the_deadline_is_a_failed_try_and_the_worker_moves_on(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = make_rt()
    monkeypatch.setattr(callbacks, "FIRST_TRY_DEADLINE_S", 0.3)
    receiver.delay_s = 5.0
    pid = Genline(runtime=rt).submit(request_fields(callback_url=receiver.url)).pipeline_id
    notify_callback(rt, pid)  # cut off at its deadline, not waiting for the answer
    row = delivery(rt, pipeline_id=pid)
    assert (row.state, row.attempts, row.last_status_code) == ("pending", 1, None)
    assert row.last_error == "The receiver did not answer within 0.3 s."


def test_a_retry_after_longer_than_the_schedule_is_honoured(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn, clock: ManualClock
) -> None:
    rt = make_rt()
    receiver.answer((429, {"Retry-After": "120"}))
    pid = Genline(runtime=rt).submit(request_fields(callback_url=receiver.url)).pipeline_id
    notify_callback(rt, pid)
    clock.advance(60)
    assert callbacks.deliver_due(rt) == 0  # 5 s by the schedule, but the receiver asked for 2 minutes
    clock.advance(61)
    assert callbacks.deliver_due(rt) == 1
    assert delivery(rt, pipeline_id=pid).state == "delivered"


def test_two_sweepers_at_once_send_a_due_delivery_once(
    either_make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn, clock: ManualClock
) -> None:
    one, two = either_make_rt(), either_make_rt()
    receiver.answer(500)
    pids = [Genline(runtime=one).submit(request_fields(callback_url=receiver.url)).pipeline_id for _ in range(6)]
    for pid in pids:
        notify_callback(one, pid)  # the first fails, the others land
    assert len(receiver.requests) == 6
    receiver.answer(*([500] * 5))
    with one.db.transaction() as s:  # make all six due again
        for row in s.scalars(select(CallbackDelivery)):
            row.state, row.next_try_at = "pending", clock.utcnow()
    clock.advance(1)
    start = threading.Barrier(2)
    tried: list[int] = []

    def run(rt: Runtime) -> None:
        start.wait()
        tried.append(callbacks.deliver_due(rt))

    threads = [threading.Thread(target=run, args=(rt,)) for rt in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(tried) == 6 and len(receiver.requests) == 12  # each claimed by one sweeper only
    assert sorted(r.headers["webhook-id"] for r in receiver.requests[6:]) == sorted(f"msg_{p}_ended" for p in pids)


# --- where a webhook may go -----------------------------------------------------------------------
def test_a_redirect_is_not_followed_and_is_recorded_as_a_failed_try(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn
) -> None:
    rt = make_rt()
    receiver.answer((307, {"Location": receiver.url.replace("/hooks/genline", "/elsewhere")}))
    pid = Genline(runtime=rt).submit(request_fields(callback_url=receiver.url)).pipeline_id
    notify_callback(rt, pid)
    assert [r.path for r in receiver.requests] == ["/hooks/genline"]
    row = delivery(rt, pipeline_id=pid)
    assert (row.state, row.attempts, row.last_status_code) == ("pending", 1, 307)
    assert row.last_error is not None and "redirect" in row.last_error and "127.0.0.1" not in row.last_error


def test_an_address_refused_at_delivery_is_never_posted_and_the_refusal_is_recorded(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn
) -> None:
    allowed = make_rt()  # loopback allowed when the pipeline was submitted ...
    pid = Genline(runtime=allowed).submit(request_fields(callback_url=receiver.url)).pipeline_id
    strict = make_rt(GENLINE_ALLOW_PRIVATE_HOSTS="")  # ... and no longer when it ends (same database)
    notify_callback(strict, pid)
    assert receiver.requests == []
    row = delivery(strict, pipeline_id=pid)
    assert (row.state, row.attempts) == ("failed", 1)
    assert row.last_error is not None and row.last_error.startswith("Refused:") and "loopback" in row.last_error


def test_a_pipeline_without_a_callback_url_records_nothing(
    make_rt: Callable[..., Runtime], request_fields: RequestFn
) -> None:
    rt = make_rt()
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    notify_callback(rt, pid)
    with rt.db.transaction() as s:
        assert s.scalars(select(CallbackDelivery)).all() == []
    assert "callback" not in api.status(pid)


def test_a_callback_recorded_twice_is_sent_once(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn
) -> None:
    rt = make_rt()
    pid = Genline(runtime=rt).submit(request_fields(callback_url=receiver.url)).pipeline_id
    notify_callback(rt, pid)
    notify_callback(rt, pid)  # a repeated end (a task that ran twice)
    assert len(receiver.requests) == 1


# --- alerts ---------------------------------------------------------------------------------------
def test_an_alert_reaches_the_operators_url_signed_from_the_sweeper_not_from_the_caller(
    make_rt: Callable[..., Runtime], receiver: Receiver
) -> None:
    rt = make_rt(GENLINE_ALERT_WEBHOOK_URL=receiver.url, GENLINE_WEBHOOK_SECRET=NEW_SECRET)
    alert(rt.shared, "copy_at_risk", step_id="st_1", pipeline_id="pl_1", seconds_left=42.5)
    pause_paid_work(rt.shared, AccountError("Payment required.", status_code=402), 300.0, model="veo3")
    assert receiver.requests == []  # the callers never wait on the operators' URL

    assert callbacks.deliver_due(rt) == 2
    bodies = sorted((spec_check(NEW_SECRET, got) for got in receiver.requests), key=lambda b: b["type"])
    assert [b["type"] for b in bodies] == ["alert.copy_at_risk", "alert.provider_paused"]
    assert bodies[0]["data"] == {"step_id": "st_1", "pipeline_id": "pl_1", "seconds_left": 42.5}
    assert bodies[1]["data"]["model"] == "veo3" and bodies[1]["data"]["pause_s"] == 300.0
    assert len({got.headers["webhook-id"] for got in receiver.requests}) == 2

    assert callbacks.deliver_due(rt) == 0  # each alert once
    with rt.db.transaction() as s:
        rows = s.scalars(select(CallbackDelivery)).all()
        assert {(r.kind, r.state, r.pipeline_id) for r in rows} == {("alert", "delivered", None)}


def test_a_spend_cap_that_reached_its_limit_is_alerted_once(
    either_make_rt: Callable[..., Runtime], receiver: Receiver
) -> None:
    rt = either_make_rt(GENLINE_ALERT_WEBHOOK_URL=receiver.url)
    now = utcnow()
    with rt.db.transaction() as s:
        for cap_id, scope, subject, pct in (
            ("global|*|day|2030-01-01", "global", "*", 100),
            ("user|seller-1|day|2030-01-01", "user", "seller-1", 100),
            ("feature|listing-video|day|2030-01-01", "feature", "listing-video", 80),
        ):
            s.add(
                SpendCap(
                    id=cap_id,
                    scope=scope,
                    subject=subject,
                    period="day",
                    period_start="2030-01-01",
                    limit_micros=5_000_000,
                    reserved_micros=0,
                    spent_micros=5_000_000,
                    alerted_pct=pct,
                    updated_at=now,
                )
            )
    assert callbacks.deliver_due(rt) == 2
    assert callbacks.deliver_due(rt) == 0
    data = sorted((json.loads(got.body)["data"] for got in receiver.requests), key=lambda d: d["scope"])
    assert [(d["scope"], d["subject"], d["percent"]) for d in data] == [("global", "*", 100), ("user", None, 100)]
    assert all(json.loads(got.body)["type"] == "alert.spend_cap_reached" for got in receiver.requests)


def test_without_an_alert_url_alerts_stay_log_lines(make_rt: Callable[..., Runtime]) -> None:
    rt = make_rt()
    alert(rt.shared, "copy_at_risk", step_id="st_1")
    assert callbacks.deliver_due(rt) == 0
    with rt.db.transaction() as s:
        assert s.scalars(select(CallbackDelivery)).all() == []


def test_neither_the_secret_nor_a_signature_reaches_a_log_line_or_a_row(
    make_rt: Callable[..., Runtime], receiver: Receiver, request_fields: RequestFn
) -> None:
    rt = make_rt(GENLINE_WEBHOOK_SECRET=NEW_SECRET)
    receiver.answer(500)
    pid = Genline(runtime=rt).submit(request_fields(callback_url=receiver.url)).pipeline_id
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    try:
        notify_callback(rt, pid)
    finally:
        configure_logging("INFO")
    signature = receiver.requests[0].headers["webhook-signature"].removeprefix("v1,")
    logged = out.getvalue()
    assert "webhook_try_failed" in logged
    row = delivery(rt, pipeline_id=pid)
    stored = json.dumps([row.payload, row.last_error, row.url, row.event, row.webhook_id])
    for text in (logged, stored):
        assert NEW_SECRET.removeprefix("whsec_") not in text and signature not in text
    assert receiver.url not in logged  # a callback URL may carry a token: never logged
