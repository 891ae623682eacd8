"""The price catalog and pipeline profiles: which models a profile uses, and what each costs.

Prices live in JSON (``config/catalog.json`` unless GENLINE_CATALOG_FILE names another), never in
code. A profile names, for each step, an ordered list of models; the first is preferred.

Prices. A model's rates are either given on the model itself (the flat form: one set of rates in
effect from the beginning of time) or as a dated list, or both (the flat rates are then the entry
before the first date)::

    "kling-v3-omni": {"kind": "video", "max_duration_s": 15, "per_second_usd": 0.0672,
                      "prices": [{"effective_from": "2026-12-01", "per_second_usd": 0.0672,
                                  "batch_per_second_usd": 0.0336}]}

Each entry is a full set of rates: a chat model needs ``input_per_million_usd`` and
``output_per_million_usd``, an image model ``per_image_usd``, a video model ``per_second_usd``; each
may add its ``batch_`` form (``batch_input_per_million_usd``, ...), the rate of overnight batch work
(without one, batch work costs the normal rate). ``effective_from`` is an ISO date (UTC midnight).
A call is priced by the newest entry whose date is not after the call's time, so a price change never
reprices what was recorded before it; a call older than every entry of a model without flat rates
gets the first entry.

Caps (enforced by ``pipelines/spend.py``; the shipped catalog has none, caps are the operator's)::

    "caps": [{"scope": "global", "period": "day", "limit_usd": 50},
             {"scope": "user", "match": "*", "period": "day", "limit_usd": 5},
             {"scope": "feature", "match": "listing-video", "period": "month", "limit_usd": 100}]

``scope`` is ``global``, ``user`` or ``feature``; ``match`` is ``"*"`` (every user or feature, each
with its own ledger; the default) or one user id or feature name (a global cap's match is ``"*"``);
``period`` is ``day`` or ``month`` (UTC); ``limit_usd`` is a number above zero.

The ``features`` section holds each feature's policy for what sellers write (``pipelines/screening.py``):
``pii`` is ``mask`` (personal data replaced by typed placeholders before anything is stored, logged or
sent) or ``reject``; ``injection`` is ``flag`` (recorded on the pipeline, logged, let through as quoted
data) or ``reject``; ``injection_blocklist`` adds phrases to the built-in heuristics. It also holds
what a feature is entitled to: ``profiles``, the profiles its requests may use (default: all of the
catalog's), and ``models`` (true or false, default false), whether a request may name its own models.
Retention (``pipelines/retention.py``): ``outputs_days``, how many days after a pipeline ended its
stored video and image are kept, and ``audit_days``, how many days audit rows (``provider_calls``) are
kept before they are rolled up into daily totals and deleted; each a whole number above zero, absent
(the default) keeps them forever.
Its ``default`` entry applies to every feature not listed, and fills what a listed feature leaves out
(blocklists add up). Without a ``features`` section every feature gets ``pii: mask``,
``injection: flag``, every profile and no model choice.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from genline.config.clock import utcnow
from genline.config.errors import ConfigError

BUILTIN_CATALOG = Path(__file__).with_name("catalog.json")
_KINDS = {"chat", "image", "video"}
PII_POLICIES = ("mask", "reject")
INJECTION_POLICIES = ("flag", "reject")
DEFAULT_FEATURE = "default"
CAP_SCOPES = ("global", "user", "feature")
CAP_PERIODS = ("day", "month")
_CAP_KEYS = ("scope", "match", "period", "limit_usd")
_FEATURE_KEYS = ("pii", "injection", "injection_blocklist", "profiles", "models", "outputs_days", "audit_days")
# The rates each kind of model is priced by; each also has a ``batch_`` form.
RATES = {
    "chat": ("input_per_million_usd", "output_per_million_usd"),
    "image": ("per_image_usd",),
    "video": ("per_second_usd",),
}
_ALL_RATES = {rate for rates in RATES.values() for rate in rates}
_ALL_RATES |= {f"batch_{rate}" for rate in _ALL_RATES}


@dataclass(frozen=True)
class ModelPrice:
    """The rates of one model in effect at some time (``Catalog.model(name, at)``)."""

    name: str
    kind: str  # chat | image | video
    input_per_million_usd: Decimal = Decimal(0)
    output_per_million_usd: Decimal = Decimal(0)
    per_image_usd: Decimal = Decimal(0)
    per_second_usd: Decimal = Decimal(0)
    max_duration_s: int | None = None
    # Overnight batch rates; None: batch work costs the normal rate.
    batch_input_per_million_usd: Decimal | None = None
    batch_output_per_million_usd: Decimal | None = None
    batch_per_image_usd: Decimal | None = None
    batch_per_second_usd: Decimal | None = None
    effective_from: date | None = None  # None: from the beginning of time

    def chat_cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> Decimal:
        rate_in, rate_out = self.input_per_million_usd, self.output_per_million_usd
        if batch:
            rate_in = _or(self.batch_input_per_million_usd, rate_in)
            rate_out = _or(self.batch_output_per_million_usd, rate_out)
        return (rate_in * prompt_tokens + rate_out * completion_tokens) / Decimal(1_000_000)

    def media_cost(self, units: float, batch: bool = False) -> Decimal:
        """Images for an image model, seconds for a video model."""
        if self.kind == "image":
            rate = _or(self.batch_per_image_usd, self.per_image_usd) if batch else self.per_image_usd
        else:
            rate = _or(self.batch_per_second_usd, self.per_second_usd) if batch else self.per_second_usd
        return rate * Decimal(str(units))


def _or(value: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if value is None else value


@dataclass(frozen=True)
class CatalogModel:
    """A model and its price history: ``prices`` oldest first (the undated entry, if any, first)."""

    name: str
    kind: str  # chat | image | video
    max_duration_s: int | None
    prices: tuple[ModelPrice, ...]

    def price_at(self, at: datetime) -> ModelPrice:
        """The newest entry whose effective_from is not after ``at`` (the first if all are)."""
        day = (at if at.tzinfo is None else at.astimezone(UTC)).date()
        chosen = self.prices[0]
        for price in self.prices[1:]:
            assert price.effective_from is not None  # only the first entry may be undated
            if price.effective_from <= day:
                chosen = price
        return chosen


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
    """What a feature does with personal data and suspected prompt injection in a description, and
    what it is entitled to: which profiles (None: all), and whether a request may name models."""

    pii: str = "mask"  # mask | reject
    injection: str = "flag"  # flag | reject
    injection_blocklist: tuple[str, ...] = ()
    profiles: tuple[str, ...] | None = None  # None: every profile of the catalog
    models: bool = False  # may a request name its own models
    outputs_days: int | None = None  # days an ended pipeline's stored outputs are kept; None: forever
    audit_days: int | None = None  # days audit rows are kept (then rolled up into totals); None: forever

    def allows_profile(self, profile: str) -> bool:
        return self.profiles is None or profile in self.profiles


@dataclass(frozen=True)
class Cap:
    """A spending cap: at most ``limit_usd`` per ``period`` for each subject of its ``scope``."""

    scope: str  # global | user | feature
    match: str  # "*" or one user id / feature name
    period: str  # day | month
    limit_usd: Decimal

    def applies(self, user_id: str, feature: str) -> bool:
        """Whether work for this user and feature counts against this cap."""
        if self.scope == "global" or self.match == "*":
            return True
        return self.match == (user_id if self.scope == "user" else feature)

    def subject(self, user_id: str, feature: str) -> str:
        """Whose ledger the work goes on: ``*`` for a global cap, else the user id or the feature."""
        if self.scope == "global":
            return "*"
        return user_id if self.scope == "user" else feature

    def describe(self) -> str:
        """The cap in plain English, e.g. "the daily cap of $5.00 per user"."""
        period = "daily" if self.period == "day" else "monthly"
        amount = usd(self.limit_usd)
        if self.scope == "global":
            return f"the global {period} cap of {amount}"
        if self.match == "*":
            return f"the {period} cap of {amount} per {self.scope}"
        return f"the {period} cap of {amount} for {self.scope} {self.match!r}"


def usd(amount: Decimal) -> str:
    """``$5.00``, ``$1,250.00``; more decimals only where the amount has them (``$0.125``)."""
    if amount == amount.quantize(Decimal("0.01")):
        return f"${amount:,.2f}"
    return f"${amount.normalize():,f}"


@dataclass(frozen=True)
class Catalog:
    models: dict[str, CatalogModel]
    profiles: dict[str, Profile]
    features: dict[str, FeaturePolicy] = field(default_factory=dict)
    default_feature: FeaturePolicy = field(default_factory=FeaturePolicy)
    caps: tuple[Cap, ...] = ()

    def feature_policy(self, feature: str) -> FeaturePolicy:
        """The feature's policy; a feature the catalog does not list gets the default."""
        return self.features.get(feature, self.default_feature)

    def model(self, name: str, at: datetime | None = None) -> ModelPrice:
        """The model's rates in effect at ``at`` (default: now)."""
        try:
            entry = self.models[name]
        except KeyError:
            raise ConfigError(f"Model {name!r} is not in the price catalog.") from None
        return entry.price_at(at or utcnow())


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
    unknown = sorted(set(raw) - {"models", "profiles", "features", "caps"})
    if unknown:
        raise ConfigError(
            f"The catalog {source} has an unknown section {unknown[0]!r}; "
            "the sections are models, profiles, features and caps."
        )
    models = {name: _parse_model(name, spec) for name, spec in raw["models"].items()}
    profiles = {name: _parse_profile(name, spec, models) for name, spec in raw["profiles"].items()}
    default, features = parse_features(raw.get("features"), source, profiles=profiles)
    caps = parse_caps(raw.get("caps"), source)
    return Catalog(models=models, profiles=profiles, features=features, default_feature=default, caps=caps)


