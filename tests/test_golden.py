"""The prompt templates' golden set and cost gate (pipelines/golden.py, ``genline golden``).

The first test IS the CI gate: the shipped set, run against the shipped templates through the
gateway to the simulator on loopback, must hold every check and stay within +10 % of the committed
baseline (config/prompts/golden_baseline.json). The others test the gate itself: a deliberately
costlier template fails it on cost, naming the case and the figures; a template whose copy breaks a
check fails it naming the case; an edited-in-place template and a case without a baseline fail it;
``--update`` rewrites a baseline (a temporary copy, never the committed file).

A template under test is written to a temporary config folder (``prompts/copy.v2.txt`` beside
copies of the shipped ones) that ``pipelines.prompts`` reads instead of the package's, exactly as
a new version would be added to config/prompts/.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from genline.config.catalog import Catalog, load_catalog
from genline.config.settings import Settings
from genline.pipelines import golden, prompts
from genline.provider.simulator import SimulatorHandle
from tests.support.cli import invoke

SHIPPED_PROMPTS = golden.PROMPTS_DIR
PADDING = (
    "Style guide, read it carefully before you write anything. "
    "Keep the tone warm and concrete, name the material and the use, avoid superlatives you cannot prove, "
    "never promise results, and prefer short words to long ones. "
) * 20  # about 4,000 characters: some 1,000 more prompt tokens on every copy call


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture
def gateway(sim: SimulatorHandle, make_settings: Callable[..., Settings], catalog: Catalog) -> Iterator[Any]:
    gw = golden.gateway_for(make_settings(sim.base_url), catalog)
    yield gw
    gw.close()


@pytest.fixture
def run(gateway: Any, catalog: Catalog) -> Callable[..., golden.Result]:
    """The shipped set (or another), compared with the committed baseline (or another)."""

    def go(set_path: Path | None = None, baseline: golden.Baseline | None = None) -> golden.Result:
        return golden.run_golden(
            golden.load_set(catalog, set_path), gateway, catalog, baseline or golden.load_baseline()
        )

    return go


@pytest.fixture
def prompts_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A config folder whose prompts/ holds copies of the shipped templates, read in their place;
    a test adds its own version there and switches COPY_PROMPT to it."""
    root = tmp_path / "config"
    shutil.copytree(SHIPPED_PROMPTS, root / "prompts")
    monkeypatch.setattr(prompts, "files", lambda package: root)
    prompts.template.cache_clear()
    yield root / "prompts"
    prompts.template.cache_clear()


def new_copy_template(folder: Path, monkeypatch: pytest.MonkeyPatch, edit: Callable[[str], str]) -> None:
    """copy.v2.txt: the shipped copy.v1 changed by ``edit``, and the copy step switched to it."""
    v1 = (folder / "copy.v1.txt").read_text(encoding="utf-8")
    (folder / "copy.v2.txt").write_text(edit(v1), encoding="utf-8")
    monkeypatch.setattr(prompts, "COPY_PROMPT", "copy.v2")


def padded(template: str) -> str:
    """The system message with a long paragraph of instructions added at its end."""
    return template.replace("Write a headline and two sentences.", "Write a headline and two sentences.\n" + PADDING)


def failures(result: golden.Result, check: str) -> list[golden.Failure]:
    return [f for f in result.all_failures if f.check == check]


def explain(result: golden.Result) -> str:
    return "\n".join(f.message for f in result.all_failures) or "no failure"


# --- the gate CI runs ------------------------------------------------------------------------------
def test_the_shipped_set_passes_against_the_shipped_templates_and_the_committed_baseline(
    run: Callable[..., golden.Result], catalog: Catalog
) -> None:
    result = run()
    assert result.passed, (
        "The golden set fails against the shipped prompt templates:\n"
        + explain(result)
        + "\nFix the template, or if the change is meant, run `genline golden --update` and commit the "
        "baseline (docs/PROMPTS.md)."
    )
    shipped = golden.load_set(catalog)
    assert [c.case.name for c in result.cases] == [c.name for c in shipped.cases]
    assert len(result.cases) >= 8
    for c in result.cases:  # each case did reach the provider and was checked on a real answer
        assert c.output["text"] and c.output["prompt"] == prompts.COPY_PROMPT
        assert c.cost.copy_usd > 0 and c.cost.pipeline_usd > c.cost.copy_usd
        assert c.baseline is not None
    assert {c.case.profile for c in result.cases} == set(catalog.profiles)  # every profile is covered
    assert result.templates["copy"]["name"] == prompts.COPY_PROMPT


