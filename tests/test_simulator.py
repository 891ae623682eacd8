"""The provider simulator, spoken to over real loopback HTTP with httpx, as the real client would."""

from __future__ import annotations

import hashlib
import json
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from genline.provider.simulator import SimConfig, SimulatorHandle, start_simulator
from genline.provider.simulator.media import MP4_MIN_SIZE, media_seed, mp4_chunks, png_bytes, sha256_of
from tests.support.clock import ManualClock

KEY = "sk-test-secret-123"
IMAGE = {"model": "wan-2.7-image", "prompt": "a red bicycle on a sunny street", "n": 1, "size": "1:1"}
VIDEO = {
    "model": "kling-v3-omni",
    "prompt": "a red bicycle rolling by",
    "duration": 6,
    "aspect_ratio": "16:9",
    "resolution": "1080p",
}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write copy for a red bicycle"}]}


Sim = tuple[SimulatorHandle, httpx.Client]


@pytest.fixture
def make_sim() -> Iterator[Callable[..., Sim]]:
    """Start simulators (with ``SimConfig`` fields as keywords) and stop them all afterwards."""
    started: list[tuple[SimulatorHandle, httpx.Client]] = []

    def make(clock: ManualClock | None = None, api_key: str | None = KEY, **fields: Any) -> Sim:
        handle = start_simulator(SimConfig(api_key=api_key, **fields), clock=clock)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        client = httpx.Client(base_url=handle.base_url, headers=headers, timeout=5)
        started.append((handle, client))
        return handle, client

    yield make
    for handle, client in started:
        client.close()
        handle.stop()


def submit(client: httpx.Client, kind: str, body: dict[str, Any], key: str | None = None) -> str:
    response = client.post(f"/v1/{kind}s/generations", json=body, headers={"Idempotency-Key": key} if key else {})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    return str(data[0]["task_id"] if isinstance(data, list) else data["id"])