# --- models and their prices -----------------------------------------------------------------------
def _rate(name: str, key: str, value: Any, where: str) -> Decimal:
    """One rate: a finite number, zero or above."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"Catalog model {name!r} has {key} {value!r}{where}, which is not a number.")
    try:
        rate = Decimal(str(value).strip())
    except InvalidOperation:
        raise ConfigError(f"Catalog model {name!r} has {key} {value!r}{where}, which is not a number.") from None
    if not rate.is_finite():
        raise ConfigError(f"Catalog model {name!r} has {key} {value!r}{where}, which is not a number.")
    if rate < 0:
        raise ConfigError(f"Catalog model {name!r} has a negative {key} ({value}){where}; a price is 0 or more.")
    return rate


def _price(
    name: str, kind: str, spec: dict[str, Any], effective: date | None, where: str, cap: int | None
) -> ModelPrice:
    """One set of rates; ``spec`` holds only rate keys (checked by the caller)."""
    for key in spec:
        base = key.removeprefix("batch_")
        if base not in RATES[kind]:
            article = "an" if kind == "image" else "a"
            raise ConfigError(
                f"Catalog model {name!r} is {article} {kind} model, so {key}{where} does not apply; "
                f"its rates are {' and '.join(RATES[kind])} (and their batch_ forms)."
            )
    for key in RATES[kind]:
        if key not in spec:
            raise ConfigError(f"Catalog model {name!r} has no {key}{where}; a {kind} model needs one.")
    rates = {key: _rate(name, key, value, where) for key, value in spec.items()}
    return ModelPrice(name=name, kind=kind, max_duration_s=cap, effective_from=effective, **rates)


def _effective_from(name: str, value: Any, number: int) -> date:
    if not isinstance(value, str):
        raise ConfigError(f'Catalog model {name!r} price {number} needs an effective_from date such as "2026-01-01".')
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(
            f"Catalog model {name!r} price {number} has effective_from {value!r}, "
            "which is not an ISO date (YYYY-MM-DD)."
        ) from None


def _parse_model(name: str, spec: Any) -> CatalogModel:
    if not isinstance(spec, dict) or spec.get("kind") not in _KINDS:
        raise ConfigError(f"Catalog model {name!r} needs a kind of chat, image or video.")
    kind: str = spec["kind"]
    unknown = sorted(set(spec) - {"kind", "max_duration_s", "prices"} - _ALL_RATES)
    if unknown:
        raise ConfigError(
            f"Catalog model {name!r} has an unknown setting {unknown[0]!r}; the settings are kind, "
            f"max_duration_s, prices and the rates {', '.join(RATES[kind])} (and their batch_ forms)."
        )
    cap = spec.get("max_duration_s")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(
            f"Catalog model {name!r} has max_duration_s {cap!r}; it must be a whole number of seconds above zero."
        )
    flat = {key: value for key, value in spec.items() if key in _ALL_RATES}
    prices: list[ModelPrice] = [_price(name, kind, flat, None, "", cap)] if flat else []
    dated = spec.get("prices")
    if dated is None and not flat:
        raise ConfigError(f"Catalog model {name!r} has no price: give its rates, or a 'prices' list of dated rates.")
    if dated is not None:
        if not isinstance(dated, list) or not dated:
            raise ConfigError(f"Catalog model {name!r} has 'prices' that is not a non-empty list of dated rates.")
        seen: dict[date, int] = {}
        entries: list[ModelPrice] = []
        for number, entry in enumerate(dated, start=1):
            if not isinstance(entry, dict):
                raise ConfigError(f"Catalog model {name!r} price {number} is not an object.")
            bad = sorted(set(entry) - {"effective_from"} - _ALL_RATES)
            if bad:
                raise ConfigError(
                    f"Catalog model {name!r} price {number} has an unknown setting {bad[0]!r}; an entry holds "
                    f"effective_from and the rates {', '.join(RATES[kind])} (and their batch_ forms)."
                )
            effective = _effective_from(name, entry.get("effective_from"), number)
            if effective in seen:
                raise ConfigError(
                    f"Catalog model {name!r} prices {seen[effective]} and {number} are both effective from "
                    f"{effective.isoformat()}; keep one entry a date."
                )
            seen[effective] = number
            rates = {key: value for key, value in entry.items() if key != "effective_from"}
            entries.append(_price(name, kind, rates, effective, f" (price {number})", cap))
        prices.extend(sorted(entries, key=lambda p: p.effective_from or date.min))
    return CatalogModel(name=name, kind=kind, max_duration_s=cap, prices=tuple(prices))


# --- profiles --------------------------------------------------------------------------------------
def _parse_profile(name: str, spec: Any, models: dict[str, CatalogModel]) -> Profile:
    if not isinstance(spec, dict):
        raise ConfigError(f"Catalog profile {name!r} is not an object.")
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
    for key, value in (("copy_max_tokens", profile.copy_max_tokens), ("video_duration_s", profile.video_duration_s)):
        if value < 1:
            raise ConfigError(f"Catalog profile {name!r} has {key} {value}; it must be above zero.")
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
    return profile


# --- features --------------------------------------------------------------------------------------
def _feature_policy(
    name: str, spec: Any, base: FeaturePolicy, source: str, profiles: Collection[str] | None
) -> FeaturePolicy:
    if not isinstance(spec, dict):
        raise ConfigError(f"Catalog feature {name!r} in {source} must be an object with pii and injection policies.")
    unknown = sorted(set(spec) - set(_FEATURE_KEYS))
    if unknown:
        raise ConfigError(
            f"Catalog feature {name!r} has an unknown setting {unknown[0]!r}; "
            "the settings are pii, injection, injection_blocklist, profiles, models, outputs_days and audit_days."
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
    allowed = base.profiles
    if "profiles" in spec:
        listed = spec["profiles"]
        if not isinstance(listed, list) or not listed or not all(isinstance(p, str) for p in listed):
            raise ConfigError(f"Catalog feature {name!r} has profiles that are not a non-empty list of profile names.")
        for profile in listed:
            if profiles is not None and profile not in profiles:
                raise ConfigError(
                    f"Catalog feature {name!r} allows profile {profile!r}, which the catalog does not have "
                    f"(it has {', '.join(sorted(profiles))})."
                )
        allowed = tuple(dict.fromkeys(listed))
    models = spec.get("models", base.models)
    if not isinstance(models, bool):
        raise ConfigError(f"Catalog feature {name!r} has models {models!r}; use true or false.")
    days = {key: _days(name, key, spec.get(key, getattr(base, key))) for key in ("outputs_days", "audit_days")}
    return FeaturePolicy(
        pii=pii, injection=injection, injection_blocklist=phrases, profiles=allowed, models=models, **days
    )


def _days(name: str, key: str, value: Any) -> int | None:
    """A retention period: a whole number of days above zero, or None (keep forever)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(
            f"Catalog feature {name!r} has {key} {value!r}; it must be a whole number of days above zero, "
            "or left out to keep forever."
        )
    return value