def test_the_committed_baseline_records_every_case_of_the_set_and_the_templates_in_use(catalog: Catalog) -> None:
    baseline = golden.load_baseline()
    assert set(baseline.cases) == {c.name for c in golden.load_set(catalog).cases}
    assert baseline.total == sum(baseline.cases.values(), golden.ZERO)
    assert baseline.templates == golden.templates()


# --- the gate itself: cost --------------------------------------------------------------------------
def test_a_costlier_template_fails_the_gate_on_cost_naming_each_case_and_its_figures(
    prompts_dir: Path, monkeypatch: pytest.MonkeyPatch, run: Callable[..., golden.Result]
) -> None:
    new_copy_template(prompts_dir, monkeypatch, padded)

    result = run()

    assert not result.passed
    assert {f.check for f in result.all_failures} == {"cost_rise"}, explain(result)  # the copy itself still passes
    by_case = {f.case: f.message for f in failures(result, "cost_rise") if f.case}
    assert set(by_case) == {c.case.name for c in result.cases}
    mug = next(c for c in result.cases if c.case.name == "mug")
    assert mug.baseline is not None
    message = by_case["mug"]
    assert message.startswith("case mug: the estimated copy step cost rose +")
    assert golden.usd(mug.baseline.copy_usd) in message and golden.usd(mug.cost.copy_usd) in message
    assert "more than the +10.0% allowed" in message
    (whole_set,) = [f for f in failures(result, "cost_rise") if f.case is None]
    assert whole_set.message.startswith("the golden set: the estimated copy step cost rose +")
    # The pipeline's total hardly moves (video dominates it): the copy step's own gate is what catches this.
    assert not any("pipeline cost" in f.message for f in result.all_failures)
    assert result.notes == ["The copy template is now copy.v2 (the baseline has copy.v1)."]


def test_a_new_template_version_within_ten_percent_passes_and_says_which_version_it_is(
    prompts_dir: Path, monkeypatch: pytest.MonkeyPatch, run: Callable[..., golden.Result]
) -> None:
    new_copy_template(
        prompts_dir, monkeypatch, lambda t: t.replace("two sentences.", "two sentences. Keep it friendly.")
    )

    result = run()

    assert result.passed, explain(result)
    assert any(c.cost.copy_usd > c.baseline.copy_usd for c in result.cases if c.baseline)  # it did cost a bit more
    assert "The copy template is now copy.v2 (the baseline has copy.v1)." in result.notes
    assert all(c.output["prompt"] == "copy.v2" for c in result.cases)


def test_a_pipeline_cost_rise_over_ten_percent_fails_the_gate_whatever_caused_it(
    run: Callable[..., golden.Result], catalog: Catalog
) -> None:
    """Not only templates: the gate compares estimates, so pipelines that cost 25% more than the
    baseline says (a dearer video model in the catalog, say) fail it too, until it is updated on purpose."""
    baseline = golden.load_baseline()
    cheaper = golden.Baseline(
        templates=baseline.templates,
        cases={name: golden.Cost(c.pipeline_usd * 8 / 10, c.copy_usd) for name, c in baseline.cases.items()},
        total=golden.Cost(baseline.total.pipeline_usd * 8 / 10, baseline.total.copy_usd),
        priced_at=baseline.priced_at,
    )

    result = run(baseline=cheaper)

    assert {f.check for f in result.all_failures} == {"cost_rise"}
    assert failures(result, "cost_rise")[0].message.startswith("case mug: the estimated pipeline cost rose +25.0%")


