"""What a pipeline will cost, before it runs: by step, at the catalog's rates in effect.

The copy step is counted at its prompt's tokens (the copy template filled with the description,
``provider.pricing.prompt_tokens``) plus the profile's ``copy_max_tokens`` of completion, so the
estimate is a ceiling for the copy, not a guess; the image step at one image; the video step at the
profile's seconds; storing costs nothing at the provider. Each step uses the model the request names,
else the profile's first choice (a fallback model may cost more or less).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from genline.config.catalog import Catalog, Profile
from genline.config.clock import utcnow
from genline.config.errors import ValidationError
from genline.pipelines.prompts import copy_messages
from genline.pipelines.request import MAX_DESCRIPTION_CHARS, check_models_allowed, check_profile_allowed
from genline.provider.pricing import prompt_tokens

_STEP_KINDS = {"copy": "chat", "image": "image", "video": "video"}
_MICRO = Decimal("0.000001")


@dataclass(frozen=True)
class StepEstimate:
    kind: str  # copy | image | video | store
    model: str  # "" for the store step
    units: float
    unit: str  # tokens | images | seconds ("" for the store step)
    cost_usd: Decimal


@dataclass(frozen=True)
class Estimate:
    profile: str
    batch: bool
    steps: tuple[StepEstimate, ...]
    total_usd: Decimal

    def as_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "batch": self.batch,
            "estimated_cost_usd": money(self.total_usd),
            "steps": [
                {
                    "kind": s.kind,
                    "model": s.model,
                    "units": s.units,
                    "unit": s.unit,
                    "cost_usd": money(s.cost_usd),
                }
                for s in self.steps
            ],
        }


def money(amount: Decimal) -> str:
    """Dollars with six decimals, as text: ``"0.171234"``."""
    return str(amount.quantize(_MICRO))


def profile_of(catalog: Catalog, name: str) -> Profile:
    try:
        return catalog.profiles[name]
    except KeyError:
        raise ValidationError(
            f"profile {name!r} is unknown; choose one of {', '.join(sorted(catalog.profiles))}.",
            code="profile_unknown",
            field="profile",
        ) from None


def _model_for(catalog: Catalog, step: str, profile: Profile, models: Mapping[str, str]) -> str:
    name = models.get(step)
    if name is None:
        listed = {"copy": profile.copy_models, "image": profile.image_models, "video": profile.video_models}
        return listed[step][0]
    kind = _STEP_KINDS[step]
    entry = catalog.models.get(name)
    if entry is None or entry.kind != kind:
        choices = sorted(m for m, e in catalog.models.items() if e.kind == kind)
        raise ValidationError(
            f"{step}_model {name!r} is not a known {kind} model; choose one of {', '.join(choices)}.",
            code="model_unknown",
            field=f"{step}_model",
        )
    cap = entry.max_duration_s
    if step == "video" and cap is not None and profile.video_duration_s > cap:
        raise ValidationError(
            f"{name} makes at most {cap} s of video; profile {profile.name} asks {profile.video_duration_s} s.",
            code="model_duration_exceeded",
            field="video_model",
        )
    return name


def estimate_pipeline(
    catalog: Catalog,
    profile: str,
    *,
    description: str = "",
    models: Mapping[str, str] | None = None,
    batch: bool = False,
    at: datetime | None = None,
) -> Estimate:
    """The cost of one pipeline on ``profile`` at the rates in effect at ``at`` (default: now)."""
    chosen = profile_of(catalog, profile)
    models = dict(models or {})
    unknown = sorted(set(models) - set(_STEP_KINDS))
    if unknown:
        raise ValidationError(
            f"models names steps copy, image and video, not {unknown[0]!r}.", code="models_invalid", field="models"
        )
    when = at or utcnow()
    copy_model = _model_for(catalog, "copy", chosen, models)
    image_model = _model_for(catalog, "image", chosen, models)
    video_model = _model_for(catalog, "video", chosen, models)
    prompt = prompt_tokens(copy_messages(description))
    seconds = float(chosen.video_duration_s)
    steps = (
        StepEstimate(
            "copy",
            copy_model,
            float(prompt + chosen.copy_max_tokens),
            "tokens",
            catalog.model(copy_model, when).chat_cost(prompt, chosen.copy_max_tokens, batch=batch),
        ),
        StepEstimate("image", image_model, 1.0, "images", catalog.model(image_model, when).media_cost(1, batch=batch)),
        StepEstimate(
            "video", video_model, seconds, "seconds", catalog.model(video_model, when).media_cost(seconds, batch=batch)
        ),
        StepEstimate("store", "", 0.0, "", Decimal(0)),
    )
    return Estimate(profile=profile, batch=batch, steps=steps, total_usd=sum((s.cost_usd for s in steps), Decimal(0)))


def estimate_for_feature(
    catalog: Catalog,
    profile: str,
    *,
    feature: str | None = None,
    description: str = "",
    models: Mapping[str, str] | None = None,
    batch: bool = False,
) -> Estimate:
    """``estimate_pipeline``, first refusing what ``feature`` may not ask (its profiles, its model
    choice: the catalog's ``features``) as a submit would; no feature: no entitlement check."""
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise ValidationError(
            f"description is {len(description)} characters long; the most allowed is {MAX_DESCRIPTION_CHARS}.",
            code="description_too_long",
            field="description",
        )
    if feature is not None:
        profile_of(catalog, profile)
        policy = catalog.feature_policy(feature)
        check_profile_allowed(feature, profile, policy)
        check_models_allowed(feature, {k: v for k, v in (models or {}).items() if v}, policy)
    return estimate_pipeline(catalog, profile, description=description, models=models, batch=batch)