def parse_features(
    raw: Any, source: str = "catalog", *, profiles: Collection[str] | None = None
) -> tuple[FeaturePolicy, dict[str, FeaturePolicy]]:
    """The ``features`` section: the default policy, and each listed feature's (default filled in).
    ``profiles``: the catalog's profile names, which a feature's ``profiles`` must be among."""
    if raw is None:
        return FeaturePolicy(), {}
    if not isinstance(raw, dict):
        raise ConfigError(f"The catalog {source} has a 'features' section that is not an object.")
    default = _feature_policy(DEFAULT_FEATURE, raw.get(DEFAULT_FEATURE, {}), FeaturePolicy(), source, profiles)
    features = {
        name: _feature_policy(name, spec, default, source, profiles)
        for name, spec in raw.items()
        if name != DEFAULT_FEATURE
    }
    return default, features


# --- caps ------------------------------------------------------------------------------------------
def _cap(number: int, spec: Any) -> Cap:
    if not isinstance(spec, dict):
        raise ConfigError(f"Catalog cap {number} is not an object with scope, match, period and limit_usd.")
    unknown = sorted(set(spec) - set(_CAP_KEYS))
    if unknown:
        raise ConfigError(
            f"Catalog cap {number} has an unknown setting {unknown[0]!r}; "
            "the settings are scope, match, period and limit_usd."
        )
    scope = spec.get("scope")
    if scope not in CAP_SCOPES:
        raise ConfigError(f"Catalog cap {number} has scope {scope!r}; use global, user or feature.")
    match = spec.get("match", "*")
    if not isinstance(match, str) or not match.strip() or match != match.strip():
        raise ConfigError(f'Catalog cap {number} has match {match!r}; use "*" or one {scope} name.')
    if scope == "global" and match != "*":
        raise ConfigError(f'Catalog cap {number} is global, so its match must be "*" (it is {match!r}).')
    period = spec.get("period")
    if period not in CAP_PERIODS:
        raise ConfigError(f"Catalog cap {number} has period {period!r}; use day or month.")
    value = spec.get("limit_usd")
    limit: Decimal | None = None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            limit = Decimal(str(value).strip())
        except InvalidOperation:
            limit = None
    if limit is None or not limit.is_finite() or limit <= 0:
        raise ConfigError(f"Catalog cap {number} has limit_usd {value!r}; it must be a number of dollars above zero.")
    return Cap(scope=scope, match=match, period=period, limit_usd=limit)


def _capped(cap: Cap) -> str:
    if cap.scope == "global":
        return "all spending"
    return f"each {cap.scope}" if cap.match == "*" else f"{cap.scope} {cap.match!r}"


def parse_caps(raw: Any, source: str = "catalog") -> tuple[Cap, ...]:
    """The ``caps`` list (absent or empty: no caps). Two caps on one scope, match and period are refused."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"The catalog {source} has a 'caps' section that is not a list.")
    caps: list[Cap] = []
    for number, spec in enumerate(raw, start=1):
        cap = _cap(number, spec)
        for other, earlier in enumerate(caps, start=1):
            if (earlier.scope, earlier.match, earlier.period) == (cap.scope, cap.match, cap.period):
                raise ConfigError(
                    f"Catalog caps {other} and {number} both cap {_capped(cap)} by the {cap.period}; keep one."
                )
        caps.append(cap)
    return tuple(caps)