# --- the gate itself: checks on the output ------------------------------------------------------------
def test_a_template_whose_copy_carries_a_banned_phrase_fails_naming_the_case(
    prompts_dir: Path, monkeypatch: pytest.MonkeyPatch, run: Callable[..., golden.Result]
) -> None:
    # The simulator opens its copy with the first words of the user message: a template that puts a
    # boast there makes copy that boasts, as a real model told to would.
    new_copy_template(
        prompts_dir,
        monkeypatch,
        lambda t: t.replace("=== user ===\n", "=== user ===\nGuaranteed best in the world:\n"),
    )

    result = run()

    assert not result.passed
    banned = failures(result, "banned_phrase")
    assert {f.case for f in banned} == {c.case.name for c in result.cases}
    assert "case mug: the copy contains the banned phrase 'guaranteed'." in [f.message for f in banned]
    # Pushed out of the opening words, the product's name is missing from some copy too.
    missing = failures(result, "required_phrase")
    assert "case weekender-bag: the copy does not contain the required phrase 'leather weekender bag'." in [
        f.message for f in missing
    ]
    assert next(c for c in result.cases if c.case.name == "weekender-bag").passed is False


def test_copy_longer_than_a_case_allows_fails_naming_the_case_and_the_lengths(
    tmp_path: Path, run: Callable[..., golden.Result]
) -> None:
    spec = json.loads((SHIPPED_PROMPTS / "golden.json").read_text(encoding="utf-8"))
    spec["cases"][0]["max_chars"] = 100
    spec["cases"][1]["min_chars"] = 1000
    spec["cases"][1]["max_chars"] = 2000
    path = tmp_path / "golden.json"
    path.write_text(json.dumps(spec), encoding="utf-8")

    result = run(path)

    (too_long,) = failures(result, "max_chars")
    assert too_long.case == "mug"
    assert too_long.message == "case mug: the copy is 247 characters, over the maximum of 100."
    (too_short,) = failures(result, "min_chars")
    assert too_short.message == "case weekender-bag: the copy is 238 characters, under the minimum of 1000."


def test_check_output_names_a_missing_field_and_ignores_case_in_phrases() -> None:
    checks = golden.Checks(
        required_fields=("text", "headline", "model"),
        required_phrases=("Stoneware Mug",),
        banned_phrases=("[EMAIL]",),
        min_chars=10,
        max_chars=80,
    )
    case = golden.Case("mug", "standard", "Hand-thrown stoneware mug.", checks)
    output = {"text": "A stoneware mug for slow mornings. Write to [email].", "headline": "", "model": "gpt-4o-mini"}

    found = golden.check_output(case, output)

    assert [(f.check, f.message) for f in found] == [
        ("required_field", "case mug: the copy output has no headline."),
        ("banned_phrase", "case mug: the copy contains the banned phrase '[EMAIL]'."),
    ]


# --- the gate itself: versions and the baseline ---------------------------------------------------------
def test_a_template_edited_in_place_fails_and_asks_for_a_new_version(
    prompts_dir: Path, run: Callable[..., golden.Result]
) -> None:
    v1 = prompts_dir / "copy.v1.txt"
    v1.write_text(v1.read_text(encoding="utf-8").replace("two sentences.", "two short sentences."), encoding="utf-8")

    result = run()

    (edited,) = failures(result, "template_edited")
    assert edited.case is None
    assert "The copy template copy.v1 differs from the one the baseline recorded" in edited.message
    assert "new file (copy.v2.txt)" in edited.message


def test_a_comment_added_to_a_template_is_not_an_edit(prompts_dir: Path, run: Callable[..., golden.Result]) -> None:
    v1 = prompts_dir / "copy.v1.txt"
    v1.write_text("# reviewed by the copy team\n" + v1.read_text(encoding="utf-8"), encoding="utf-8")

    assert run().passed


def test_a_case_without_a_baseline_fails_until_the_baseline_is_updated(
    tmp_path: Path, run: Callable[..., golden.Result]
) -> None:
    spec = json.loads((SHIPPED_PROMPTS / "golden.json").read_text(encoding="utf-8"))
    spec["cases"].append({"name": "tea-towel", "profile": "draft", "description": "Linen tea towel, natural."})
    path = tmp_path / "golden.json"
    path.write_text(json.dumps(spec), encoding="utf-8")

    result = run(path)

    (missing,) = failures(result, "no_baseline")
    assert missing.message == "case tea-towel has no baseline: record one with genline golden --update."


