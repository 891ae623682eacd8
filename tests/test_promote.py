"""Promoting a draft: a finished low-cost pipeline rendered again on a premium profile, paying only
for the new video (``pipelines/promote.py``). In drain mode on SQLite with the simulator over real
HTTP: what the provider is asked for is counted by the simulator itself."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import delete, select

from genline.config.catalog import BUILTIN_CATALOG
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.runtime import Runtime
from genline.pipelines.spend import cap_report
from genline.provider.simulator import SimulatorHandle
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, Step, StoredObject
from genline.workers.drain import drain
from tests.conftest import TEST_KEY
from tests.support.cli import ERROR_LINE, invoke
from tests.support.drive import output_of, sim_stats
from tests.support.refusal import leaves_nothing, refused

RequestFn = Callable[..., dict[str, Any]]
PREMIUM_VIDEO = Decimal("0.0672") * 10  # kling-v3-omni, the premium profile's first video model, 10 s


def run_draft(rt: Runtime, request_fields: RequestFn, **changes: Any) -> dict[str, Any]:
    api = Genline(runtime=rt)
    accepted = api.submit(request_fields(profile="draft", **changes))
    drain(rt)
    status = api.status(accepted.pipeline_id)
    assert status["status"] == "succeeded", status
    return status


def stored_files(rt: Runtime) -> set[str]:
    """Every object the local store holds (its metadata sidecars left out)."""
    root = Path(rt.store.root)  # type: ignore[attr-defined]  # the local store of the rt fixture
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".meta.json")}


def pipeline_row(rt: Runtime, pipeline_id: str) -> Pipeline:
    with rt.db.transaction() as s:
        return s.get_one(Pipeline, pipeline_id)


def stored_rows(rt: Runtime, pipeline_id: str) -> list[StoredObject]:
    with rt.db.transaction() as s:
        return list(s.scalars(select(StoredObject).where(StoredObject.pipeline_id == pipeline_id)))


# --- the promotion ---------------------------------------------------------------------------------
def test_a_promoted_draft_renders_one_premium_video_and_reuses_the_copy_and_image(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    draft = run_draft(rt, request_fields)
    before = sim_stats(sim)

    accepted = api.promote(draft["id"], "premium")
    assert accepted.created and accepted.pipeline_id != draft["id"]
    assert accepted.estimated_cost_usd == PREMIUM_VIDEO
    drain(rt)
    promoted = api.status(accepted.pipeline_id)
    after = sim_stats(sim)

    assert promoted["status"] == "succeeded", promoted
    assert promoted["profile"] == "premium"
    # The provider saw one more video job and nothing else: no chat call, no image job.
    assert after["chat_calls"] == before["chat_calls"]
    new_keys = sorted(set(after["submit_calls"]) - set(before["submit_calls"]))
    video_step = output_of(rt, accepted.pipeline_id, "video")
    assert len(new_keys) == 1 and new_keys[0].endswith(":kling-v3-omni"), new_keys
    assert after["jobs_total"] == before["jobs_total"] + 1 and after["duplicate_jobs"] == 0
    assert video_step["model"] == "kling-v3-omni"
    # It costs the video only, at the premium model's price for the premium profile's seconds.
    assert Decimal(promoted["cost_usd"]) == PREMIUM_VIDEO
    billed = Decimal(str(after["billed_usd"])) - Decimal(str(before["billed_usd"]))
    assert abs(billed - PREMIUM_VIDEO) < Decimal("0.000002")
    # The copy is the draft's, word for word; the video is ours.
    assert promoted["copy"] == draft["copy"]
    assert output_of(rt, accepted.pipeline_id, "copy")["text"] == output_of(rt, draft["id"], "copy")["text"]
    video = promoted["video"]
    data = Path(video["location"]).read_bytes()
    assert data[4:8] == b"ftyp" and video["key"] == f"{accepted.pipeline_id}/video.mp4"
    assert pipeline_row(rt, accepted.pipeline_id).promoted_from == draft["id"]


def test_the_promoted_image_is_our_copy_of_the_drafts_stored_once(rt: Runtime, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    draft = run_draft(rt, request_fields)
    accepted = api.promote(draft["id"])
    drain(rt)
    (draft_image,) = [r for r in stored_rows(rt, draft["id"]) if r.kind == "image"]
    rows = {r.kind: r for r in stored_rows(rt, accepted.pipeline_id)}
    assert sorted(rows) == ["image", "video"]  # the store step stored the video, not the image again
    image = rows["image"]
    assert image.key == f"{accepted.pipeline_id}/image.png"
    assert (image.sha256, image.size) == (draft_image.sha256, draft_image.size)
    assert Path(image.location).read_bytes() == Path(draft_image.location).read_bytes()
    output = output_of(rt, accepted.pipeline_id, "image")
    draft_step = output_of(rt, draft["id"], "image")
    assert output["stored_key"] == image.key and output["assets"] == [] and output["model"] == draft_step["model"]
    with rt.db.transaction() as s:
        image_step = s.scalars(select(Step).where(Step.pipeline_id == accepted.pipeline_id, Step.kind == "image")).one()
    assert image.step_id == image_step.id
    assert api.status(accepted.pipeline_id)["image"]["key"] == image.key


def test_the_estimate_counts_the_video_and_marks_copy_and_image_reused(rt: Runtime, request_fields: RequestFn) -> None:
    draft = run_draft(rt, request_fields)
    accepted = Genline(runtime=rt).promote(draft["id"], "premium")
    row = pipeline_row(rt, accepted.pipeline_id)
    assert row.estimate is not None
    steps = {s["kind"]: s for s in row.estimate["steps"]}
    assert steps["copy"]["reused"] and steps["image"]["reused"]
    assert Decimal(steps["copy"]["cost_usd"]) == Decimal(steps["image"]["cost_usd"]) == 0
    assert steps["video"]["model"] == "kling-v3-omni" and steps["video"]["units"] == 10
    assert Decimal(steps["video"]["cost_usd"]) == PREMIUM_VIDEO and "reused" not in steps["video"]
    assert row.estimated_cost_usd == row.reserved_usd == PREMIUM_VIDEO
    assert row.estimate["promoted_from"] == draft["id"]
    assert row.models == {"copy": "gpt-4o-mini", "image": "wan-2.7-image"}  # no video model: the profile picks


def test_promoting_twice_returns_the_same_pipeline(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    draft = run_draft(rt, request_fields)
    first = api.promote(draft["id"], "premium")
    files = stored_files(rt)
    with leaves_nothing(rt, sim):
        again = api.promote(draft["id"], "premium")
    assert (again.pipeline_id, again.created) == (first.pipeline_id, False)
    assert again.estimated_cost_usd == first.estimated_cost_usd
    assert stored_files(rt) == files  # no second copy of the image either
    # A standard render of the same draft is another promotion.
    other = api.promote(draft["id"], "standard")
    assert other.created and other.pipeline_id != first.pipeline_id


def test_a_callers_key_names_one_promotion_and_not_another(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    draft = run_draft(rt, request_fields)
    first = api.promote(draft["id"], "premium", idempotency_key="launch-1")
    assert api.promote(draft["id"], "premium", idempotency_key="launch-1").pipeline_id == first.pipeline_id
    err = refused(rt, sim, lambda: api.promote(draft["id"], "standard", idempotency_key="launch-1"))
    assert (err.code, err.field) == ("idempotency_conflict", "idempotency_key")


# --- refusals leave nothing behind ---------------------------------------------------------------
def test_an_unknown_pipeline_is_refused(rt: Runtime, sim: SimulatorHandle) -> None:
    err = refused(rt, sim, lambda: Genline(runtime=rt).promote("pl_nothere", "premium"))
    assert (err.code, err.field) == ("pipeline_not_found", "id")


def test_an_unfinished_draft_is_refused(rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    pending = api.submit(request_fields(profile="draft")).pipeline_id  # accepted, not yet run
    err = refused(rt, sim, lambda: api.promote(pending, "premium"))
    assert err.code == "pipeline_not_finished" and "succeeded" in err.message


def test_a_cancelled_draft_is_refused(rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn) -> None:
    api = Genline(runtime=rt)
    pending = api.submit(request_fields(profile="draft")).pipeline_id
    api.cancel(pending)
    err = refused(rt, sim, lambda: api.promote(pending, "premium"))
    assert err.code == "pipeline_failed" and "cancelled" in err.message


def test_the_same_profile_and_an_unknown_one_are_refused(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    api = Genline(runtime=rt)
    draft = run_draft(rt, request_fields)
    err = refused(rt, sim, lambda: api.promote(draft["id"], "draft"))
    assert (err.code, err.field) == ("profile_unchanged", "profile")
    err = refused(rt, sim, lambda: api.promote(draft["id"], "cinema"))
    assert (err.code, err.field) == ("profile_unknown", "profile")
    err = refused(rt, sim, lambda: api.promote(draft["id"], "premium", idempotency_key="bad key\x1b"))
    assert (err.code, err.field) == ("idempotency_key_invalid", "idempotency_key")


def test_a_profile_the_feature_may_not_use_is_refused(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    # The shipped catalog's default features may use draft and standard only (listing-video: premium too).
    draft = run_draft(rt, request_fields, feature="shop-banner")
    files = stored_files(rt)
    err = refused(rt, sim, lambda: Genline(runtime=rt).promote(draft["id"], "premium"))
    assert (err.code, err.field) == ("profile_not_allowed", "profile")
    assert stored_files(rt) == files
    assert Genline(runtime=rt).promote(draft["id"], "standard").created  # what it is entitled to


def test_a_draft_whose_image_was_never_stored_is_refused(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    draft = run_draft(rt, request_fields)
    with rt.db.transaction() as s:  # as if the image's link had run out before it was copied
        s.execute(delete(StoredObject).where(StoredObject.pipeline_id == draft["id"], StoredObject.kind == "image"))
    err = refused(rt, sim, lambda: Genline(runtime=rt).promote(draft["id"], "premium"))
    assert (err.code, err.field) == ("draft_image_missing", "id")


def test_a_draft_whose_stored_image_was_removed_is_refused(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    draft = run_draft(rt, request_fields)
    rt.store.delete(f"{draft['id']}/image.png")  # the retention policy aged it out
    files = stored_files(rt)
    err = refused(rt, sim, lambda: Genline(runtime=rt).promote(draft["id"], "premium"))
    assert err.code == "draft_image_missing"
    assert stored_files(rt) == files


# --- caps ------------------------------------------------------------------------------------------
@pytest.fixture
def capped_rt(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[Callable[[float], Runtime]]:
    """A runtime whose catalog caps each user's spending per day at ``limit_usd``."""
    made: list[Runtime] = []

    def make(limit_usd: float) -> Runtime:
        catalog = json.loads(BUILTIN_CATALOG.read_text())
        catalog["caps"] = [{"scope": "user", "match": "*", "period": "day", "limit_usd": limit_usd}]
        path = tmp_path / f"catalog-{limit_usd}.json"
        path.write_text(json.dumps(catalog))
        settings = make_settings(sim.base_url, GENLINE_CATALOG_FILE=str(path))
        upgrade(settings.database_url)
        runtime = Runtime.from_settings(settings)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


