"""Recovery that keeps pace with link lifetimes: a video is never rendered from a link that runs
out, a dead worker's step runs again within a lease, and copies are scheduled by deadline with a
backoff of their own, so one bad link never blocks the others."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from genline.config.clock import utcnow
from genline.config.constants import StepStatus
from genline.pipelines.api import Genline
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.provider.gateway import CallContext
from genline.provider.simulator import SimConfig, SimulatorHandle, start_simulator
from genline.provider.stages import RequestBudget
from genline.provider.wire import SubmitResult
from genline.storage.models import ProviderCall, ProviderJob, Step, StoredObject
from genline.workers.drain import drain
from genline.workers.poller import Poller
from tests.support.drive import nudges, run_until, sim_stats
from tests.support.processes import group_and_runtime, wait_for, zero_setup_env

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


def test_a_worker_killed_in_the_middle_of_a_copy_is_recovered_before_a_90_s_link_expires(tmp_path: Path) -> None:
    """Real worker and poller processes on the zero-setup default with the shipped settings; only
    the provider's links are short (90 s) and its downloads slow (a 1 MiB video at 128 KiB/s), so
    the worker is certainly inside the copy when it is SIGKILLed with all of its pool."""
    key = "test-key-" + uuid.uuid4().hex
    config = SimConfig(
        api_key=key, image_seconds=0.5, video_seconds=1, url_ttl_s=90, video_bytes=1 << 20, download_bytes_per_s=131072
    )
    with start_simulator(config) as sim:
        env = zero_setup_env(tmp_path, sim.base_url, key)
        group, rt = group_and_runtime(tmp_path, env)
        try:
            group.start_worker("doomed", concurrency=1)
            group.start_poller()
            api = Genline(runtime=rt)
            pid = api.submit(
                {
                    "user_id": "seller-1",
                    "feature": "listing-video",
                    "description": "Hand-thrown stoneware mug, speckled glaze, 350 ml.",
                    "image": "https://cdn.example.com/mug.jpg",
                    "idempotency_key": "kill-mid-copy",
                }
            ).pipeline_id

            def copying() -> Step | None:
                with rt.db.transaction() as s:
                    step = s.scalars(select(Step).where(Step.pipeline_id == pid, Step.kind == "store")).one()
                return step if step.status == StepStatus.RUNNING else None

            running = wait_for("the store step to start", copying, 120, group)
            time.sleep(2)  # two seconds into an eight-second download
            doomed = group.children[0]
            os.killpg(doomed.proc.pid, signal.SIGKILL)
            doomed.proc.wait(10)
            killed_at = time.monotonic()
            group.children.remove(doomed)
            group.start_worker("replacement", concurrency=1)

            def ended() -> dict[str, Any] | None:
                status = api.status(pid)
                return status if status["status"] in ("succeeded", "failed", "cancelled") else None

            status = wait_for("the pipeline to end", ended, 150, group)
            recovered_in = time.monotonic() - killed_at
        finally:
            group.stop()
            rt.close()
        assert status["status"] == "succeeded", status.get("error")
        with rt.db.transaction() as s:
            store = s.get_one(Step, running.id)
        assert store.attempts == 2  # the killed run and the one after it, nothing more
        with rt.db.transaction() as s:
            video_job = s.scalars(
                select(ProviderJob).join(Step).where(Step.pipeline_id == pid, ProviderJob.kind == "video")
            ).one()
        task = httpx.get(f"{sim.base_url}/_sim/tasks/{video_job.task_id}").json()
        data = Path(status["video"]["location"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == task["items"][0]["sha256"]
        assert recovered_in < 90  # before the link's life was out, counting from the kill


def _fifty_one_copies_waiting(rt: Runtime, request_fields: RequestFn) -> list[str]:
    """51 pipelines brought up to their store step, whose nudges are taken, not run."""
    api = Genline(runtime=rt)
    pids = [api.submit(request_fields()).pipeline_id for _ in range(51)]
    store_steps = [run_until(rt, "store") for _ in pids]
    assert len(set(store_steps)) == 51
    return store_steps


def _poison(rt: Runtime, store_step: str, url: str) -> None:
    """The store step's video link becomes ``url``, and it is the most urgent copy of all."""
    with rt.db.transaction() as s:
        step = s.get_one(Step, store_step)
        video = s.scalars(select(Step).where(Step.pipeline_id == step.pipeline_id, Step.kind == "video")).one()
        assert video.output is not None
        asset = {**video.output["assets"][0], "url": url}
        video.output = {**video.output, "assets": [asset]}
        step.deadline_at = utcnow() + timedelta(minutes=10)  # the others' links live 24 h


def _stored_videos(rt: Runtime, store_steps: list[str]) -> dict[str, str]:
    with rt.db.transaction() as s:
        return {st.id: st.status for st in s.scalars(select(Step).where(Step.id.in_(store_steps)))}


def test_a_link_that_can_never_work_fails_at_once_and_fifty_good_copies_are_all_stored(
    rt: Runtime, request_fields: RequestFn
) -> None:
    store_steps = _fifty_one_copies_waiting(rt, request_fields)
    poisoned = store_steps[0]
    _poison(rt, poisoned, "file:///etc/passwd")
    for step_id in store_steps:  # the poisoned copy's nudge first: it is the most urgent, too
        nudges(rt).send(step_id, "genline.store")
    drain(rt)
    statuses = _stored_videos(rt, store_steps)
    assert statuses.pop(poisoned) == StepStatus.FAILED
    assert set(statuses.values()) == {StepStatus.SUCCEEDED} and len(statuses) == 50
    with rt.db.transaction() as s:
        step = s.get_one(Step, poisoned)
        assert step.attempts == 1 and step.error_code == "result_link_unusable"
        assert "/etc/passwd" not in (step.error_message or "")  # the reason, not the link
    status = Genline(runtime=rt).status(step.pipeline_id)
    assert status["status"] == "failed" and status["error"]["code"] == "result_link_unusable"