# --- the command line -----------------------------------------------------------------------------------
@pytest.fixture
def no_stray_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user with no provider configured: `genline golden` starts its own simulator."""
    for name in list(os.environ):
        if name.startswith(("GENLINE_", "APIMART_")):
            monkeypatch.delenv(name)


@pytest.fixture
def committed_baseline() -> Iterator[bytes]:
    """The committed baseline, which no test may change."""
    before = golden.BASELINE_FILE.read_bytes()
    yield before
    assert golden.BASELINE_FILE.read_bytes() == before, "a test rewrote the committed baseline"


def test_cli_json_passes_on_the_shipped_templates_with_its_own_simulator(
    no_stray_settings: None, committed_baseline: bytes
) -> None:
    result = invoke(["golden", "--json"])

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["passed"] is True and doc["failures"] == [] and doc["updated"] is False
    assert doc["provider"].startswith("the embedded simulator at http://127.0.0.1:")
    assert len(doc["cases"]) == len(json.loads(committed_baseline)["cases"])
    assert doc["baseline_total"] == json.loads(committed_baseline)["total"]
    assert doc["cases"][0]["rise"] == {"pipeline": "+0.0%", "copy": "+0.0%"}


def test_cli_exits_1_on_a_costlier_template_and_names_the_case(
    no_stray_settings: None, committed_baseline: bytes, prompts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new_copy_template(prompts_dir, monkeypatch, padded)

    text = invoke(["golden"])
    as_json = invoke(["golden", "--json"])

    assert text.exit_code == 1, text.output
    assert "FAIL mug " in text.stdout
    assert "FAILED [cost_rise]: case mug: the estimated copy step cost rose +" in text.stdout
    assert text.stdout.rstrip().endswith("problem(s) above.")
    assert as_json.exit_code == 1
    doc = json.loads(as_json.stdout)
    assert doc["passed"] is False
    assert {f["case"] for f in doc["failures"]} >= {"mug", "olive-oil-premium", None}


def test_update_rewrites_the_baseline_and_says_what_changed_then_the_gate_passes(
    no_stray_settings: None,
    committed_baseline: bytes,
    prompts_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    target = tmp_path / "golden_baseline.json"
    target.write_bytes(committed_baseline)
    new_copy_template(prompts_dir, monkeypatch, padded)
    assert invoke(["golden", "--baseline", str(target)]).exit_code == 1

    updated = invoke(["golden", "--update", "--baseline", str(target)])

    assert updated.exit_code == 0, updated.output
    assert f"Rewrote the baseline {target}:" in updated.stdout
    assert "copy template: copy.v1 → copy.v2" in updated.stdout
    assert "case mug: $0.1718082 → $" in updated.stdout
    written = json.loads(target.read_text(encoding="utf-8"))
    assert written["templates"]["copy"]["name"] == "copy.v2"
    old = json.loads(committed_baseline)
    assert float(written["cases"]["mug"]["copy_usd"]) > 1.1 * float(old["cases"]["mug"]["copy_usd"])
    again = invoke(["golden", "--baseline", str(target)])
    assert again.exit_code == 0, again.output
    assert "Passed: every check held and the estimated cost is within 10% of the baseline." in again.stdout


def test_update_refuses_to_record_a_template_that_fails_a_check(
    no_stray_settings: None,
    committed_baseline: bytes,
    prompts_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    target = tmp_path / "golden_baseline.json"
    target.write_bytes(committed_baseline)
    new_copy_template(prompts_dir, monkeypatch, lambda t: t.replace("=== user ===\n", "=== user ===\nGuaranteed:\n"))

    result = invoke(["golden", "--update", "--json", "--baseline", str(target)])

    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["updated"] is False and doc["changes"] == []
    assert target.read_bytes() == committed_baseline


def test_cli_a_bad_golden_set_is_exit_2_with_one_error_line(no_stray_settings: None, tmp_path: Path) -> None:
    path = tmp_path / "golden.json"
    path.write_text(json.dumps({"cases": [{"name": "x", "profile": "deluxe", "description": "A lamp."}]}))

    result = invoke(["golden", "--set", str(path)])

    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error [invalid_config]: The golden set's case 'x' names the profile 'deluxe', which the catalog lacks."
    )
