"""A pipeline request, and its validation: the same for the Python API, the CLI and batch lines.

Every problem is a ``ValidationError`` with a stable code, the field to blame and one plain-English
sentence. Text fields hold no control characters (a description may hold line breaks and tabs) and
no bidi overrides. The input image is an http(s) URL, bytes or a binary file object, or a local path
inside an upload folder (``GENLINE_UPLOAD_DIRS``); its bytes are decoded and re-encoded
(``pipelines/images.py``) before anything is kept or sent.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from genline.config.catalog import Catalog, FeaturePolicy
from genline.config.errors import ValidationError
from genline.pipelines.images import MAX_IMAGE_BYTES as MAX_IMAGE_BYTES
from genline.pipelines.images import read_bounded, read_upload, reencode
from genline.pipelines.images import sniff_image_type as sniff_image_type
from genline.pipelines.screening import screen_description
from genline.provider.safe_http import STRICT, AddressPolicy, UnsafeURL, check_url

MAX_DESCRIPTION_CHARS = 2000
DEFAULT_PROFILE = "standard"
PRIORITIES = ("interactive", "batch")
FIELDS = (
    "user_id",
    "feature",
    "description",
    "image",
    "profile",
    "idempotency_key",
    "callback_url",
    "priority",
    "copy_model",
    "image_model",
    "video_model",
    "no_cache",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:+-]*$")
# Bidi embeddings, overrides and isolates: text that reads otherwise than it is stored. The marks
# (U+200E, U+200F, U+061C) stay allowed: right-to-left text needs them.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINE_BREAKS = frozenset("\n\t")  # allowed in the description only
# What _check_characters refuses, as one character class searched in C: categories Cc (U+0000-001F,
# U+007F-009F) and Cs (U+D800-DFFF), which Unicode's stability policy fixes for good (a test checks
# them against unicodedata), and the bidi controls above. Checking a category per character in
# Python cost ~0.12 us a character: ~250 us for a 2,000-character description.
_REFUSED = r"\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069"
_REFUSED_CHAR = re.compile(rf"[\x00-\x0a{_REFUSED}]")
_REFUSED_CHAR_MULTILINE = re.compile(rf"[\x00-\x08{_REFUSED}]")  # tab (\x09) and line feed (\x0a) allowed
_FIELD_NAMES = frozenset(FIELDS)


@dataclass(frozen=True)
class InputImage:
    """The product photo: either a URL the provider fetches, or bytes we keep and hand over."""

    url: str | None
    data: bytes | None
    content_type: str | None
    sha256: str | None

    @property
    def extension(self) -> str:
        return {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(self.content_type or "", "bin")


@dataclass(frozen=True)
class PipelineRequest:
    user_id: str
    feature: str
    description: str
    image: InputImage
    image_ref: str
    profile: str
    idempotency_key: str
    callback_url: str | None
    priority: str
    models: dict[str, str]  # step kind -> model the caller asked for
    flags: dict[str, list[str]] | None = None  # what screening found: injection_suspected, pii_masked
    no_cache: bool = False  # a fresh copy answer, not the copy cache's
    batch_window: str | None = None  # "HH:MM-HH:MM" UTC: batch work runs only inside it (pipelines/windows.py)

    def fingerprint(self) -> str:
        """Same request, same fingerprint: a reused idempotency key must come with the same request."""
        canonical: dict[str, Any] = {
            "user_id": self.user_id,
            "feature": self.feature,
            "description": self.description,
            "image": self.image.sha256 or self.image.url,
            "profile": self.profile,
            "callback_url": self.callback_url,
            "priority": self.priority,
            "models": self.models,
        }
        if self.no_cache:  # only when asked, so fingerprints of earlier requests stay the same
            canonical["no_cache"] = True
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _check_characters(value: str, name: str, *, multiline: bool) -> None:
    """No control character (NUL, escape sequences, ...), lone surrogate or bidi override."""
    found = (_REFUSED_CHAR_MULTILINE if multiline else _REFUSED_CHAR).search(value)
    if found is None:
        return
    allowed = " (line breaks and tabs are allowed)" if multiline else ""
    raise ValidationError(
        f"{name} holds the control character U+{ord(found.group()):04X} at position {found.start() + 1}; "
        f"control characters and bidi overrides are not allowed{allowed}.",
        code=f"{name}_invalid_character",
        field=name,
    )


def _text(
    raw: dict[str, Any], name: str, *, required: bool = True, limit: int = 200, multiline: bool = False
) -> str | None:
    value = raw.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValidationError(f"{name} is required and must not be empty.", code=f"{name}_missing", field=name)
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be text.", code=f"{name}_invalid", field=name)
    value = value.strip()
    if len(value) > limit:
        raise ValidationError(
            f"{name} is {len(value)} characters long; the most allowed is {limit}.",
            code=f"{name}_too_long",
            field=name,
        )
    if multiline:
        value = value.replace("\r\n", "\n")
    _check_characters(value, name, multiline=multiline)
    return value


def _name(raw: dict[str, Any], name: str, limit: int) -> str:
    value = _text(raw, name, limit=limit)
    assert value is not None
    if not _NAME.match(value):
        raise ValidationError(
            f"{name} may hold only letters, digits and . _ @ : + - (got {value[:40]!r}).",
            code=f"{name}_invalid",
            field=name,
        )
    return value


_URL_CODES = {"scheme": "not_http", "credentials": "has_credentials", "malformed": "invalid_url"}


def _http_url(value: str, name: str, policy: AddressPolicy = STRICT) -> str:
    """An http(s) URL genline will POST to or hand to the provider: public addresses only, no
    userinfo (``provider/safe_http.py``; a name that does not resolve from here is accepted). The
    message never repeats the URL: it may carry credentials."""
    try:
        check_url(value, policy)
    except UnsafeURL as err:
        if err.reason == "scheme":
            raise ValidationError(
                f"{name} must be an http:// or https:// URL.", code=f"{name}_not_http", field=name
            ) from None
        code = f"{name}_{_URL_CODES.get(err.reason, 'not_public')}"
        raise ValidationError(f"{name} is refused: {err.message}", code=code, field=name) from None
    return value


def _clean_image(data: bytes) -> InputImage:
    clean = reencode(data)
    return InputImage(
        url=None, data=clean.data, content_type=clean.content_type, sha256=hashlib.sha256(clean.data).hexdigest()
    )


def image_from_bytes(value: Any) -> InputImage:
    """An image given as bytes or as a binary file object (the Python API's): decoded, re-encoded."""
    data = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else read_bounded(value)
    return _clean_image(data)


def load_image(ref: str, upload_dirs: Sequence[Path] = (), url_policy: AddressPolicy = STRICT) -> InputImage:
    """An image given as an http(s) URL, or as a local file inside an upload folder (checked by
    its bytes, then re-encoded)."""
    if "://" in ref:
        scheme = urlsplit(ref).scheme
        if scheme not in ("http", "https"):
            raise ValidationError(
                f"image must be a local file or an http(s) URL; {scheme}:// is not supported.",
                code="image_url_scheme",
                field="image",
            )
        return InputImage(url=_http_url(ref, "image", url_policy), data=None, content_type=None, sha256=None)
    return _clean_image(read_upload(ref, upload_dirs))


def validate_request(
    raw: Any, catalog: Catalog, *, upload_dirs: Sequence[Path] = (), url_policy: AddressPolicy = STRICT
) -> PipelineRequest:
    """Check every field of a request given as a mapping (JSON object, CLI options, batch line).
    A local image path is read only inside ``upload_dirs`` (the settings' ``upload_dirs``)."""
    if not isinstance(raw, dict):
        raise ValidationError("A pipeline request must be a JSON object.", code="request_not_object")
    unknown = sorted(set(raw) - _FIELD_NAMES)
    if unknown:
        raise ValidationError(
            f"{unknown[0]} is not a field of a pipeline request (known: {', '.join(FIELDS)}).",
            code="unknown_field",
            field=unknown[0],
        )
    user_id = _name(raw, "user_id", 128)
    feature = _name(raw, "feature", 64)
    description = _text(raw, "description", limit=MAX_DESCRIPTION_CHARS, multiline=True)
    # Personal data masked (or refused) and injection flagged (or refused) before anything else sees it.
    screened = screen_description(description or "", catalog.feature_policy(feature), feature=feature, user_id=user_id)
    idempotency_key = _name(raw, "idempotency_key", 200)
    profile_name = _text(raw, "profile", required=False, limit=64) or DEFAULT_PROFILE
    if profile_name not in catalog.profiles:
        raise ValidationError(
            f"profile {profile_name!r} is unknown; choose one of {', '.join(sorted(catalog.profiles))}.",
            code="profile_unknown",
            field="profile",
        )
    profile = catalog.profiles[profile_name]
    policy = catalog.feature_policy(feature)
    check_profile_allowed(feature, profile_name, policy)
    priority = _text(raw, "priority", required=False, limit=16) or "interactive"
    if priority not in PRIORITIES:
        raise ValidationError("priority must be interactive or batch.", code="priority_invalid", field="priority")
    callback = _text(raw, "callback_url", required=False, limit=2000)
    models: dict[str, str] = {}
    for step, kind in (("copy", "chat"), ("image", "image"), ("video", "video")):
        field = f"{step}_model"
        model = _text(raw, field, required=False, limit=64)
        if model is None:
            continue
        if model not in catalog.models or catalog.models[model].kind != kind:
            choices = sorted(m for m, p in catalog.models.items() if p.kind == kind)
            raise ValidationError(
                f"{field} {model!r} is not a known {kind} model; choose one of {', '.join(choices)}.",
                code="model_unknown",
                field=field,
            )
        cap = catalog.models[model].max_duration_s
        if kind == "video" and cap is not None and profile.video_duration_s > cap:
            raise ValidationError(
                f"{model} makes at most {cap} s of video; profile {profile_name} asks {profile.video_duration_s} s.",
                code="model_duration_exceeded",
                field=field,
            )
        models[step] = model
    check_models_allowed(feature, models, policy)
    no_cache = raw.get("no_cache", False)
    if not isinstance(no_cache, bool):
        raise ValidationError("no_cache must be true or false.", code="no_cache_invalid", field="no_cache")
    assert description is not None
    given = raw.get("image")
    if given is not None and not isinstance(given, str):
        if not isinstance(given, (bytes, bytearray, memoryview)) and not callable(getattr(given, "read", None)):
            raise ValidationError(
                "image must be an http(s) URL, a path in an upload folder, bytes or a binary file object.",
                code="image_invalid",
                field="image",
            )
        image = image_from_bytes(given)
        image_ref = f"inputs/{image.sha256}.{image.extension}"
    else:
        ref = _text(raw, "image", limit=4096)
        assert ref is not None
        image, image_ref = load_image(ref, upload_dirs, url_policy), ref
    return PipelineRequest(
        user_id=user_id,
        feature=feature,
        description=screened.text,
        image=image,
        image_ref=image_ref,
        profile=profile_name,
        idempotency_key=idempotency_key,
        callback_url=_http_url(callback, "callback_url", url_policy) if callback else None,
        priority=priority,
        models=models,
        flags=screened.flags or None,
        no_cache=no_cache,
    )


def check_profile_allowed(feature: str, profile: str, policy: FeaturePolicy) -> None:
    """The feature's entitlement (the catalog's ``features``): may it use this profile?"""
    if not policy.allows_profile(profile):
        allowed = ", ".join(policy.profiles or ())
        raise ValidationError(
            f"Feature {feature!r} may not use profile {profile!r}; it may use {allowed}.",
            code="profile_not_allowed",
            field="profile",
        )


def check_models_allowed(feature: str, models: Mapping[str, str], policy: FeaturePolicy) -> None:
    """The feature's entitlement: may its requests name their own models?"""
    if models and not policy.models:
        step = next(iter(models))
        raise ValidationError(
            f"Feature {feature!r} may not choose models ({step}_model was given); leave the models to the profile.",
            code="models_not_allowed",
            field="models",
        )