def test_a_copy_that_keeps_failing_waits_its_own_backoff_and_never_takes_the_turn_of_the_others(
    rt: Runtime, request_fields: RequestFn
) -> None:
    # The drain must end within the poisoned copy's first backoff: a request budget that held
    # the fifty downloads (or the polls before them) back would let it come due again. A first
    # backoff of a minute (1-2 s as shipped) keeps a loaded machine's slow drain from doing the same.
    rt.budget = RequestBudget.for_limit(rt.shared, 1_000_000)
    rt.settings = rt.settings.with_overrides(step_retry_backoff_s=60.0)
    store_steps = _fifty_one_copies_waiting(rt, request_fields)
    poisoned = store_steps[0]
    _poison(rt, poisoned, "http://127.0.0.1:9/video.mp4")  # nothing listens: refused, every time
    for step_id in store_steps:
        nudges(rt).send(step_id, "genline.store")
    drain(rt)
    statuses = _stored_videos(rt, store_steps)
    assert statuses.pop(poisoned) == StepStatus.QUEUED  # waiting out its backoff, link still valid
    assert set(statuses.values()) == {StepStatus.SUCCEEDED} and len(statuses) == 50
    with rt.db.transaction() as s:
        step = s.get_one(Step, poisoned)
        assert step.attempts == 1 and step.error_code == "storage_retryable"
        assert step.not_before is not None and step.deadline_at is not None
        wait_s = (step.not_before - step.updated_at).total_seconds()  # counted from when it was queued again
        assert 0 < wait_s <= rt.settings.step_retry_backoff_s  # its first backoff, with jitter


def test_backoff_doubles_with_jitter_up_to_its_cap_and_a_copy_waits_at_most_half_its_links_life(
    rt: Runtime,
) -> None:
    from genline.pipelines.engine import retry_at

    now = utcnow()
    base, cap = rt.settings.step_retry_backoff_s, rt.settings.step_retry_backoff_cap_s
    for attempts in range(1, 12):
        ceiling = min(cap, base * 2 ** (attempts - 1))
        waits = [(retry_at(rt, attempts, now, None) - now).total_seconds() for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jittered: copies that failed together do not return together
    near = now + timedelta(seconds=20)
    assert all((retry_at(rt, 10, now, near) - now).total_seconds() <= 10 for _ in range(50))


def test_a_job_completed_by_another_round_after_this_claim_lapsed_is_billed_once(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    """A round whose reads outlast its claim's lease: another round takes the job, completes it,
    and books its cost; the slow round's completed read then books nothing."""
    api = Genline(runtime=rt)
    pid = api.submit(request_fields()).pipeline_id
    run_until(rt, "video")  # the image job was polled to completion on the way
    with rt.db.transaction() as s:
        image_job = s.scalars(select(ProviderJob).join(Step).where(Step.pipeline_id == pid)).one()
        image_job.status, image_job.next_poll_at = "processing", utcnow() - timedelta(seconds=1)
        image_job.lease_until = None
        for call in s.scalars(select(ProviderCall).where(ProviderCall.pipeline_id == pid)):
            if call.operation == "poll":
                s.delete(call)  # as if the job had never been seen completed
    slow, quick = Poller(rt), Poller(rt)
    loop = asyncio.new_event_loop()
    try:
        claimed = slow.claim()
        answers = loop.run_until_complete(slow.poll(claimed))  # completed, but not yet written
        with rt.db.transaction() as s:  # its lease runs out while it is slow
            s.get_one(ProviderJob, image_job.id).lease_until = utcnow() - timedelta(seconds=1)
        assert loop.run_until_complete(quick.run_once()) == 1  # the other round completes the job
        slow.apply(claimed, answers)
    finally:
        loop.run_until_complete(slow.aclose())
        loop.run_until_complete(quick.aclose())
        loop.close()
    with rt.db.transaction() as s:
        costed = [
            c.cost_usd
            for c in s.scalars(
                select(ProviderCall).where(ProviderCall.pipeline_id == pid, ProviderCall.operation == "poll")
            )
            if c.cost_usd
        ]
    assert len(costed) == 1  # booked once, by the round that completed the job


def test_a_copy_the_request_budget_holds_back_is_due_again_when_the_budget_says_not_a_sweep_later(
    rt: Runtime, request_fields: RequestFn
) -> None:
    """A store step once reached its object 64 s late in a bench run: refused by genline's own
    request budget before it sent anything, it waited the sweeper's GENLINE_SWEEP_AFTER_S (60 s).
    Refused now, it keeps its attempt and is due again when the budget has a token for it."""
    Genline(runtime=rt).submit(request_fields())
    store = run_until(rt, "store")
    rt.budget = RequestBudget(rt.shared, rate_per_s=2.0, burst=10, provider="held")  # a bucket of its own
    assert rt.budget.draw_polls(100).granted == 7  # the poller's reads took all above their floor
    waits: list[float] = []
    rt.budget.sleep = waits.append  # the clock stands still: no token comes while it waits
    outcome = run_step(rt, store)
    assert outcome is not None and (outcome.state, outcome.code) == ("retry", "provider_rate_limited")
    with rt.db.transaction() as s:
        step = s.get_one(Step, store)
        assert step.status == StepStatus.QUEUED and step.attempts == 0  # nothing was sent: no attempt spent
        assert step.not_before is not None
        wait_s = (step.not_before - step.updated_at).total_seconds()
    assert 0 < wait_s <= rt.budget.max_wait_s < rt.settings.sweep_after_s
