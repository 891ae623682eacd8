"""Recovery that keeps pace with link lifetimes: a video is never rendered from a link that runs
out, a dead worker's step runs again within a lease, and copies are scheduled by deadline with a
backoff of their own, so one bad link never blocks the others."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from genline.config.clock import utcnow
from genline.config.constants import StepStatus
from genline.pipelines.api import Genline
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext
from genline.provider.simulator import SimulatorHandle
from genline.provider.wire import SubmitResult
from genline.storage.models import Step, StoredObject
from genline.workers.drain import drain
from tests.support.drive import run_until, sim_stats

RequestFn = Callable[..., dict[str, Any]]


def _spy_submits(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    real = rt.gateway.submit

    def submit(ctx: CallContext, kind: str, payload: dict[str, Any], idempotency_key: str) -> SubmitResult:
        sent.append(payload)
        return real(ctx, kind, payload, idempotency_key)

    monkeypatch.setattr(rt.gateway, "submit", submit)
    return sent


def _set_image_expiry(rt: Runtime, pipeline_id: str, seconds_from_now: float) -> None:
    with rt.db.transaction() as s:
        image = s.scalars(select(Step).where(Step.pipeline_id == pipeline_id, Step.kind == "image")).one()
        assert image.output is not None
        asset = dict(image.output["assets"][0])
        asset["expires_at"] = (utcnow() + timedelta(seconds=seconds_from_now)).isoformat()
        image.output = {**image.output, "assets": [asset]}


def test_a_fresh_image_link_is_handed_on_and_copied_while_the_video_renders(
    rt: Runtime, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = Genline(runtime=rt).submit(request_fields()).pipeline_id
    video_step = run_until(rt, "video")
    sent = _spy_submits(rt, monkeypatch)
    run_step(rt, video_step)
    assert sent[-1]["image_urls"][0].startswith("http://127.0.0.1")  # the provider's own link
    with rt.db.transaction() as s:
        stored = s.scalars(select(StoredObject).where(StoredObject.pipeline_id == pid)).all()
    assert [o.kind for o in stored] == ["image"]  # copied once the video was submitted


def test_an_image_link_close_to_its_end_is_copied_first_and_the_video_rendered_from_our_copy(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = Genline(runtime=rt).submit(request_fields()).pipeline_id
    video_step = run_until(rt, "video")
    _set_image_expiry(rt, pid, 90)  # shorter than GENLINE_COPY_RISK_MARGIN_S (900 s, shipped)
    sent = _spy_submits(rt, monkeypatch)
    run_step(rt, video_step)
    image = sent[-1]["image_urls"][0]
    assert image.startswith("data:image/png;base64,")  # local storage: our copy, inline
    with rt.db.transaction() as s:
        stored = s.scalars(select(StoredObject).where(StoredObject.pipeline_id == pid)).one()
    assert base64.b64decode(image.split(",", 1)[1]) == rt.store.read_bytes(stored.key)
    assert sim_stats(sim)["jobs_total"] == 2  # the image and the video, nothing twice


def test_an_image_link_that_ran_out_is_never_handed_to_the_provider(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = Genline(runtime=rt).submit(request_fields()).pipeline_id
    video_step = run_until(rt, "video")
    _set_image_expiry(rt, pid, -1)
    sent = _spy_submits(rt, monkeypatch)
    run_step(rt, video_step)
    assert sent == []  # no paid video job from a dead link
    status = Genline(runtime=rt).status(pid)
    assert status["status"] == "failed" and status["error"]["code"] == "result_expired"
    assert sim_stats(sim)["jobs_total"] == 1
    with rt.db.transaction() as s:
        assert s.get_one(Step, video_step).status == StepStatus.FAILED


def test_the_video_is_stored_when_the_image_step_used_our_copy(rt: Runtime, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    video_step = run_until(rt, "video")
    _set_image_expiry(rt, pid, 60)
    run_step(rt, video_step)
    drain(rt)
    status = api.status(pid)
    assert status["status"] == "succeeded"
    assert status["image"]["key"] == f"{pid}/image.png" and status["video"]["key"] == f"{pid}/video.mp4"
