"""A pipeline request, and its validation: the same for the Python API, the CLI and batch lines.

Every problem is a ``ValidationError`` with a stable code, the field to blame and one plain-English
sentence. Validation reads the input image (at most 10 MB) and checks its type by its bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from genline.config.catalog import Catalog
from genline.config.errors import ValidationError

MAX_DESCRIPTION_CHARS = 2000
MAX_IMAGE_BYTES = 10 * 1024 * 1024
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
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:+-]*$")


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

    def fingerprint(self) -> str:
        """Same request, same fingerprint: a reused idempotency key must come with the same request."""
        canonical = {
            "user_id": self.user_id,
            "feature": self.feature,
            "description": self.description,
            "image": self.image.sha256 or self.image.url,
            "profile": self.profile,
            "callback_url": self.callback_url,
            "priority": self.priority,
            "models": self.models,
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def sniff_image_type(head: bytes) -> str | None:
    """The image type by its first bytes, whatever the file is called."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _text(raw: dict[str, Any], name: str, *, required: bool = True, limit: int = 200) -> str | None:
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


def _http_url(value: str, name: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValidationError(
            f"{name} must be an http:// or https:// URL (got {value[:60]!r}).", code=f"{name}_not_http", field=name
        )
    return value


def load_image(ref: str) -> InputImage:
    """An image given as an http(s) URL, or as a local file checked by its bytes."""
    if "://" in ref:
        scheme = urlsplit(ref).scheme
        if scheme not in ("http", "https"):
            raise ValidationError(
                f"image must be a local file or an http(s) URL; {scheme}:// is not supported.",
                code="image_url_scheme",
                field="image",
            )
        return InputImage(url=_http_url(ref, "image"), data=None, content_type=None, sha256=None)
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ValidationError(f"image file {ref!r} does not exist.", code="image_not_found", field="image")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ValidationError(
            f"image file is {size / 1048576:.1f} MB; the most allowed is 10 MB.", code="image_too_large", field="image"
        )
    data = path.read_bytes()
    content_type = sniff_image_type(data[:16])
    if content_type is None:
        raise ValidationError(
            f"image file {path.name!r} is not a PNG, JPEG or WebP image (judged by its contents, not its name).",
            code="image_unsupported_type",
            field="image",
        )
    return InputImage(url=None, data=data, content_type=content_type, sha256=hashlib.sha256(data).hexdigest())


def validate_request(raw: Any, catalog: Catalog) -> PipelineRequest:
    """Check every field of a request given as a mapping (JSON object, CLI options, batch line)."""
    if not isinstance(raw, dict):
        raise ValidationError("A pipeline request must be a JSON object.", code="request_not_object")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ValidationError(
            f"{unknown[0]} is not a field of a pipeline request (known: {', '.join(FIELDS)}).",
            code="unknown_field",
            field=unknown[0],
        )
    user_id = _name(raw, "user_id", 128)
    feature = _name(raw, "feature", 64)
    description = _text(raw, "description", limit=MAX_DESCRIPTION_CHARS)
    idempotency_key = _name(raw, "idempotency_key", 200)
    profile_name = _text(raw, "profile", required=False, limit=64) or DEFAULT_PROFILE
    if profile_name not in catalog.profiles:
        raise ValidationError(
            f"profile {profile_name!r} is unknown; choose one of {', '.join(sorted(catalog.profiles))}.",
            code="profile_unknown",
            field="profile",
        )
    profile = catalog.profiles[profile_name]
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
    image_ref = _text(raw, "image", limit=4096)
    assert description is not None and image_ref is not None
    image = load_image(image_ref)
    return PipelineRequest(
        user_id=user_id,
        feature=feature,
        description=description,
        image=image,
        image_ref=image_ref,
        profile=profile_name,
        idempotency_key=idempotency_key,
        callback_url=_http_url(callback, "callback_url") if callback else None,
        priority=priority,
        models=models,
    )
