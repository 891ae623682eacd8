"""Bad input gets one plain sentence, a stable code and the field to blame; nothing is created."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from genline.config.catalog import load_catalog
from genline.config.errors import IdempotencyConflict, ValidationError
from genline.pipelines.api import Genline
from genline.pipelines.dispatch import MemoryDispatcher
from genline.pipelines.request import validate_request
from genline.pipelines.runtime import Runtime
from genline.storage.models import Pipeline, Step

CATALOG = load_catalog()
RequestFn = Callable[..., dict[str, Any]]
UPLOADS: list[Path] = []  # this test's upload folder (request_fields' image lives there)


@pytest.fixture(autouse=True)
def uploads(upload_dir: Path) -> None:
    UPLOADS[:] = [upload_dir]


def _validate(fields: dict[str, Any]) -> Any:
    return validate_request(fields, CATALOG, upload_dirs=tuple(UPLOADS))


def _check(fields: dict[str, Any], code: str, field: str) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _validate(fields)
    assert (info.value.code, info.value.field) == (code, field)
    assert info.value.message.endswith(".") and "\n" not in info.value.message
    return info.value


def test_empty_description(request_fields: RequestFn) -> None:
    _check(request_fields(description="   "), "description_missing", "description")


def test_oversized_description(request_fields: RequestFn) -> None:
    err = _check(request_fields(description="x" * 2001), "description_too_long", "description")
    assert "2001" in err.message and "2000" in err.message


def test_image_that_is_not_an_image_by_its_bytes(request_fields: RequestFn, upload_dir: Path) -> None:
    fake = upload_dir / "photo.png"
    fake.write_bytes(b"GIF89a not really a png")
    _check(request_fields(image=str(fake)), "image_unsupported_type", "image")


def test_image_over_ten_megabytes(request_fields: RequestFn, upload_dir: Path) -> None:
    big = upload_dir / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024))
    _check(request_fields(image=str(big)), "image_too_large", "image")


def test_missing_image_file_in_the_upload_folder(request_fields: RequestFn, upload_dir: Path) -> None:
    _check(request_fields(image=str(upload_dir / "gone.jpg")), "image_not_found", "image")


def test_missing_image_file_outside_the_upload_folder_is_not_allowed(request_fields: RequestFn, tmp_path: Path) -> None:
    _check(request_fields(image=str(tmp_path / "gone.jpg")), "image_path_not_allowed", "image")


def test_image_field_absent(request_fields: RequestFn) -> None:
    fields = request_fields()
    del fields["image"]
    _check(fields, "image_missing", "image")


def test_image_url_that_is_not_http(request_fields: RequestFn) -> None:
    _check(request_fields(image="ftp://example.com/a.png"), "image_url_scheme", "image")


def test_jpeg_and_webp_are_accepted_by_their_bytes(request_fields: RequestFn, upload_dir: Path) -> None:
    from PIL import Image

    jpeg = upload_dir / "a.bin"
    Image.new("RGB", (24, 16), (200, 120, 40)).save(jpeg, "JPEG")
    webp = upload_dir / "b.jpg"
    Image.new("RGB", (24, 16), (40, 120, 200)).save(webp, "WEBP")
    assert _validate(request_fields(image=str(jpeg))).image.content_type == "image/jpeg"
    assert _validate(request_fields(image=str(webp))).image.content_type == "image/webp"


def test_http_image_url_is_accepted(request_fields: RequestFn) -> None:
    assert _validate(request_fields(image="https://cdn.example.com/mug.jpg")).image.url


def test_unknown_profile(request_fields: RequestFn) -> None:
    err = _check(request_fields(profile="cinematic"), "profile_unknown", "profile")
    assert "standard" in err.message


def test_unknown_model(request_fields: RequestFn) -> None:
    _check(request_fields(video_model="sora-99"), "model_unknown", "video_model")


def test_model_of_the_wrong_kind(request_fields: RequestFn) -> None:
    _check(request_fields(video_model="gpt-4o-mini"), "model_unknown", "video_model")


def test_misspelled_field_is_named(request_fields: RequestFn) -> None:
    _check(request_fields(descripton="typo"), "unknown_field", "descripton")


def test_callback_must_be_http(request_fields: RequestFn) -> None:
    _check(request_fields(callback_url="javascript:alert(1)"), "callback_url_not_http", "callback_url")


def test_missing_idempotency_key(request_fields: RequestFn) -> None:
    fields = request_fields()
    del fields["idempotency_key"]
    _check(fields, "idempotency_key_missing", "idempotency_key")


def _counts(rt: Runtime) -> tuple[int, int]:
    with rt.db.transaction() as s:
        return (
            s.scalar(select(func.count()).select_from(Pipeline)) or 0,
            s.scalar(select(func.count()).select_from(Step)) or 0,
        )


def _nudges(rt: Runtime) -> MemoryDispatcher:
    """The in-memory broker of drain mode (the ``rt`` fixture's): what was enqueued."""
    assert isinstance(rt.dispatcher, MemoryDispatcher)
    return rt.dispatcher


def test_bad_input_creates_and_enqueues_nothing(rt: Runtime, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    with pytest.raises(ValidationError):
        api.submit(request_fields(description=""))
    assert _counts(rt) == (0, 0)
    assert not _nudges(rt).sent


def test_same_key_same_pipeline_and_nothing_new(rt: Runtime, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    fields = request_fields(idempotency_key="order-1")
    first = api.submit(fields)
    again = api.submit(fields)
    assert first.created and not again.created and first.pipeline_id == again.pipeline_id
    assert _counts(rt) == (1, 4)
    assert len(_nudges(rt).sent) == 1


def test_same_key_for_a_different_request_is_refused(rt: Runtime, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    api.submit(request_fields(idempotency_key="order-2"))
    with pytest.raises(IdempotencyConflict) as info:
        api.submit(request_fields(idempotency_key="order-2", description="A different product."))
    assert info.value.code == "idempotency_conflict" and info.value.field == "idempotency_key"
    assert _counts(rt) == (1, 4)
