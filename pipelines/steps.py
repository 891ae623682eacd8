"""The pipeline's steps: plain functions with one signature, ``(runtime, StepContext) -> Outcome``.

    copy  → image → video → store

Adding a step is writing one function and adding it to ``PIPELINE``. A step either finishes
(``Done`` with its output) or hands a provider job to the poller (``Waiting``); it never sleeps
while the provider renders. Steps that start paid jobs go through ``start_provider_job``, which
keeps invariant 2: the intent row and its idempotency key exist before the submit, and the
provider's task_id is committed before anything else happens with it.

A step may also have a ``prepare`` hook (``PREPARE``): it runs inside the engine's claiming
transaction, so what it reads or writes costs no transaction of its own — the media steps record
their first intent there (committed before the submit, as invariant 2 asks), the store step reads
what is stored already. The video step copies the image once the video is submitted
(``store_image_early``): the image's link was made first and runs out first. A ``Done`` may
carry ``write``: rows committed in the same transaction as the step's completion.
"""

from __future__ import annotations

from typing import Any

from genline.config.constants import StepKind
from genline.config.errors import (
    CircuitOpen,
    ProviderConnectionError,
    ProviderError,
    ProviderNotFound,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from genline.config.logging import get_logger
from genline.pipelines.cache import CachedCopy, cached_answer, copy_plan, hit_record, keep_answer, prepare_copy
from genline.pipelines.context import Done, Outcome, PrepareFn, StepContext, StepFn, Waiting
from genline.pipelines.jobs import forget_new_intent, media_plan, prepare_job, start_provider_job
from genline.pipelines.prompts import image_prompt, video_prompt
from genline.pipelines.runtime import Runtime
from genline.pipelines.store import image_for_video, prepare_store, provider_url, store_image_early, store_outputs

log = get_logger("genline.steps")


# --- copy ------------------------------------------------------------------------------------------
def write_copy(rt: Runtime, ctx: StepContext) -> Outcome:
    plan = copy_plan(ctx)  # the messages, parameters and each candidate model's cache key
    last: ProviderError | None = None
    for model, key in plan.keys.items():
        if (cached := cached_answer(rt, ctx, key)) is not None:
            hit, latency_ms = cached  # no call, no cost; audited as a hit, held and committed like a call
            rt.gateway.audit.record(hit_record(ctx.call(model), hit, latency_ms))
            tokens = hit.prompt_tokens + hit.completion_tokens
            return Done({"model": model, "text": hit.text, "tokens": tokens, "prompt": plan.prompt, "cached": True})
        try:
            result = rt.gateway.chat(ctx.call(model), plan.messages, max_tokens=plan.max_tokens)
        except (
            ProviderNotFound,
            ProviderUnavailable,
            RateLimited,
            CircuitOpen,
            ProviderTimeout,
            ProviderConnectionError,
        ) as err:
            last = err  # this model is out of reach now: the next one may not be
            continue
        # a paid answer is kept (a degraded copy below never is): in Redis now, or with the completion
        keep = keep_answer(rt, key, CachedCopy(model, result.text, result.prompt_tokens, result.completion_tokens))
        tokens = result.prompt_tokens + result.completion_tokens
        return Done({"model": model, "text": result.text, "tokens": tokens, "prompt": plan.prompt}, write=keep)
    assert last is not None
    if last.retryable and ctx.attempt >= 2:
        # Every copy model has been down through a retry: the pipeline goes on with plain copy
        # built from the seller's own words, marked degraded, rather than waiting or failing.
        log.warning("copy_degraded", step_id=ctx.step_id, code=last.code)
        return Done({"model": None, "text": template_copy(ctx.description), "degraded": True, "tokens": 0})
    raise last


def template_copy(description: str) -> str:
    first = description.strip().split(". ")[0].rstrip(".")
    return f"{first}.\n{description.strip()} Made to be used every day. Order yours today."


# --- provider jobs (image, video) -----------------------------------------------------------------
def _headline(ctx: StepContext) -> str:
    text = str(ctx.outputs.get("copy", {}).get("text", ""))
    return (text.splitlines()[0] if text else ctx.description)[:300]


def photo_for_provider(rt: Runtime, ctx: StepContext) -> str:
    """The product photo as the provider takes it: an http(s) URL when there is one (the caller's,
    or a presigned link to our S3 copy); on local storage our copy's bytes inline (at most 10 MB,
    checked at submit)."""
    if ctx.image_url.startswith(("http://", "https://")):
        return ctx.image_url
    return provider_url(rt, ctx.image_ref)


def render_image(rt: Runtime, ctx: StepContext) -> Outcome:
    prompt = image_prompt(ctx.description[:500], _headline(ctx))
    try:
        photo = photo_for_provider(rt, ctx)
    except Exception:
        forget_new_intent(rt, ctx)  # nothing was sent under it: no job of unknown outcome to report
        raise

    def payload(model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "n": 1,
            "size": ctx.profile.image_size,
            "image_urls": [photo],
        }
        if ctx.batch:  # the provider's batch mode: slower, at its batch price
            body["batch"] = True
        return body

    models, units = media_plan(ctx)
    return start_provider_job(rt, ctx, "image", models, payload, units)


def render_video(rt: Runtime, ctx: StepContext) -> Outcome:
    prompt = video_prompt(_headline(ctx))
    try:
        image, ours = image_for_video(rt, ctx)
    except Exception:
        forget_new_intent(rt, ctx)  # nothing was sent under it: no job of unknown outcome to report
        raise

    def payload(model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "duration": ctx.profile.video_duration_s,
            "aspect_ratio": ctx.profile.video_aspect_ratio,
            "resolution": ctx.profile.video_resolution,
        }
        if image:
            body["image_urls"] = [image]
        if ctx.batch:  # the provider's batch mode: slower, at its batch price
            body["batch"] = True
        return body

    models, units = media_plan(ctx)
    outcome = start_provider_job(rt, ctx, "video", models, payload, units)
    if isinstance(outcome, Waiting) and image and not ours:  # the video renders: copy the image meanwhile
        store_image_early(rt, ctx)
    return outcome


PIPELINE: tuple[tuple[StepKind, StepFn], ...] = (
    (StepKind.COPY, write_copy),
    (StepKind.IMAGE, render_image),
    (StepKind.VIDEO, render_video),
    (StepKind.STORE, store_outputs),
)
STEP_FUNCTIONS: dict[str, StepFn] = {kind.value: fn for kind, fn in PIPELINE}
PREPARE: dict[str, PrepareFn] = {
    StepKind.COPY.value: prepare_copy,  # the copy cache's lookup, when it is in the database
    StepKind.IMAGE.value: prepare_job,
    StepKind.VIDEO.value: prepare_job,
    StepKind.STORE.value: prepare_store,
}
