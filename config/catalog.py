"""The price catalog and pipeline profiles: which models a profile uses, and what each costs.

Prices live in JSON (``config/catalog.json`` unless GENLINE_CATALOG_FILE names another), never in
code. A profile names, for each step, an ordered list of models; the first is preferred.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from genline.config.errors import ConfigError

BUILTIN_CATALOG = Path(__file__).with_name("catalog.json")
_KINDS = {"chat", "image", "video"}


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
class Catalog:
    models: dict[str, ModelPrice]
    profiles: dict[str, Profile]

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
    return Catalog(models=models, profiles=profiles)