def task(client: httpx.Client, task_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/tasks/{task_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def result_urls(data: dict[str, Any]) -> list[str]:
    items = data["result"].get("images") or data["result"]["videos"]
    return [u for item in items for u in ([item["url"]] if isinstance(item["url"], str) else item["url"])]


def stats(client: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/_sim/stats").json()
    return body


# --- submit and result shapes ----------------------------------------------------------------------


def test_by_default_images_answer_the_list_shape_and_videos_the_object_shape(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    image = client.post("/v1/images/generations", json=IMAGE).json()
    assert image["code"] == 200 and image["data"][0]["status"] == "submitted"
    assert image["data"][0]["task_id"].startswith("task_01")
    video = client.post("/v1/videos/generations", json=VIDEO).json()["data"]
    assert video["id"].startswith("task_01") and video["status"] == "pending" and video["progress"] == 0
    assert video["object"] == "video.generation.task" and video["type"] == "video"
    assert video["task_info"]["can_cancel"] is True and video["task_info"]["estimated_time"] >= 1


@pytest.mark.parametrize("shape", ["list", "object"])
def test_the_submit_shape_can_be_forced_for_every_model(make_sim: Callable[..., Sim], shape: str) -> None:
    _, client = make_sim(submit_shape=shape)
    for path, body in (("/v1/images/generations", IMAGE), ("/v1/videos/generations", VIDEO)):
        data = client.post(path, json=body).json()["data"]
        assert isinstance(data, list if shape == "list" else dict)
    image = client.post("/v1/images/generations", json=IMAGE).json()["data"]
    if shape == "object":
        assert image["object"] == "image.generation.task" and image["type"] == "image"


def test_by_default_image_urls_are_lists_and_video_urls_are_strings(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim(image_seconds=0, video_seconds=0)
    image = task(client, submit(client, "image", IMAGE))
    video = task(client, submit(client, "video", VIDEO))
    assert isinstance(image["result"]["images"][0]["url"], list)
    assert isinstance(video["result"]["videos"][0]["url"], str)


@pytest.mark.parametrize("shape", ["string", "list"])
def test_the_url_shape_can_be_forced(make_sim: Callable[..., Sim], shape: str) -> None:
    _, client = make_sim(image_seconds=0, video_seconds=0, url_shape=shape)
    for kind, body in (("image", IMAGE), ("video", VIDEO)):
        item = task(client, submit(client, kind, body))["result"][f"{kind}s"][0]
        assert isinstance(item["url"], str if shape == "string" else list)


# --- lifecycle -------------------------------------------------------------------------------------


def test_a_job_goes_pending_then_processing_with_rising_progress_then_completed(make_sim: Callable[..., Sim]) -> None:
    clock = ManualClock()
    _, client = make_sim(clock=clock, video_seconds=10)
    task_id = submit(client, "video", VIDEO)
    first = task(client, task_id)
    assert (first["status"], first["progress"]) == ("pending", 0)
    assert first["estimated_time"] == 10 and "result" not in first
    clock.advance(3)
    early = task(client, task_id)
    clock.advance(4)
    later = task(client, task_id)
    assert early["status"] == later["status"] == "processing"
    assert 0 < early["progress"] < later["progress"] < 100
    clock.advance(3)
    done = task(client, task_id)
    assert done["status"] == "completed" and done["progress"] == 100
    assert done["actual_time"] == 10 and done["completed"] == done["created"] + 10
    assert done["result"]["videos"][0]["expires_at"] == int(clock() + 86400)


def test_with_zero_render_time_an_image_is_completed_at_the_first_poll(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim(image_seconds=0)
    data = task(client, submit(client, "image", {**IMAGE, "n": 2}))
    assert data["status"] == "completed"
    assert len(result_urls(data)) == 2


def test_a_failing_job_ends_failed_with_an_error_and_is_not_billed(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim(video_seconds=0, job_failure_rate=1.0)
    task_id = submit(client, "video", VIDEO)
    data = task(client, task_id)
    assert data["status"] == "failed" and data["error"]["code"] and data["error"]["message"]
    assert "result" not in data
    assert stats(client)["billed_usd"] == 0


def test_a_stalled_job_sits_at_99_percent_beyond_its_estimate_then_completes(make_sim: Callable[..., Sim]) -> None:
    clock = ManualClock()
    _, client = make_sim(clock=clock, video_seconds=5, job_stall_rate=1.0, stall_seconds=60)
    task_id = submit(client, "video", VIDEO)
    clock.advance(30)
    stuck = task(client, task_id)
    assert (stuck["status"], stuck["progress"]) == ("processing", 99)
    clock.advance(36)
    assert task(client, task_id)["status"] == "completed"


# --- result files ----------------------------------------------------------------------------------


def test_results_are_served_with_the_right_type_and_length_and_match_the_recorded_checksum(
    make_sim: Callable[..., Sim],
) -> None:
    _, client = make_sim(image_seconds=0, video_seconds=0, video_bytes=1_000_003, image_px=32)
    for kind, body, content_type in (("image", IMAGE, "image/png"), ("video", VIDEO, "video/mp4")):
        task_id = submit(client, kind, body)
        response = client.get(result_urls(task(client, task_id))[0])
        assert response.status_code == 200
        assert response.headers["content-type"] == content_type
        assert int(response.headers["content-length"]) == len(response.content)
        item = client.get(f"/_sim/tasks/{task_id}").json()["items"][0]
        assert item["size"] == len(response.content)
        assert item["sha256"] == hashlib.sha256(response.content).hexdigest()
    assert len(response.content) == 1_000_003


def test_the_same_request_always_yields_the_same_bytes_and_another_prompt_other_bytes(
    make_sim: Callable[..., Sim],
) -> None:
    _, client = make_sim(image_seconds=0, video_seconds=0)

    def digest(kind: str, body: dict[str, Any]) -> str:
        url = result_urls(task(client, submit(client, kind, body)))[0]
        return hashlib.sha256(client.get(url).content).hexdigest()

    for kind, body in (("image", IMAGE), ("video", VIDEO)):
        assert digest(kind, body) == digest(kind, body)
        assert digest(kind, body) != digest(kind, {**body, "prompt": f"{body['prompt']} at night"})
    assert stats(client)["repeated_inputs"] == 4  # each body above was sent three times


def test_an_image_is_a_real_png_and_a_video_a_real_mp4(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim(image_seconds=0, video_seconds=0, image_px=48, video_bytes=300_000)
    png = client.get(result_urls(task(client, submit(client, "image", IMAGE)))[0]).content
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (48, 48)
    idat_len = struct.unpack(">I", png[33:37])[0]
    assert len(zlib.decompress(png[41 : 41 + idat_len])) == 48 * (1 + 48 * 3)
    mp4 = client.get(result_urls(task(client, submit(client, "video", VIDEO)))[0]).content
    boxes, offset = [], 0
    while offset < len(mp4):
        size, kind = struct.unpack(">I4s", mp4[offset : offset + 8])
        boxes.append(kind)
        offset += size
    assert boxes == [b"ftyp", b"moov", b"mdat"] and offset == len(mp4) == 300_000
    assert mp4[8:12] == b"isom"


def test_media_generation_is_exact_in_size_and_handles_files_over_4_gib() -> None:
    seed = media_seed("video", "m", "p", {})
    for size in (MP4_MIN_SIZE, 1000, 262_144, 3 * 1024 * 1024 + 17):
        assert sha256_of(mp4_chunks(seed, size, chunk=65_536))[0] == size
    head = next(mp4_chunks(seed, 5 * 1024**3))
    assert head[148:152] == struct.pack(">I", 1) and head[152:156] == b"mdat"
    assert struct.unpack(">Q", head[156:164])[0] == 5 * 1024**3 - 148
    assert png_bytes(seed, 8) == png_bytes(seed, 8) != png_bytes(seed[::-1], 8)
    with pytest.raises(ValueError):
        next(mp4_chunks(seed, MP4_MIN_SIZE - 1))


def test_a_result_url_answers_403_request_has_expired_after_its_ttl(make_sim: Callable[..., Sim]) -> None:
    clock = ManualClock()
    _, client = make_sim(clock=clock, image_seconds=0, url_ttl_s=0.8)
    url = result_urls(task(client, submit(client, "image", IMAGE)))[0]
    assert client.get(url).status_code == 200
    clock.advance(0.79)
    assert client.get(url).status_code == 200  # still inside its ttl
    clock.advance(0.02)
    expired = client.get(url)
    assert expired.status_code == 403 and "Request has expired" in expired.text


def test_some_result_urls_get_a_short_life(make_sim: Callable[..., Sim]) -> None:
    clock = ManualClock()
    _, client = make_sim(clock=clock, image_seconds=0, short_url_ttl_rate=1.0, short_url_ttl_s=60)
    data = task(client, submit(client, "image", IMAGE))
    assert data["result"]["images"][0]["expires_at"] == int(clock() + 60)
    clock.advance(61)
    assert client.get(result_urls(data)[0]).status_code == 403


# --- idempotency, auth, faults ---------------------------------------------------------------------


def test_a_repeated_submit_with_the_same_idempotency_key_returns_the_same_task(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    first = submit(client, "video", VIDEO, key="step-42")
    assert submit(client, "video", VIDEO, key="step-42") == first
    assert submit(client, "video", VIDEO, key="step-43") != first
    counts = stats(client)
    assert counts["submit_calls"]["step-42"] == 2 and counts["jobs_created"]["step-42"] == 1
    assert counts["jobs_total"] == 2 and counts["duplicate_jobs"] == 0


def test_a_provider_ignoring_idempotency_keys_shows_up_as_duplicate_jobs(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim(honour_idempotency=False)
    assert submit(client, "image", IMAGE, key="k") != submit(client, "image", IMAGE, key="k")
    assert stats(client)["duplicate_jobs"] == 1


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {KEY}"])
def test_a_missing_or_wrong_api_key_is_refused_with_401_and_never_echoed(
    make_sim: Callable[..., Sim], auth: str | None
) -> None:
    handle, _ = make_sim()
    headers = {"Authorization": auth} if auth else {}
    response = httpx.post(f"{handle.base_url}/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 401
    assert response.headers["x-request-id"] and response.headers["x-ratelimit-remaining"]
    assert set(response.json()["error"]) == {"message", "type", "code", "param"}
    assert KEY not in response.text and "wrong-key" not in response.text
    assert KEY not in httpx.get(f"{handle.base_url}/_sim/config").text


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 429, 500, 503])
def test_a_scripted_http_fault_is_answered_once_then_service_resumes(make_sim: Callable[..., Sim], status: int) -> None:
    _, client = make_sim()
    client.post(
        "/_sim/faults",
        json={
            "script": [
                {"method": "POST", "path": "/v1/videos/generations", "status": status, "times": 1, "retry_after": 2}
            ]
        },
    )
    failed = client.post("/v1/videos/generations", json=VIDEO)
    assert failed.status_code == status
    assert set(failed.json()["error"]) == {"message", "type", "code", "param"}
    if status == 429:
        assert failed.headers["retry-after"] == "2"
    assert client.post("/v1/videos/generations", json=VIDEO).status_code == 200
    assert stats(client)["jobs_total"] == 1


def test_a_scripted_timeout_hangs_the_answer_after_the_job_was_created(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    client.post("/_sim/faults", json={"script": [{"path": "/v1/videos/generations", "status": "timeout"}]})
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/videos/generations", json=VIDEO, headers={"Idempotency-Key": "t"}, timeout=0.3)
    task_id = submit(client, "video", VIDEO, key="t")  # the retry finds the job the lost answer made
    counts = stats(client)
    assert counts["submit_calls"]["t"] == 2 and counts["jobs_created"]["t"] == 1
    assert task(client, task_id)["id"] == task_id


def test_scripted_garbage_answers_are_a_200_html_page_or_an_empty_data(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    client.post(
        "/_sim/faults",
        json={
            "script": [
                {"path": "/v1/tasks/*", "status": "non_json"},
                {"path": "/v1/tasks/*", "status": "missing_fields"},
            ]
        },
    )
    html = client.get("/v1/tasks/task_01X")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        html.json()
    assert client.get("/v1/tasks/task_01X").json() == {"code": 200, "data": {}}
    assert client.get("/v1/tasks/task_01X").status_code == 404
    assert client.get("/_sim/faults").json() == {"pending": []}


def test_a_bad_fault_script_is_refused(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    for entry in ({"path": "/v1/x", "status": 200}, {"path": "/v1/x", "status": 500, "oops": 1}, {"status": 500}):
        assert client.post("/_sim/faults", json={"script": [entry]}).status_code == 400


def test_random_faults_are_reproducible_for_a_given_seed(make_sim: Callable[..., Sim]) -> None:
    def statuses() -> list[int]:
        _, client = make_sim(seed=7, rate_429=0.2, rate_500=0.2, rate_503=0.2)
        return [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(30)]

    first = statuses()
    assert first == statuses()
    assert {200, 429, 500, 503} <= set(first)


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/videos/generations", {**VIDEO, "model": "no-such-model"}),
        ("/v1/videos/generations", {**VIDEO, "model": "wan-2.7-image"}),
        ("/v1/images/generations", {**IMAGE, "model": "kling-v3-omni"}),
        ("/v1/chat/completions", {**CHAT, "model": "vidu-q3-pro"}),
    ],
)
def test_an_unknown_model_or_one_of_the_wrong_kind_is_404(
    make_sim: Callable[..., Sim], path: str, body: dict[str, Any]
) -> None:
    _, client = make_sim()
    response = client.post(path, json=body)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_an_unknown_task_is_404(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    response = client.get("/v1/tasks/task_01NOPE")
    assert response.status_code == 404 and response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/videos/generations", {**VIDEO, "duration": 0}, "duration"),
        ("/v1/videos/generations", {**VIDEO, "duration": 16}, "duration"),  # kling's maximum is 15 s
        ("/v1/videos/generations", {**VIDEO, "aspect_ratio": "5:7"}, "aspect_ratio"),
        ("/v1/images/generations", {**IMAGE, "size": "huge"}, "size"),
        ("/v1/images/generations", {**IMAGE, "prompt": "  "}, "prompt"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ],
)
def test_invalid_parameters_are_400_naming_the_field(
    make_sim: Callable[..., Sim], path: str, body: dict[str, Any], param: str
) -> None:
    _, client = make_sim()
    response = client.post(path, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param and response.json()["error"]["message"]


def test_a_forbidden_prompt_is_rejected_by_moderation(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    response = client.post("/v1/images/generations", json={**IMAGE, "prompt": "some forbidden-content here"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "content_policy_violation"
    assert stats(client)["jobs_total"] == 0


# --- chat and billing ------------------------------------------------------------------------------


def test_chat_returns_deterministic_copy_with_usage(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    first = client.post("/v1/chat/completions", json=CHAT).json()
    second = client.post("/v1/chat/completions", json=CHAT).json()
    text = first["choices"][0]["message"]["content"]
    assert text == second["choices"][0]["message"]["content"] and "red bicycle" in text
    usage = first["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == max(1, (len(text) + 3) // 4)
    short = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5}).json()
    assert short["usage"]["completion_tokens"] <= 5 and short["choices"][0]["finish_reason"] == "length"


def test_chat_streaming_sends_sse_chunks_ending_with_done(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    plain = client.post("/v1/chat/completions", json=CHAT).json()
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        == plain["choices"][0]["message"]["content"]
    )
    assert chunks[-1]["usage"] == plain["usage"] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_bill_adds_chat_tokens_and_completed_jobs_at_catalog_prices(make_sim: Callable[..., Sim]) -> None:
    clock = ManualClock()
    _, client = make_sim(clock=clock, image_seconds=1, video_seconds=1)
    usage = client.post("/v1/chat/completions", json=CHAT).json()["usage"]
    chat_usd = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.60) / 1e6
    image_id = submit(client, "image", {**IMAGE, "n": 2})
    video_id = submit(client, "video", VIDEO)
    assert stats(client)["billed_usd"] == pytest.approx(chat_usd, abs=1e-6)  # nothing finished yet
    clock.advance(2)
    bill = stats(client)
    assert bill["billed_by_task"] == {image_id: 0.0432, video_id: pytest.approx(0.4032)}
    assert bill["billed_usd"] == pytest.approx(chat_usd + 0.0432 + 0.4032, abs=1e-6)
    task(client, video_id)
    assert stats(client)["billed_usd"] == bill["billed_usd"]  # billed once, however often it is seen


# --- rate limits, headers, runtime config ----------------------------------------------------------


def test_every_answer_carries_a_request_id_and_rate_limit_headers(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim(video_seconds=0)
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as streamed:
        streamed.read()
    answers = [client.post("/v1/chat/completions", json=CHAT), client.get("/v1/tasks/task_01NOPE"), streamed]
    for response in answers:
        assert response.headers["x-request-id"].startswith("req_")
        assert response.headers["x-ratelimit-limit"] == "1000"
        assert int(response.headers["x-ratelimit-remaining"]) < 1000
        assert 0 <= float(response.headers["x-ratelimit-reset"]) <= 1
    video = result_urls(task(client, submit(client, "video", VIDEO)))[0]
    files = [client.get(video), client.head(video), client.get(video.replace("/0.mp4", "/7.mp4"))]
    unrouted = client.get("/v2/nowhere")  # the router's own 404, in the provider's error shape
    assert unrouted.status_code == 404 and unrouted.json()["error"]["type"] == "not_found_error"
    ids = [r.headers["x-request-id"] for r in [*answers, *files, unrouted]]
    assert len(set(ids)) == len(ids) and all(i.startswith("req_") for i in ids)
    assert [r.status_code for r in files] == [200, 200, 404]
    assert files[2].text.count(files[2].headers["x-request-id"]) == 1  # in the S3-style error body too


def test_a_scripted_timeout_holds_back_a_streamed_answer_before_it_starts(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim(timeout_hang_s=0.5)
    client.post("/_sim/faults", json={"script": [{"path": "/v1/chat/completions", "status": "timeout"}]})
    started = time.monotonic()
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=5) as response:
        assert time.monotonic() - started >= 0.45  # held back before the first byte, headers included
        assert response.headers["x-request-id"].startswith("req_")
        assert [line for line in response.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"


def test_exceeding_the_per_second_limit_is_429_with_retry_after(make_sim: Callable[..., Sim]) -> None:
    clock = ManualClock()
    _, client = make_sim(clock=clock, rate_limit_per_s=3)
    remaining = [client.get("/v1/tasks/task_01NOPE").headers["x-ratelimit-remaining"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    limited = client.get("/v1/tasks/task_01NOPE")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    clock.advance(1)
    assert client.get("/v1/tasks/task_01NOPE").status_code == 404  # a new window


def test_settings_change_at_runtime_and_unknown_ones_are_refused(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim(image_seconds=30)
    assert task(client, submit(client, "image", IMAGE))["status"] == "pending"
    changed = client.post("/_sim/config", json={"image_seconds": 0, "submit_shape": "object"})
    assert changed.status_code == 200 and changed.json()["image_seconds"] == 0
    data = client.post("/v1/images/generations", json=IMAGE).json()["data"]
    assert task(client, data["id"])["status"] == "completed"
    assert client.post("/_sim/config", json={"image_secnds": 1}).status_code == 400
    assert client.post("/_sim/config", json={"rate_500": 2}).status_code == 400
    assert client.post("/_sim/config", json={"rate_500": 1.0}).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 500


def test_reset_forgets_jobs_counters_and_scripts(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim()
    submit(client, "image", IMAGE, key="a")
    client.post("/_sim/faults", json={"script": [{"path": "/v1/chat/completions", "status": 500}]})
    client.post("/_sim/reset")
    after = stats(client)
    assert after["jobs_total"] == 0 and after["submit_calls"] == {} and after["requests_by_status"] == {}
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_the_foreground_server_prints_its_url_and_stops_cleanly_on_sigterm() -> None:
    code = "from genline.provider.simulator.runner import serve_forever; serve_forever(port=0)"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            url = child.stdout.readline().strip().rsplit(" ", 1)[-1]
            assert url.startswith("http://127.0.0.1:")
            assert httpx.get(f"{url}/_sim/stats").json()["jobs_total"] == 0
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=5) == 0
        finally:
            if child.poll() is None:
                child.kill()


def test_many_jobs_at_once_are_made_as_that_many_submits_would_make_them(make_sim: Callable[..., Sim]) -> None:
    _, client = make_sim(video_seconds=0)
    made = client.post("/_sim/jobs", json={"kind": "video", "count": 3, "key_prefix": "bulk-", **VIDEO})
    assert made.status_code == 200, made.text
    ids = made.json()["task_ids"]
    assert len(set(ids)) == 3
    assert [task(client, i)["status"] for i in ids] == ["completed"] * 3
    assert submit(client, "video", VIDEO, key="bulk-1") == ids[1]  # its idempotency key is taken
    counts = stats(client)
    assert counts["jobs_created"] == {"bulk-0": 1, "bulk-1": 1, "bulk-2": 1}
    assert counts["submit_calls"]["bulk-1"] == 2
    for bad, field in (
        ({"kind": "audio", "count": 1, **VIDEO}, "kind"),
        ({"kind": "video", "count": 0, **VIDEO}, "count"),
        ({"kind": "video", "count": 2, **VIDEO, "prompt": ""}, "prompt"),
    ):
        refused = client.post("/_sim/jobs", json=bad)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field
    assert stats(client)["jobs_total"] == 3
