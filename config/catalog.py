"""The price catalog and pipeline profiles: which models a profile uses, and what each costs.

Prices live in JSON (``config/catalog.json`` unless GENLINE_CATALOG_FILE names another), never in
code. A profile names, for each step, an ordered list of models; the first is preferred.

The ``features`` section holds each feature's policy for what sellers write (``pipelines/screening.py``):
``pii`` is ``mask`` (personal data replaced by typed placeholders before anything is stored, logged or
sent) or ``reject``; ``injection`` is ``flag`` (recorded on the pipeline, logged, let through as quoted
data) or ``reject``; ``injection_blocklist`` adds phrases to the built-in heuristics. Its ``default``
entry applies to every feature not listed, and fills what a listed feature leaves out (blocklists add
up). Without a ``features`` section every feature gets ``pii: mask``, ``injection: flag``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from genline.config.errors import ConfigError

BUILTIN_CATALOG = Path(__file__).with_name("catalog.json")
_KINDS = {"chat", "image", "video"}
PII_POLICIES = ("mask", "reject")
INJECTION_POLICIES = ("flag", "reject")
DEFAULT_FEATURE = "default"


@dataclass(frozen=True)
class ModelPrice:
    name: str
    kind: str  # chat | image | video
    input_per_million_usd: Decimal = Decimal(0)
    output_per_million_usd: Decimal = Decimal(0)
    per_image_usd: Decimal = Decimal(0)
    per_second_usd: Decimal = Decimal(0)
    max_duration_s: int | None = None

    def chat_cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (self.input_per_million_usd * prompt_tokens + self.output_per_million_usd * completion_tokens) / Decimal(
            1_000_000
        )

    def media_cost(self, units: float) -> Decimal:
        """Images for an image model, seconds for a video model."""
        rate = self.per_image_usd if self.kind == "image" else self.per_second_usd
        return rate * Decimal(str(units))


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    copy_models: tuple[str, ...]
    image_models: tuple[str, ...]
    video_models: tuple[str, ...]
    copy_max_tokens: int
    image_size: str
    video_duration_s: int
    video_aspect_ratio: str
    video_resolution: str


@dataclass(frozen=True)
class FeaturePolicy:
    """What a feature does with personal data and suspected prompt injection in a description."""

    pii: str = "mask"  # mask | reject
    injection: str = "flag"  # flag | reject
    injection_blocklist: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelPrice]
    profiles: dict[str, Profile]
    features: dict[str, FeaturePolicy] = field(default_factory=dict)
    default_feature: FeaturePolicy = field(default_factory=FeaturePolicy)

    def feature_policy(self, feature: str) -> FeaturePolicy:
        """The feature's policy; a feature the catalog does not list gets the default."""
        return self.features.get(feature, self.default_feature)

    def model(self, name: str) -> ModelPrice:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"Model {name!r} is not in the price catalog.") from None

    def estimate(self, profile: Profile) -> Decimal:
        """Cost of one pipeline on the profile's first-choice models (copy assumed at max tokens)."""
        chat = self.model(profile.copy_models[0])
        image = self.model(profile.image_models[0])
        video = self.model(profile.video_models[0])
        return (
            chat.chat_cost(400, profile.copy_max_tokens)
            + image.media_cost(1)
            + video.media_cost(profile.video_duration_s)
        )


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and check a catalog file; every problem is a ConfigError at start-up."""
    source = Path(path) if path else BUILTIN_CATALOG
    try:
        raw = json.loads(source.read_text())
    except OSError as exc:
        raise ConfigError(f"The catalog file {source} cannot be read: {exc.strerror}.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"The catalog file {source} is not valid JSON (line {exc.lineno}).") from None
    return parse_catalog(raw, str(source))


def parse_catalog(raw: Any, source: str = "catalog") -> Catalog:
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("models"), dict)
        or not isinstance(raw.get("profiles"), dict)
    ):
        raise ConfigError(f"The catalog {source} needs a 'models' object and a 'profiles' object.")
    models: dict[str, ModelPrice] = {}
    for name, spec in raw["models"].items():
        if not isinstance(spec, dict) or spec.get("kind") not in _KINDS:
            raise ConfigError(f"Catalog model {name!r} needs a kind of chat, image or video.")
        try:
            models[name] = ModelPrice(
                name=name,
                kind=spec["kind"],
                input_per_million_usd=Decimal(str(spec.get("input_per_million_usd", 0))),
                output_per_million_usd=Decimal(str(spec.get("output_per_million_usd", 0))),
                per_image_usd=Decimal(str(spec.get("per_image_usd", 0))),
                per_second_usd=Decimal(str(spec.get("per_second_usd", 0))),
                max_duration_s=spec.get("max_duration_s"),
            )
        except (ArithmeticError, ValueError, TypeError):
            raise ConfigError(f"Catalog model {name!r} has a price that is not a number.") from None

    profiles: dict[str, Profile] = {}
    for name, spec in raw["profiles"].items():
        try:
            profile = Profile(
                name=name,
                description=str(spec.get("description", "")),
                copy_models=tuple(spec["copy_models"]),
                image_models=tuple(spec["image_models"]),
                video_models=tuple(spec["video_models"]),
                copy_max_tokens=int(spec["copy_max_tokens"]),
                image_size=str(spec["image_size"]),
                video_duration_s=int(spec["video_duration_s"]),
                video_aspect_ratio=str(spec["video_aspect_ratio"]),
                video_resolution=str(spec["video_resolution"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"Catalog profile {name!r} is missing or has a bad {exc}.") from None
        for step, kind, names in (
            ("copy_models", "chat", profile.copy_models),
            ("image_models", "image", profile.image_models),
            ("video_models", "video", profile.video_models),
        ):
            if not names:
                raise ConfigError(f"Catalog profile {name!r} lists no {step}.")
            for model in names:
                if model not in models or models[model].kind != kind:
                    raise ConfigError(
                        f"Catalog profile {name!r} lists {model!r} in {step}, "
                        f"but the catalog has no {kind} model of that name."
                    )
            if kind == "video":
                for model in names:
                    cap = models[model].max_duration_s
                    if cap is not None and profile.video_duration_s > cap:
                        raise ConfigError(
                            f"Catalog profile {name!r} asks {profile.video_duration_s} s of video, "
                            f"but {model} makes at most {cap} s."
                        )
        profiles[name] = profile
    default, features = parse_features(raw.get("features"), source)
    return Catalog(models=models, profiles=profiles, features=features, default_feature=default)


def _feature_policy(name: str, spec: Any, base: FeaturePolicy, source: str) -> FeaturePolicy:
    if not isinstance(spec, dict):
        raise ConfigError(f"Catalog feature {name!r} in {source} must be an object with pii and injection policies.")
    unknown = sorted(set(spec) - {"pii", "injection", "injection_blocklist"})
    if unknown:
        raise ConfigError(
            f"Catalog feature {name!r} has an unknown setting {unknown[0]!r}; "
            "the settings are pii, injection and injection_blocklist."
        )
    pii = spec.get("pii", base.pii)
    if pii not in PII_POLICIES:
        raise ConfigError(f"Catalog feature {name!r} has pii policy {pii!r}; use mask or reject.")
    injection = spec.get("injection", base.injection)
    if injection not in INJECTION_POLICIES:
        raise ConfigError(f"Catalog feature {name!r} has injection policy {injection!r}; use flag or reject.")
    blocklist = spec.get("injection_blocklist", [])
    if not isinstance(blocklist, list) or not all(isinstance(p, str) and p.strip() for p in blocklist):
        raise ConfigError(f"Catalog feature {name!r} has an injection_blocklist that is not a list of phrases.")
    phrases = tuple(dict.fromkeys(base.injection_blocklist + tuple(" ".join(p.split()) for p in blocklist)))
    return FeaturePolicy(pii=pii, injection=injection, injection_blocklist=phrases)


def parse_features(raw: Any, source: str = "catalog") -> tuple[FeaturePolicy, dict[str, FeaturePolicy]]:
    """The ``features`` section: the default policy, and each listed feature's (default filled in)."""
    if raw is None:
        return FeaturePolicy(), {}
    if not isinstance(raw, dict):
        raise ConfigError(f"The catalog {source} has a 'features' section that is not an object.")
    default = _feature_policy(DEFAULT_FEATURE, raw.get(DEFAULT_FEATURE, {}), FeaturePolicy(), source)
    features = {
        name: _feature_policy(name, spec, default, source) for name, spec in raw.items() if name != DEFAULT_FEATURE
    }
    return default, features
