"""What a pipeline will cost before it runs: by step, on the profile's (or the request's) models,
at the catalog's rates in effect; through ``estimate_pipeline``, ``Genline.estimate`` and the real
``genline estimate`` command. The expected figures are the catalog's rates multiplied by hand."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from genline.config.catalog import BUILTIN_CATALOG, load_catalog, parse_catalog
from genline.config.errors import ValidationError
from genline.pipelines.api import Genline
from genline.pipelines.estimate import estimate_pipeline
from genline.pipelines.prompts import copy_messages
from genline.pipelines.runtime import Runtime
from genline.provider.simulator.media import approx_tokens
from tests.support.cli import invoke, one_error_line

CATALOG = load_catalog()
MUG = "Hand-thrown stoneware mug, speckled glaze, 350 ml."


def _prompt(description: str) -> int:
    """The copy step's prompt tokens as the estimate counts them (checked against the simulator's bill)."""
    (copy,) = (s for s in estimate_pipeline(CATALOG, "draft", description=description).steps if s.kind == "copy")
    prompt = int(copy.units) - 150  # draft: 150 completion tokens
    billed = approx_tokens("\n".join(m["content"] for m in copy_messages(description)))
    assert billed <= prompt <= billed + 10
    return prompt


def test_the_standard_profile_by_step_at_the_catalogs_rates() -> None:
    estimate = estimate_pipeline(CATALOG, "standard", description=MUG)
    prompt = _prompt(MUG)
    copy = (Decimal("0.15") * prompt + Decimal("0.60") * 300) / 1_000_000  # gpt-4o-mini, 300 tokens at most
    assert [(s.kind, s.model, s.units, s.unit, s.cost_usd) for s in estimate.steps] == [
        ("copy", "gpt-4o-mini", float(prompt + 300), "tokens", copy),
        ("image", "wan-2.7-image", 1.0, "images", Decimal("0.0216")),
        ("video", "minimax-hailuo-2.3", 6.0, "seconds", Decimal("0.150")),  # 6 s at $0.025
        ("store", "", 0.0, "", Decimal(0)),
    ]
    assert estimate.total_usd == copy + Decimal("0.0216") + Decimal("0.150")
    assert (estimate.profile, estimate.batch) == ("standard", False)


def test_premium_at_batch_rates_halves_the_media_and_keeps_the_chat_rate() -> None:
    estimate = estimate_pipeline(CATALOG, "premium", batch=True)
    prompt = _prompt("")
    copy = (Decimal("0.25") * prompt + Decimal("1.25") * 500) / 1_000_000  # claude-haiku: no batch rate
    by_kind = {s.kind: s for s in estimate.steps}
    assert by_kind["copy"].model == "claude-haiku" and by_kind["copy"].cost_usd == copy
    assert by_kind["image"].cost_usd == Decimal("0.0108")
    assert (by_kind["video"].model, by_kind["video"].cost_usd) == ("kling-v3-omni", Decimal("0.3360"))  # 10 s x 0.0336
    assert estimate.total_usd == copy + Decimal("0.0108") + Decimal("0.3360")
    assert estimate_pipeline(CATALOG, "premium").total_usd == copy + Decimal("0.0216") + Decimal("0.6720")


def test_the_models_a_request_names_are_the_ones_priced() -> None:
    estimate = estimate_pipeline(CATALOG, "standard", models={"video": "vidu-q3-pro", "copy": "claude-haiku"})
    by_kind = {s.kind: s for s in estimate.steps}
    assert (by_kind["video"].model, by_kind["video"].cost_usd) == ("vidu-q3-pro", Decimal("0.72"))  # 6 s x 0.12
    assert by_kind["copy"].model == "claude-haiku"
    with pytest.raises(ValidationError) as info:
        estimate_pipeline(CATALOG, "standard", models={"video": "gpt-4o-mini"})
    assert (info.value.code, info.value.field) == ("model_unknown", "video_model")
    assert estimate_pipeline(CATALOG, "premium", models={"video": "minimax-hailuo-2.3"}).steps[2].units == 10.0
    raw = json.loads(BUILTIN_CATALOG.read_text())
    raw["profiles"]["premium"].update(video_duration_s=12, video_models=["kling-v3-omni"])
    with pytest.raises(ValidationError) as info:  # hailuo makes at most 10 s
        estimate_pipeline(parse_catalog(raw), "premium", models={"video": "minimax-hailuo-2.3"})
    assert (info.value.code, info.value.field) == ("model_duration_exceeded", "video_model")


def test_an_unknown_profile_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        estimate_pipeline(CATALOG, "deluxe")
    assert (info.value.code, info.value.field) == ("profile_unknown", "profile")
    assert "draft, premium, standard" in info.value.message


def test_an_estimate_uses_the_rates_in_effect_at_its_time() -> None:
    raw = json.loads(BUILTIN_CATALOG.read_text())
    raw["models"]["minimax-hailuo-2.3"] = {
        "kind": "video",
        "max_duration_s": 10,
        "prices": [
            {"effective_from": "2026-01-01", "per_second_usd": 0.02},
            {"effective_from": "2026-06-01", "per_second_usd": 0.03},
        ],
    }
    catalog = parse_catalog(raw)
    may = estimate_pipeline(catalog, "draft", at=datetime(2026, 5, 31, 23, 0, tzinfo=UTC))
    june = estimate_pipeline(catalog, "draft", at=datetime(2026, 6, 1, tzinfo=UTC))
    assert may.steps[2].cost_usd == Decimal("0.08") and june.steps[2].cost_usd == Decimal("0.12")  # 4 s


def test_as_json_gives_money_as_text_with_six_decimals() -> None:
    document = estimate_pipeline(CATALOG, "draft", description=MUG).as_json()
    assert set(document) == {"profile", "batch", "estimated_cost_usd", "steps"}
    assert document["steps"][1] == {
        "kind": "image",
        "model": "wan-2.7-image",
        "units": 1.0,
        "unit": "images",
        "cost_usd": "0.021600",
    }
    total = Decimal(document["estimated_cost_usd"])
    assert len(document["estimated_cost_usd"].split(".")[1]) == 6
    assert abs(total - sum(Decimal(s["cost_usd"]) for s in document["steps"])) <= Decimal("0.000002")


def test_the_python_api_estimates_and_checks_the_features_entitlement(rt: Runtime) -> None:
    api = Genline(runtime=rt)
    assert api.estimate("premium", description=MUG) == estimate_pipeline(CATALOG, "premium", description=MUG)
    assert api.estimate("premium", feature="listing-video").total_usd > 0
    with pytest.raises(ValidationError) as info:
        api.estimate("premium", feature="some-feature")
    assert (info.value.code, info.value.field) == ("profile_not_allowed", "profile")
    with pytest.raises(ValidationError) as info:
        api.estimate("standard", feature="some-feature", models={"video": "kling-v3-omni"})
    assert (info.value.code, info.value.field) == ("models_not_allowed", "models")


# --- the real command ------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in list(os.environ):
        if name.startswith(("GENLINE_", "APIMART_")):
            monkeypatch.delenv(name)
    return {"GENLINE_VAR_DIR": str(tmp_path / "var")}


def test_genline_estimate_prints_a_table_by_step_and_the_total(env: dict[str, str], tmp_path: Path) -> None:
    result = invoke(["estimate", "--profile", "standard", "--description", MUG], env)
    assert result.exit_code == 0, result.output
    expected = estimate_pipeline(CATALOG, "standard", description=MUG)
    lines = result.stdout.splitlines()
    assert lines[0] == "Estimate for profile standard at normal rates:"
    assert lines[1].split() == ["step", "model", "units", "cost"]
    copy = expected.steps[0]
    cost = f"${copy.cost_usd.quantize(Decimal('0.000001'))}"
    assert lines[2].split() == ["copy", "gpt-4o-mini", str(int(copy.units)), "tokens", cost]
    assert lines[3].split() == ["image", "wan-2.7-image", "1", "image", "$0.021600"]
    assert lines[4].split() == ["video", "minimax-hailuo-2.3", "6", "seconds", "$0.150000"]
    assert lines[5].split() == ["store", "-", "-", "$0.000000"]
    assert lines[6].split() == ["total", f"${expected.total_usd.quantize(Decimal('0.000001'))}"]
    assert not (tmp_path / "var" / "genline.db").exists()  # an estimate needs and creates no state


def test_genline_estimate_json_is_the_estimates_document(env: dict[str, str]) -> None:
    result = invoke(["estimate", "--profile", "premium", "--batch", "--json", "--feature", "listing-video"], env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == estimate_pipeline(CATALOG, "premium", batch=True).as_json()


@pytest.mark.parametrize(
    ("args", "code", "field"),
    [
        (["--profile", "deluxe"], "profile_unknown", "profile"),
        (["--profile", "premium", "--feature", "some-feature"], "profile_not_allowed", "profile"),
        (["--profile", "standard", "--description", "x" * 2001], "description_too_long", "description"),
    ],
)
def test_genline_estimate_refuses_bad_input_with_one_line_and_exit_2(
    env: dict[str, str], args: list[str], code: str, field: str
) -> None:
    result = invoke(["estimate", *args], env)
    assert result.exit_code == 2 and result.stdout == ""
    match = one_error_line(result)
    assert (match["code"], match["field"]) == (code, field)
    as_json = invoke(["estimate", *args, "--json"], env)
    assert as_json.exit_code == 2
    assert json.loads(as_json.stdout)["error"]["code"] == code


def test_genline_estimate_help_says_what_it_counts(env: dict[str, str]) -> None:
    result = invoke(["estimate", "--help"], env)
    assert result.exit_code == 0
    for words in ("--profile", "--description", "--feature", "--batch", "--json", "choice model"):
        assert words in " ".join(result.stdout.split())
    assert "estimate" in invoke(["--help"], env).stdout
