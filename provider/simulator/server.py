"""The simulated provider as an aiohttp application: its state and the routes it answers.

``build_app(config, state)`` serves the APIMart-style contract (``POST /v1/chat/completions``,
``POST /v1/images/generations``, ``POST /v1/videos/generations``, ``GET /v1/tasks/{id}``), the
temporary result files (``GET /files/{task_id}/{index}.png|mp4``) and the admin routes:

    GET  /_sim/stats              counters, idempotency keys, bill
    GET  /_sim/tasks/{task_id}    one job's full state, with size and sha256 of each result item
    GET  /_sim/config             the settings (the API key only as ``api_key_set``)
    POST /_sim/config             {field: value, ...}: change settings at runtime (unknown field: 400)
    GET  /_sim/faults             scripted faults not yet used
    POST /_sim/faults             {"script": [{method, path, status, times, retry_after}], "replace": false}
    POST /_sim/jobs               {kind, count, key_prefix?, ...a submit's body}: many jobs at once
                                  (their task_ids, estimated_times and done_at)
    POST /_sim/reset              forget jobs, counters and scripts

``SimState`` holds jobs and counters. No background task runs: a job's status follows from the clock
(see ``media.Job``), and a media job is billed once, the first time it is seen completed. Every
non-admin request first passes the gate in ``faults`` (latency, rate limit, auth, faults).

Batch mode: an image or video submit whose body has ``"batch": true`` is the provider's batch
API: the job renders ``BATCH_SLOWDOWN`` (3x) slower and is billed at ``BATCH_PRICE`` (half) of the
model's catalog price. The stats say so: ``batch_jobs``, ``billed_batch_usd`` (part of
``billed_media_usd``), and ``GET /_sim/tasks/{id}`` shows ``"batch": true``. ``"batch"`` other than
true or false is a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NamedTuple

from aiohttp import web

from genline.config.constants import IDEMPOTENCY_HEADER
from genline.provider.simulator.faults import (
    REQUEST_ID,
    FaultScript,
    RateWindow,
    SimConfig,
    SimError,
    hang_before_streaming,
    make_gate,
    stamp_headers,
)
from genline.provider.simulator.media import (
    BadParam,
    Job,
    approx_tokens,
    cached_png,
    marketing_copy,
    media_params,
    media_seed,
    message_text,
    sha256_of,
)

_FILE = re.compile(r"(\d+)\.(png|mp4)")
BATCH_SLOWDOWN = 3.0  # a batch job takes this many times the usual render time
BATCH_PRICE = Decimal("0.5")  # and costs this part of the catalog price
_MODERATION_WORD = "forbidden-content"


class SimState:
    """Jobs, idempotency keys, fault script, counters and the bill of one simulated provider."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.rng = random.Random(config.seed)
        self.script = FaultScript()
        self.window = RateWindow()
        self.closing = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        """Forget every job, key, counter, scripted fault and rate window; reseed the fault draws."""
        self.jobs: dict[str, Job] = {}
        self.task_by_key: dict[str, str] = {}
        self.key_counts: dict[str, dict[str, int]] = {}
        self.keyless = {"submit_calls": 0, "jobs_created": 0}
        self.polls_total = 0
        self.chat_calls = 0
        self.billed_chat = Decimal(0)
        self.billed_by_task: dict[str, Decimal] = {}
        self.requests_by_status: Counter[int] = Counter()
        self.requests_by_route: Counter[str] = Counter()  # by the path's first two parts
        self.inputs: Counter[bytes] = Counter()
        self._unsettled: set[str] = set()
        self._serial = 0
        self.videos_made = 0  # counts video jobs for SimConfig.poisoned_link_every
        self.batch_tasks: set[str] = set()  # jobs submitted in batch mode
        self.script.clear()
        self.window.clear()
        self.rng.seed(self.config.seed)

    def new_task_id(self) -> str:
        self._serial += 1
        return f"task_01{int(self.clock() * 1000):011X}{self._serial:06X}{secrets.token_hex(4).upper()}"

    def add_job(self, job: Job) -> None:
        self.jobs[job.id] = job
        self._unsettled.add(job.id)
        self.inputs[job.seeds[0]] += 1

    def count_submit(self, key: str | None, created: bool) -> None:
        counts = (
            self.keyless if key is None else self.key_counts.setdefault(key, {"submit_calls": 0, "jobs_created": 0})
        )
        counts["submit_calls"] += 1
        counts["jobs_created"] += int(created)

    def settle(self, job: Job, now: float) -> None:
        """Bill a media job once, the first time it is seen completed."""
        if job.id in self._unsettled:
            status = job.phase(now)[0]
            if status in ("completed", "failed", "cancelled"):
                self._unsettled.discard(job.id)
                if status == "completed":
                    self.billed_by_task[job.id] = job.cost_usd

    def bill_chat(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        entry = self.config.prices[model]
        self.chat_calls += 1
        self.billed_chat += (
            Decimal(str(entry.get("input_per_million_usd", 0))) * prompt_tokens
            + Decimal(str(entry.get("output_per_million_usd", 0))) * completion_tokens
        ) / Decimal(1_000_000)

    async def hang(self, seconds: float) -> None:
        """Sleep like a stuck upstream, but wake at once when the server shuts down."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        for task_id in list(self._unsettled):
            self.settle(self.jobs[task_id], now)
        media = sum(self.billed_by_task.values(), Decimal(0))
        return {
            "submit_calls": {k: v["submit_calls"] for k, v in self.key_counts.items()},  # per idempotency key
            "jobs_created": {k: v["jobs_created"] for k, v in self.key_counts.items()},
            "keyless": dict(self.keyless),  # submits that carried no Idempotency-Key
            "duplicate_jobs": sum(max(0, v["jobs_created"] - 1) for v in self.key_counts.values()),
            "repeated_inputs": sum(n - 1 for n in self.inputs.values()),
            "jobs_total": len(self.jobs),
            "jobs_by_status": dict(Counter(j.phase(now)[0] for j in self.jobs.values())),
            "polls_total": self.polls_total,
            "chat_calls": self.chat_calls,
            "billed_usd": round(float(media + self.billed_chat), 6),
            "billed_media_usd": round(float(media), 6),
            "billed_chat_usd": round(float(self.billed_chat), 6),
            "billed_by_task": {k: round(float(v), 6) for k, v in self.billed_by_task.items()},
            "batch_jobs": len(self.batch_tasks),
            "billed_batch_usd": round(
                float(sum((v for k, v in self.billed_by_task.items() if k in self.batch_tasks), Decimal(0))), 6
            ),
            "requests_by_status": {str(k): v for k, v in sorted(self.requests_by_status.items())},
            "requests_by_route": dict(sorted(self.requests_by_route.items())),
        }


STATE_KEY = web.AppKey("sim_state", SimState)


def _state(request: web.Request) -> SimState:
    return request.app[STATE_KEY]


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise SimError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise SimError(400, "The request body must be a JSON object.")
    return body


def _model(state: SimState, body: dict[str, Any], kind: str) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise SimError(400, "'model' is required.", param="model")
    entry = state.config.prices.get(model)
    if entry is None or entry.get("kind") != kind:
        raise SimError(
            404, f"The model '{model}' does not exist or is not a {kind} model.", code="model_not_found", param="model"
        )
    return entry


def _moderate(text: str) -> None:
    if _MODERATION_WORD in text.lower():
        raise SimError(
            400,
            "Your request was rejected by the safety system: the prompt may contain content that is not allowed.",
            type_="content_policy_violation",
            code="content_policy_violation",
            param="prompt",
        )


# --- /v1 -------------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state, body = _state(request), await _json(request)
    model = body.get("model")
    _model(state, body, "chat")
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str | list)
            for m in messages
        )
    ):
        raise SimError(400, "'messages' must be a non-empty list of {role, content}.", param="messages")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise SimError(400, "'max_tokens' must be a positive integer.", param="max_tokens")
    prompt_text = "\n".join(message_text(m["content"]) for m in messages)  # moderation is for media prompts only
    text, truncated = marketing_copy(messages, max_tokens)
    usage = {"prompt_tokens": approx_tokens(prompt_text), "completion_tokens": approx_tokens(text)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    state.bill_chat(str(model), usage["prompt_tokens"], usage["completion_tokens"])
    base = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(state.clock()), "model": model}
    finish = "length" if truncated else "stop"
    if body.get("stream") is True:
        return await _stream_chat(request, state, base, text, finish, usage)
    return web.json_response(
        {
            **base,
            "object": "chat.completion",
            "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        }
    )


async def _stream_chat(
    request: web.Request, state: SimState, base: dict[str, Any], text: str, finish: str, usage: dict[str, int]
) -> web.StreamResponse:
    await hang_before_streaming(request, state)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    def event(delta: dict[str, str], reason: str | None = None, **extra: Any) -> bytes:
        chunk = {
            **base,
            "object": "chat.completion.chunk",
            **extra,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    await response.write(event({"role": "assistant", "content": ""}))
    words = text.split(" ")
    for i in range(0, len(words), 4):
        piece = " ".join(words[i : i + 4]) + (" " if i + 4 < len(words) else "")
        await response.write(event({"content": piece}))
    await response.write(event({}, finish, usage=usage))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


class MediaRequest(NamedTuple):
    """A media submit's body, checked."""

    model: str
    prompt: str
    params: dict[str, Any]
    items: int
    entry: dict[str, Any]  # the model's price entry


def _media_request(state: SimState, body: dict[str, Any], kind: str) -> MediaRequest:
    """A media submit's body, checked as the provider checks it."""
    entry = _model(state, body, kind)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SimError(400, "'prompt' is required and must not be empty.", param="prompt")
    _moderate(prompt)
    try:
        params, items = media_params(body, kind, entry.get("max_duration_s"))
    except BadParam as exc:
        raise SimError(400, str(exc), param=exc.param) from None
    return MediaRequest(str(body["model"]), prompt, params, items, entry)


async def submit(request: web.Request) -> web.Response:
    kind = request.match_info["kind"][:-1]  # images -> image
    state, body = _state(request), await _json(request)
    key = request.headers.get(IDEMPOTENCY_HEADER) or None
    job = _job_for_key(state, kind, _media_request(state, body, kind), key, batch=_batch_mode(body))
    config = state.config
    shape = config.submit_shape if config.submit_shape != "by_model" else ("list" if kind == "image" else "object")
    if shape == "list":
        data: Any = [{"status": "submitted", "task_id": job.id}]
    else:
        data = {
            "id": job.id,
            "status": "pending",
            "progress": 0,
            "object": f"{kind}.generation.task",
            "type": kind,
            "task_info": {"can_cancel": True, "estimated_time": job.estimated_time},
            "created": int(job.created),
        }
    return web.json_response({"code": 200, "data": data})


def _batch_mode(body: dict[str, Any]) -> bool:
    """A submit's ``batch`` flag: the provider's batch mode (slower, cheaper)."""
    batch = body.get("batch", False)
    if not isinstance(batch, bool):
        raise SimError(400, "'batch' must be true or false.", param="batch")
    return batch


def _job_for_key(state: SimState, kind: str, checked: MediaRequest, key: str | None, *, batch: bool = False) -> Job:
    """The job a submit with idempotency key ``key`` gets: the one that key made before (when the
    provider honours keys), or a new one. Counted either way."""
    known = state.task_by_key.get(key) if key and state.config.honour_idempotency else None
    job = state.jobs.get(known) if known else None
    state.count_submit(key, created=job is None)
    if job is None:
        job = _new_job(state, kind, *checked, key)
        if batch:  # the batch API: slower, at the batch price
            job.duration_s *= BATCH_SLOWDOWN
            job.cost_usd *= BATCH_PRICE
            state.batch_tasks.add(job.id)
    return job


def _new_job(
    state: SimState,
    kind: str,
    model: str,
    prompt: str,
    params: dict[str, Any],
    items: int,
    entry: dict[str, Any],
    key: str | None,
) -> Job:
    config, rng = state.config, state.rng
    failed, stalled, short = rng.random(), rng.random(), rng.random()
    outcome = "fail" if failed < config.job_failure_rate else "stall" if stalled < config.job_stall_rate else "complete"
    if kind == "image":
        cost = Decimal(str(entry.get("per_image_usd", 0))) * items
    else:
        cost = Decimal(str(entry.get("per_second_usd", 0))) * Decimal(str(params["duration"]))
    url_shape = config.url_shape if config.url_shape != "by_model" else ("list" if kind == "image" else "string")
    duration, jitter = _render_time(config, rng, kind, model)
    job = Job(
        id=state.new_task_id(),
        kind=kind,
        model=model,
        prompt=prompt,
        params=params,
        seeds=[media_seed(kind, model, prompt, params, i) for i in range(items)],
        created=state.clock(),
        duration_s=duration,
        estimate_factor=1 / jitter,
        outcome=outcome,
        stall_s=config.stall_seconds,
        url_ttl_s=config.short_url_ttl_s if short < config.short_url_ttl_rate else config.url_ttl_s,
        url_shape=url_shape,
        file_size=config.image_px if kind == "image" else config.video_bytes,
        cost_usd=cost,
        idempotency_key=key,
    )
    every = config.poisoned_link_every
    if kind == "video" and every:
        state.videos_made += 1
        if state.videos_made % every == 0:  # a dead link that runs out soon: retried until then, then gone
            job.poisoned, job.url_ttl_s = True, config.short_url_ttl_s
    state.add_job(job)
    if key:
        state.task_by_key[key] = job.id
    return job


def _render_time(config: SimConfig, rng: random.Random, kind: str, model: str) -> tuple[float, float]:
    """A new job's render time and its jitter (render time ÷ the provider's estimate); see
    ``SimConfig.render_seconds``. Draws nothing when every factor is 1, so seeded runs stay as
    they were."""
    nominal = config.render_seconds.get(model, config.image_seconds if kind == "image" else config.video_seconds)
    spread, jitter = config.render_spread_low, config.render_jitter_low
    if config.render_spread_low != config.render_spread_high:
        spread = rng.uniform(config.render_spread_low, config.render_spread_high)
    if config.render_jitter_low != config.render_jitter_high:
        jitter = rng.uniform(config.render_jitter_low, config.render_jitter_high)
    return nominal * spread * jitter, jitter


async def get_task(request: web.Request) -> web.Response:
    state = _state(request)
    job = state.jobs.get(request.match_info["task_id"])
    if job is None:
        raise SimError(404, f"Task '{request.match_info['task_id']}' does not exist.", code="task_not_found")
    now = state.clock()
    state.polls_total += 1
    job.polls += 1
    state.settle(job, now)
    return web.json_response({"code": 200, "data": job.view(now, f"{request.scheme}://{request.host}")})


async def cancel_task(request: web.Request) -> web.Response:
    """Cancel a job that has not finished; a cancelled job is never billed."""
    state = _state(request)
    job = state.jobs.get(request.match_info["task_id"])
    if job is None:
        raise SimError(404, f"Task '{request.match_info['task_id']}' does not exist.", code="task_not_found")
    now = state.clock()
    status = job.phase(now)[0]
    if status in ("completed", "failed", "cancelled"):
        raise SimError(
            400, f"Task '{job.id}' has already ended ({status}) and cannot be cancelled.", code="task_not_cancellable"
        )
    job.cancelled_at = now
    state.settle(job, now)
    return web.json_response({"code": 200, "data": {"id": job.id, "status": "cancelled"}})


# --- result files ----------------------------------------------------------------------------------


def _s3_error(status: int, code: str, message: str, request: web.Request) -> web.Response:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<Key>{request.path}</Key><RequestId>{request.get(REQUEST_ID, '')}</RequestId></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


async def result_file(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    job = state.jobs.get(request.match_info["task_id"])
    match = _FILE.fullmatch(request.match_info["name"])
    now = state.clock()
    if (
        job is None
        or match is None
        or match[2] != job.ext
        or int(match[1]) >= len(job.seeds)
        or job.phase(now)[0] != "completed"
    ):
        return _s3_error(404, "NoSuchKey", "The specified key does not exist.", request)
    if now >= job.expires_at:
        return _s3_error(403, "AccessDenied", "Request has expired", request)
    index = int(match[1])
    await hang_before_streaming(request, state)
    if job.kind == "image":
        return web.Response(body=cached_png(job.seeds[index], job.file_size), content_type="image/png")
    response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
    response.content_length = job.file_size
    await response.prepare(request)
    if request.method == "HEAD":
        await response.write_eof()
        return response
    rate = state.config.download_bytes_per_s
    try:
        for chunk in job.chunks(index):  # 256 KiB at a time, never the whole file
            await response.write(chunk)
            if rate > 0:  # a provider's storage is not a local disk: a large result takes a while
                await asyncio.sleep(len(chunk) / rate)
        await response.write_eof()
    except ConnectionResetError:  # the client hung up (or was killed) mid-download: nothing to answer
        pass
    return response


# --- admin -----------------------------------------------------------------------------------------


async def sim_stats(request: web.Request) -> web.Response:
    return web.json_response(_state(request).stats())


async def sim_task(request: web.Request) -> web.Response:
    state = _state(request)
    job = state.jobs.get(request.match_info["task_id"])
    if job is None:
        raise SimError(404, "No such task.", code="task_not_found")
    now = state.clock()
    state.settle(job, now)
    items = []
    for i in range(len(job.seeds)):
        if i not in job.digests:  # hashing a large video must not block the loop
            job.digests[i] = await asyncio.get_running_loop().run_in_executor(None, sha256_of, job.chunks(i))
        size, digest = job.digests[i]
        items.append(
            {
                "index": i,
                "path": f"/files/{job.id}/{i}.{job.ext}",
                "content_type": job.content_type,
                "size": size,
                "sha256": digest,
            }
        )
    status, progress = job.phase(now)
    return web.json_response(
        {
            "id": job.id,
            "kind": job.kind,
            "model": job.model,
            "prompt": job.prompt,
            "params": job.params,
            "status": status,
            "progress": progress,
            "outcome": job.outcome,
            "created": job.created,
            "done_at": job.done_at,
            "expires_at": job.expires_at,
            "estimated_time": job.estimated_time,
            "url_shape": job.url_shape,
            "idempotency_key": job.idempotency_key,
            "polls": job.polls,
            "cost_usd": float(job.cost_usd),
            "billed_usd": float(state.billed_by_task.get(job.id, 0)),
            "batch": job.id in state.batch_tasks,
            "items": items,
        }
    )


async def sim_config(request: web.Request) -> web.Response:
    state = _state(request)
    if request.method == "POST":
        try:
            changed = state.config.update(await _json(request))
        except (ValueError, TypeError) as exc:
            raise SimError(400, str(exc)) from None
        if "seed" in changed:
            state.rng.seed(state.config.seed)
    return web.json_response(state.config.public())


async def sim_faults(request: web.Request) -> web.Response:
    state = _state(request)
    if request.method == "POST":
        body = await _json(request)
        try:
            state.script.add(body.get("script"), replace=bool(body.get("replace", False)))
        except ValueError as exc:
            raise SimError(400, str(exc)) from None
    return web.json_response({"pending": [e.to_json() for e in state.script.entries]})


async def sim_jobs(request: web.Request) -> web.Response:
    """``{"kind", "count", "key_prefix"?, ...a submit's body}``: ``count`` jobs made at once, as that
    many submits would make them (idempotency keys ``key_prefix0``, ``key_prefix1``, ...; none without
    a prefix), for setting up thousands of jobs in a benchmark without thousands of requests."""
    state, body = _state(request), await _json(request)
    kind, count, prefix = body.pop("kind", None), body.pop("count", None), body.pop("key_prefix", None)
    if kind not in ("image", "video"):
        raise SimError(400, "'kind' must be 'image' or 'video'.", param="kind")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1_000_000:
        raise SimError(400, "'count' must be a whole number from 1 to 1000000.", param="count")
    if prefix is not None and not isinstance(prefix, str):
        raise SimError(400, "'key_prefix' must be a string.", param="key_prefix")
    checked, batch = _media_request(state, body, kind), _batch_mode(body)
    keys = (None if prefix is None else f"{prefix}{i}" for i in range(count))
    jobs = [_job_for_key(state, kind, checked, key, batch=batch) for key in keys]
    # with each job's estimate (what its submit would have said) and when it will be done
    return web.json_response(
        {
            "task_ids": [job.id for job in jobs],
            "estimated_times": [job.estimated_time for job in jobs],
            "done_at": [job.done_at for job in jobs],
        }
    )


async def sim_reset(request: web.Request) -> web.Response:
    _state(request).reset()
    return web.json_response({"ok": True})


def build_app(config: SimConfig, state: SimState | None = None) -> web.Application:
    """The simulator as an aiohttp application; pass ``state`` to read it directly from tests."""
    state = state or SimState(config)
    state.config = config
    app = web.Application(middlewares=[make_gate(state)], client_max_size=16 * 1024 * 1024)
    app[STATE_KEY] = state
    app.on_response_prepare.append(stamp_headers)

    async def wake_hangs(_: web.Application) -> None:
        state.closing.set()

    app.on_shutdown.append(wake_hangs)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post(r"/v1/{kind:images|videos}/generations", submit)
    app.router.add_get("/v1/tasks/{task_id}", get_task)
    app.router.add_post("/v1/tasks/{task_id}/cancel", cancel_task)
    app.router.add_get("/files/{task_id}/{name}", result_file)
    app.router.add_get("/_sim/stats", sim_stats)
    app.router.add_get("/_sim/tasks/{task_id}", sim_task)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/_sim/config", sim_config)
        app.router.add_route(method, "/_sim/faults", sim_faults)
    app.router.add_post("/_sim/jobs", sim_jobs)
    app.router.add_post("/_sim/reset", sim_reset)
    return app
