"""What a feature may ask for (the catalog's ``features``): which profiles, and whether a request may
name its own models; refused at the front door with a stable code and field, nothing created. And
the request's ``no_cache`` flag, which changes a request's fingerprint only when it is set."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from genline.config.catalog import BUILTIN_CATALOG, FeaturePolicy, load_catalog, parse_catalog
from genline.config.errors import ValidationError
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.request import validate_request
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline

RequestFn = Callable[..., dict[str, Any]]


def _pipelines(rt: Runtime) -> int:
    with rt.db.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(Pipeline)) or 0)


def _refused(rt: Runtime, fields: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Genline(runtime=rt).submit(fields)
    assert info.value.message.endswith(".") and "\n" not in info.value.message
    return info.value


def test_the_shipped_catalog_gives_unknown_features_draft_and_standard_and_no_model_choice() -> None:
    catalog = load_catalog()
    assert catalog.feature_policy("anything") == catalog.default_feature
    assert catalog.default_feature.profiles == ("draft", "standard") and not catalog.default_feature.models
    listing = catalog.feature_policy("listing-video")
    assert set(listing.profiles or ()) == {"draft", "standard", "premium"} and listing.models


@pytest.mark.parametrize("feature", ["default", "search-ads"])
def test_a_feature_without_premium_is_refused_premium_and_nothing_is_created(
    rt: Runtime, request_fields: RequestFn, feature: str
) -> None:
    err = _refused(rt, request_fields(feature=feature, profile="premium"))
    assert (err.code, err.field) == ("profile_not_allowed", "profile")
    assert f"Feature {feature!r} may not use profile 'premium'" in err.message and "draft, standard" in err.message
    assert _pipelines(rt) == 0


def test_a_feature_without_model_choice_is_refused_a_named_model(rt: Runtime, request_fields: RequestFn) -> None:
    err = _refused(rt, request_fields(feature="search-ads", video_model="kling-v3-omni"))
    assert (err.code, err.field) == ("models_not_allowed", "models")
    assert "Feature 'search-ads' may not choose models" in err.message and "video_model" in err.message
    assert _pipelines(rt) == 0


def test_a_feature_entitled_to_them_gets_premium_and_its_models(rt: Runtime, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    assert api.submit(request_fields(profile="premium", video_model="vidu-q3-pro")).created
    assert api.submit(request_fields(feature="search-ads", profile="draft")).created
    with rt.db.transaction() as s:
        rows = s.execute(select(Pipeline.feature, Pipeline.profile, Pipeline.models).order_by(Pipeline.created_at))
        assert sorted(tuple(r) for r in rows) == sorted(
            [("listing-video", "premium", {"video": "vidu-q3-pro"}), ("search-ads", "draft", {})]
        )


@pytest.fixture
def custom_rt(tmp_path: Path, sim: SimulatorHandle, make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    """A catalog whose default allows only draft, and whose feature 'studio' names models but
    inherits the default's profiles."""
    raw = json.loads(BUILTIN_CATALOG.read_text())
    raw["features"] = {"default": {"profiles": ["draft"]}, "studio": {"models": True}}
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(raw))
    settings = make_settings(sim.base_url, GENLINE_CATALOG_FILE=str(path))
    upgrade(settings.database_url)
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.close()


def test_a_listed_feature_inherits_the_defaults_profiles(custom_rt: Runtime, request_fields: RequestFn) -> None:
    err = _refused(custom_rt, request_fields(feature="studio", profile="standard", copy_model="claude-haiku"))
    assert (err.code, err.field) == ("profile_not_allowed", "profile")
    assert "it may use draft." in err.message
    accepted = Genline(runtime=custom_rt).submit(
        request_fields(feature="studio", profile="draft", copy_model="claude-haiku")
    )
    assert accepted.created


def test_without_a_features_section_every_profile_is_allowed_and_no_model_choice() -> None:
    raw = json.loads(BUILTIN_CATALOG.read_text())
    del raw["features"]
    catalog = parse_catalog(raw)
    assert catalog.feature_policy("listing-video") == FeaturePolicy()
    assert all(catalog.feature_policy("x").allows_profile(p) for p in catalog.profiles)


# --- no_cache --------------------------------------------------------------------------------------
def test_no_cache_is_a_boolean_and_changes_the_fingerprint_only_when_set(
    request_fields: RequestFn, upload_dir: Path
) -> None:
    catalog = load_catalog()
    fields = request_fields(idempotency_key="k-1")
    plain = validate_request(fields, catalog, upload_dirs=(upload_dir,))
    off = validate_request({**fields, "no_cache": False}, catalog, upload_dirs=(upload_dir,))
    on = validate_request({**fields, "no_cache": True}, catalog, upload_dirs=(upload_dir,))
    assert (plain.no_cache, off.no_cache, on.no_cache) == (False, False, True)
    assert plain.fingerprint() == off.fingerprint() != on.fingerprint()
    before = {  # the fingerprint's fields before no_cache existed: an earlier request's hash still matches
        "user_id": "seller-1",
        "feature": "listing-video",
        "description": fields["description"],
        "image": plain.image.sha256,
        "profile": "standard",
        "callback_url": None,
        "priority": "interactive",
        "models": {},
    }
    assert plain.fingerprint() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    for value in ("yes", 1):
        with pytest.raises(ValidationError) as info:
            validate_request({**fields, "no_cache": value}, catalog, upload_dirs=(upload_dir,))
        assert (info.value.code, info.value.field) == ("no_cache_invalid", "no_cache")