def test_a_cap_that_cannot_fit_the_video_refuses_the_promotion(
    capped_rt: Callable[[float], Runtime], sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    rt = capped_rt(0.5)  # the draft (about $0.12) fits; the premium video ($0.672) does not
    draft = run_draft(rt, request_fields)
    files = stored_files(rt)
    ledger_before = cap_report(rt.db, rt.catalog)
    err = refused(rt, sim, lambda: Genline(runtime=rt).promote(draft["id"], "premium"))
    assert (err.code, err.field) == ("spend_cap_exceeded", "user_id")
    assert "$0.67" in err.message
    assert stored_files(rt) == files
    assert cap_report(rt.db, rt.catalog) == ledger_before


def test_a_promotion_reserves_the_video_against_the_caps(
    capped_rt: Callable[[float], Runtime], request_fields: RequestFn
) -> None:
    rt = capped_rt(5)
    draft = run_draft(rt, request_fields)
    (before,) = cap_report(rt.db, rt.catalog)
    assert Decimal(before["reserved_usd"]) == 0
    accepted = Genline(runtime=rt).promote(draft["id"], "premium")
    (held,) = cap_report(rt.db, rt.catalog)
    assert Decimal(held["reserved_usd"]) == PREMIUM_VIDEO and held["spent_usd"] == before["spent_usd"]
    drain(rt)
    (after,) = cap_report(rt.db, rt.catalog)
    assert Decimal(after["reserved_usd"]) == 0
    assert Decimal(after["spent_usd"]) == Decimal(before["spent_usd"]) + PREMIUM_VIDEO
    assert Genline(runtime=rt).status(accepted.pipeline_id)["status"] == "succeeded"


# --- the command line ----------------------------------------------------------------------------
@pytest.fixture
def cli_env(sim: SimulatorHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A user's environment on the ``rt`` fixture's var folder (the settings loader refuses any
    stray GENLINE_*/APIMART_* variable, so none is inherited)."""
    for name in list(os.environ):
        if name.startswith(("GENLINE_", "APIMART_")):
            monkeypatch.delenv(name)
    saved = structlog.get_config()
    yield {
        "GENLINE_VAR_DIR": str(tmp_path / "var"),
        "APIMART_BASE_URL": sim.base_url,
        "APIMART_API_KEY": TEST_KEY,
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",
    }
    structlog.configure(**saved)


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
def test_genline_promote_prints_the_new_pipeline_its_estimate_and_the_reuse(
    rt: Runtime, request_fields: RequestFn, cli_env: dict[str, str]
) -> None:
    draft = run_draft(rt, request_fields)
    result = invoke(["promote", draft["id"], "--json"], cli_env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["created"] and out["promoted_from"] == draft["id"] and out["profile"] == "premium"
    assert out["reused"] == ["copy", "image"] and Decimal(out["estimated_cost_usd"]) == PREMIUM_VIDEO
    assert out["idempotency_key"] == f"promote:{draft['id']}:premium"
    assert pipeline_row(rt, out["pipeline_id"]).promoted_from == draft["id"]

    again = invoke(["promote", draft["id"]], cli_env)  # for people: the same pipeline, said plainly
    assert again.exit_code == 0, again.output
    assert out["pipeline_id"] in again.stdout and "already promoted" in again.stdout
    assert "reused" in again.stdout and "kling-v3-omni" in again.stdout

    missing = invoke(["promote", "pl_nothere"], cli_env)
    assert missing.exit_code == 2
    line = ERROR_LINE.match(missing.stderr.strip())
    assert line is not None and line["code"] == "pipeline_not_found"
    same = invoke(["promote", draft["id"], "--profile", "draft", "--json"], cli_env)
    assert same.exit_code == 2 and json.loads(same.stdout)["error"]["code"] == "profile_unchanged"


def test_a_promotion_is_written_the_same_on_sqlite_and_postgresql(
    either_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    rt = either_rt
    api = Genline(runtime=rt)
    draft = run_draft(rt, request_fields)
    first = api.promote(draft["id"], "premium")
    with leaves_nothing(rt, sim):
        assert api.promote(draft["id"], "premium") == replace(first, created=False)
    drain(rt)
    promoted = api.status(first.pipeline_id)
    assert promoted["status"] == "succeeded" and Decimal(promoted["cost_usd"]) == PREMIUM_VIDEO
    assert promoted["copy"] == draft["copy"]
