"""What the README promises about keeping outputs whole and giving up at the right moment.

- Every store checks what it holds after a put, against what it was given, sha256 included: an
  object that another writer replaced between our write and our read-back is not reported as ours.
- A provider link that serves something other than the media asked for (an HTML error page for a
  video) is refused; nothing is stored and the pipeline says why.
- A ``Retry-After`` far beyond the backoff cap is not slept through: the gateway gives up at once.
- A copy to storage is retried until its link expires, not up to ``GENLINE_STEP_MAX_ATTEMPTS``.

Real implementations throughout: local files, moto's S3 server in its own process, the simulator
over HTTP with scripted faults, the real gateway, engine and sweeper. Time moves by a manual clock
(``tests/support/clock.py``), never by sleeping.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

import genline.pipelines.engine as engine
import genline.storage.transfer as transfer
import genline.workers.sweeper as sweeper
from genline.config.catalog import load_catalog
from genline.config.errors import RateLimited, RetryableStorageError, StorageError
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.engine import may_retry
from genline.pipelines.runtime import Runtime
from genline.provider.client import ProviderClient
from genline.provider.gateway import CallContext, Gateway, MemoryAuditSink, RetryPolicy
from genline.provider.simulator import SimConfig, SimulatorHandle, start_simulator
from genline.storage.local import LocalObjectStore
from genline.storage.migrate import upgrade
from genline.storage.models import Step, StoredObject
from genline.storage.objects import StoredObjectInfo
from genline.storage.s3 import S3ObjectStore, make_s3_client
from genline.storage.transfer import copy_url_to_store
from genline.workers.drain import drain
from genline.workers.sweeper import sweep
from tests.conftest import TEST_KEY
from tests.support.clock import ManualClock
from tests.support.drive import faults

pytestmark = pytest.mark.timeout(120)
RequestFn = Callable[..., dict[str, Any]]
VIDEO_FILES = "/files/*.mp4"  # the simulator's video result links (fnmatch: '*' spans '/')


def requests_by_status(sim: SimulatorHandle) -> dict[str, int]:
    stats: dict[str, Any] = httpx.get(f"{sim.base_url}/_sim/stats").json()
    return dict(stats.get("requests_by_status", {}))


# --- 1. every store checks what it holds before it answers -----------------------------------------
class LocalStoreRacedByAnotherWriter(LocalObjectStore):
    """A local store on a folder another worker writes to as well: right after our write lands,
    and before we read it back, the other worker puts ``theirs`` under the same key (same size,
    same type, different bytes), through its own real store on the same folder."""

    def __init__(self, root: Path, theirs: bytes) -> None:
        super().__init__(root)
        self.other_worker = LocalObjectStore(root)
        self.theirs: bytes | None = theirs

    def head(self, key: str) -> StoredObjectInfo | None:
        if self.theirs is not None:
            theirs, self.theirs = self.theirs, None
            self.other_worker.put_stream(key, [theirs], content_type="video/mp4", expected_size=len(theirs))
        return super().head(key)


def test_local_store_refuses_to_vouch_for_an_object_another_writer_replaced_before_the_read_back(
    tmp_path: Path,
) -> None:
    ours, theirs = b"our video frames.", b"THEIR video bytes"
    assert len(ours) == len(theirs)
    store = LocalStoreRacedByAnotherWriter(tmp_path / "objects", theirs)

    with pytest.raises(RetryableStorageError) as caught:
        store.put_stream("outputs/pl_1/video.mp4", [ours], content_type="video/mp4", expected_size=len(ours))

    assert caught.value.code == "verify_failed"
    held = store.head("outputs/pl_1/video.mp4")
    assert held is not None and held.sha256 == hashlib.sha256(theirs).hexdigest()  # theirs, not ours


def test_local_store_returns_the_sha256_of_what_it_holds_when_nobody_interferes(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    info = store.put_stream("a/v.mp4", [b"frames"], content_type="video/mp4", expected_size=6)
    held = store.head("a/v.mp4")
    assert held is not None and info.sha256 == held.sha256 == hashlib.sha256(b"frames").hexdigest()


MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part: a 6 MiB object goes up in two parts, with its SHA-256 checksums


def _two_part_bodies() -> tuple[bytes, bytes]:
    ours = b"our video frames" * (6 * MiB // 16)
    theirs = b"THEIR video byte" * (6 * MiB // 16)
    assert len(ours) == len(theirs) == 6 * MiB
    return ours, theirs


def test_s3_store_refuses_to_vouch_for_an_object_another_writer_replaced_before_the_read_back(
    moto_endpoint: str,
) -> None:
    bucket = f"genline-test-{uuid.uuid4().hex[:12]}"
    client = make_s3_client(endpoint_url=moto_endpoint)  # this worker's
    store = S3ObjectStore(bucket, "videos", client, part_size=PART)
    store.ensure_bucket()
    other_worker = S3ObjectStore(bucket, "videos", make_s3_client(endpoint_url=moto_endpoint), part_size=PART)
    ours, theirs = _two_part_bodies()
    raced: list[str] = []

    def other_worker_writes_first(**_: Any) -> None:  # just before our read-back reaches the server
        if not raced:
            raced.append("raced")
            other_worker.put_stream("pl-1/out.mp4", [theirs], content_type="video/mp4", expected_size=len(theirs))

    client.meta.events.register("before-call.s3.HeadObject", other_worker_writes_first)

    with pytest.raises(RetryableStorageError) as caught:
        store.put_stream("pl-1/out.mp4", [ours], content_type="video/mp4", expected_size=len(ours))

    assert raced == ["raced"]
    assert caught.value.code == "verify_failed"
    assert "checksum" in caught.value.message


def test_s3_store_verifies_and_keeps_a_multipart_object_nobody_interferes_with(moto_endpoint: str) -> None:
    client = make_s3_client(endpoint_url=moto_endpoint)
    store = S3ObjectStore(f"genline-test-{uuid.uuid4().hex[:12]}", "", client, part_size=PART)
    store.ensure_bucket()
    ours, _ = _two_part_bodies()
    info = store.put_stream("v.mp4", [ours], content_type="video/mp4", expected_size=len(ours))
    head = client.head_object(Bucket=store.bucket, Key="v.mp4", ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")  # the server reports a checksum, so the read-back compared it
    assert info.sha256 == hashlib.sha256(ours).hexdigest()
    assert hashlib.sha256(store.read_bytes("v.mp4")).hexdigest() == info.sha256


# --- 2. a result of the wrong type is refused ------------------------------------------------------
def _video_url(rt: Runtime, pipeline_id: str) -> str:
    with rt.db.transaction() as s:
        video = s.scalars(select(Step).where(Step.pipeline_id == pipeline_id, Step.kind == "video")).one()
        assert video.output is not None, "the video step has not finished"
        return str(video.output["assets"][0]["url"])


def test_a_video_link_that_serves_an_html_page_is_refused_and_nothing_is_stored(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    drain(rt)
    url = _video_url(rt, pid)
    faults(sim, {"method": "GET", "path": VIDEO_FILES, "status": "non_json"})  # 200, text/html

    with pytest.raises(StorageError) as caught:
        copy_url_to_store(rt.downloads, rt.store, url, "copies/video.mp4", expires_at=None, expect_type="video")

    assert caught.value.code == "result_wrong_type" and not caught.value.retryable
    assert "text/html" in caught.value.message and "video" in caught.value.message
    assert rt.store.head("copies/video.mp4") is None
    # the same link serving the real video is copied
    info = copy_url_to_store(rt.downloads, rt.store, url, "copies/video.mp4", expires_at=None, expect_type="video")
    assert info.content_type == "video/mp4" and info.size > 0


def test_a_pipeline_whose_video_link_serves_html_fails_with_a_plain_reason_and_stores_no_video(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    faults(sim, {"method": "GET", "path": VIDEO_FILES, "status": "non_json", "times": 10})
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    drain(rt)

    status = api.status(pid)
    assert status["status"] == "failed", status
    assert status["error"]["code"] == "result_wrong_type"
    assert "text/html" in status["error"]["message"]
    assert status["video"] is None
    with rt.db.transaction() as s:
        kinds = s.scalars(select(StoredObject.kind).where(StoredObject.pipeline_id == pid)).all()
    assert "video" not in kinds
    assert rt.store.head(f"outputs/{pid}/video.mp4") is None


# --- 3. a Retry-After far beyond the cap gives up --------------------------------------------------
class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def gateway_with_cap_8s(
    sim: SimulatorHandle, make_settings: Callable[..., Settings]
) -> Iterator[tuple[Gateway, MemoryAuditSink, Sleeps]]:
    """The real gateway and client against the simulator; its sleeps are recorded, not slept."""
    audit, sleeps = MemoryAuditSink(), Sleeps()
    gateway = Gateway(
        load_catalog(),
        audit,
        client=ProviderClient(make_settings(sim.base_url)),
        retry=RetryPolicy(max_attempts=4, base_s=0.5, cap_s=8.0),
        sleep=sleeps,
    )
    yield gateway, audit, sleeps
    gateway.close()


CHAT = "/v1/chat/completions"
CTX = CallContext(user_id="u1", feature="f1", pipeline_id="pl_1", step_id="st_1", model="gpt-4o-mini")
MESSAGES = [{"role": "user", "content": "A mug"}]


@pytest.mark.parametrize("retry_after", [33, 3600], ids=["just-over-4x-cap", "an-hour"])
def test_a_retry_after_far_beyond_the_backoff_cap_gives_up_at_once_instead_of_sleeping(
    sim: SimulatorHandle, gateway_with_cap_8s: tuple[Gateway, MemoryAuditSink, Sleeps], retry_after: int
) -> None:
    gateway, audit, sleeps = gateway_with_cap_8s
    faults(sim, {"method": "POST", "path": CHAT, "status": 429, "times": 1, "retry_after": retry_after})

    with pytest.raises(RateLimited) as caught:
        gateway.chat(CTX, MESSAGES, max_tokens=50)

    assert caught.value.retry_after == retry_after
    assert sleeps.waits == []  # no worker slot held for it
    assert [r.status_code for r in audit.records] == [429]  # one call, audited


def test_a_retry_after_within_four_times_the_cap_is_waited_for_and_retried(
    sim: SimulatorHandle, gateway_with_cap_8s: tuple[Gateway, MemoryAuditSink, Sleeps]
) -> None:
    gateway, audit, sleeps = gateway_with_cap_8s
    faults(sim, {"method": "POST", "path": CHAT, "status": 429, "times": 1, "retry_after": 32})

    assert gateway.chat(CTX, MESSAGES, max_tokens=50).text
    assert sleeps.waits == [32.0]
    assert [r.status_code for r in audit.records] == [429, 200]


# --- 4. a copy is retried until its link expires ---------------------------------------------------
LINK_TTL_S = 3600
MAX_ATTEMPTS = 2


@pytest.fixture
def clocked(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Runtime, SimulatorHandle, ManualClock]]:
    """A simulator whose result links live an hour on a manual clock, and a runtime (drain mode,
    step budget of 2) whose engine, sweeper and downloads read the same clock."""
    clock = ManualClock()
    config = SimConfig(api_key=TEST_KEY, image_seconds=0, video_seconds=0, video_bytes=65536, url_ttl_s=LINK_TTL_S)
    with start_simulator(config, clock=clock) as sim:
        settings = make_settings(sim.base_url, GENLINE_STEP_MAX_ATTEMPTS=str(MAX_ATTEMPTS))
        upgrade(settings.database_url)
        rt = Runtime.from_settings(settings)
        clock.drive(monkeypatch, engine, sweeper, transfer)
        try:
            yield rt, sim, clock
        finally:
            rt.close()


def _store_step(rt: Runtime, pipeline_id: str) -> Step:
    with rt.db.transaction() as s:
        return s.scalars(select(Step).where(Step.pipeline_id == pipeline_id, Step.kind == "store")).one()


def _sweeper_sends_it_again(rt: Runtime, clock: ManualClock) -> None:
    """Time passes beyond GENLINE_SWEEP_AFTER_S; the sweeper re-sends the waiting copy; it runs."""
    clock.advance(rt.settings.sweep_after_s + 60)
    sweep(rt)
    drain(rt)


def test_a_copy_whose_link_is_still_valid_is_retried_past_the_step_attempt_budget_until_it_lands(
    clocked: tuple[Runtime, SimulatorHandle, ManualClock], request_fields: RequestFn
) -> None:
    rt, sim, clock = clocked
    failures = 2 * MAX_ATTEMPTS + 1
    faults(sim, {"method": "GET", "path": VIDEO_FILES, "status": 503, "times": failures})
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    drain(rt)  # everything up to the copy, whose first try meets a 503

    for attempt in range(1, failures + 1):
        step = _store_step(rt, pid)
        assert (step.status, step.attempts) == ("queued", attempt), (step.status, step.error_message)
        assert step.deadline_at is not None and clock.utcnow() < step.deadline_at
        assert api.status(pid)["status"] == "running"
        _sweeper_sends_it_again(rt, clock)

    status = api.status(pid)
    assert status["status"] == "succeeded", status
    assert _store_step(rt, pid).attempts == failures + 1 > MAX_ATTEMPTS
    video = httpx.get(_video_url(rt, pid)).content
    assert Path(status["video"]["location"]).read_bytes() == video


def test_a_copy_stops_being_retried_when_its_link_expires_and_the_pipeline_says_so(
    clocked: tuple[Runtime, SimulatorHandle, ManualClock], request_fields: RequestFn
) -> None:
    rt, sim, clock = clocked
    faults(sim, {"method": "GET", "path": VIDEO_FILES, "status": 503, "times": 1000})
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    drain(rt)
    for _ in range(MAX_ATTEMPTS + 1):  # past the step budget, the link still valid: still retried
        _sweeper_sends_it_again(rt, clock)
    step = _store_step(rt, pid)
    assert (step.status, step.attempts) == ("queued", MAX_ATTEMPTS + 2)
    assert step.deadline_at is not None

    # Inside GENLINE_COPY_RISK_MARGIN_S of the link's expiry: an alert, and still retried.
    clock.now = (step.deadline_at - timedelta(seconds=rt.settings.copy_risk_margin_s / 2)).timestamp()
    sweep(rt)
    assert rt.shared.get("alerts:copy_at_risk") == "1"
    drain(rt)
    assert _store_step(rt, pid).status == "queued"

    # The link has expired: the copy is not tried again; the pipeline fails with a plain reason.
    clock.now = step.deadline_at.timestamp() + 1
    downloads_before = requests_by_status(sim).get("503", 0)
    sweep(rt)
    drain(rt)
    status = api.status(pid)
    assert status["status"] == "failed", status
    assert status["error"]["code"] == "result_expired"
    assert "expired" in status["error"]["message"]
    assert status["video"] is None
    assert float(status["cost_usd"]) > 0  # what the provider did is still paid for and recorded
    assert requests_by_status(sim).get("503", 0) == downloads_before  # no download after expiry


def test_may_retry_keeps_a_copy_until_its_deadline_and_any_other_step_to_its_budget(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(start=1_800_000_000)
    clock.drive(monkeypatch, engine)
    budget = rt.settings.step_max_attempts
    later: datetime = clock.utcnow() + timedelta(minutes=5)
    earlier: datetime = clock.utcnow() - timedelta(seconds=1)

    assert may_retry(rt, "store", budget * 10, later)  # a valid link: the budget does not apply
    assert not may_retry(rt, "store", 1, earlier)  # an expired link: not even a second try
    assert may_retry(rt, "video", budget - 1, later) and not may_retry(rt, "video", budget, later)
    assert may_retry(rt, "store", budget - 1, None) and not may_retry(rt, "store", budget, None)
