"""``genline list``, ``genline retry`` and the bulk forms, in drain mode against the simulator."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from genline.cli.main import cli
from genline.config.errors import InvalidState, SpendCapExceeded
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.listing import PipelineFilter
from genline.pipelines.runtime import Runtime
from genline.pipelines.spend import micros
from genline.provider.simulator import SimulatorHandle
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, SpendCap, Step
from genline.workers.drain import drain
from tests.support.cli import invoke
from tests.support.drive import faults, sim_stats
from tests.test_report import cli_env, demo_request
from tests.test_spend_caps import estimate_of, write_catalog

IMAGES = "/v1/images/generations"


def failed_at_image(rt: Runtime, sim: SimulatorHandle, upload_dir: Path, key: str, i: int = 0) -> str:
    faults(sim, {"method": "POST", "path": IMAGES, "status": 400, "times": 1})
    pid = Genline(runtime=rt).submit(demo_request(upload_dir, i, key)).pipeline_id
    drain(rt)
    assert Genline(runtime=rt).status(pid)["status"] == "failed"
    return pid


def jobs_of(rt: Runtime, pid: str) -> list[ProviderJob]:
    with rt.db.transaction() as s:
        return list(s.scalars(select(ProviderJob).join(Step).where(Step.pipeline_id == pid)))


def test_a_failed_pipeline_runs_again_from_its_failed_step_with_new_keys_for_new_jobs_only(
    rt: Runtime, sim: SimulatorHandle, upload_dir: Path
) -> None:
    api = Genline(runtime=rt)
    pid = failed_at_image(rt, sim, upload_dir, "r-1")
    [refused] = jobs_of(rt, pid)
    assert refused.status == "failed" and refused.task_id is None
    before = sim_stats(sim)

    result = api.retry(pid)
    assert result["from_step"] == "image" and result["status"] == "running"
    drain(rt)

    status = api.status(pid)
    assert status["status"] == "succeeded", status
    assert status["video"] and status["error"] is None
    jobs = jobs_of(rt, pid)
    keys = [j.idempotency_key for j in jobs]
    assert len(keys) == len(set(keys)) == 3  # the refused image job, the new image job, the video job
    assert refused.idempotency_key in keys  # kept as history, unchanged
    new_image = next(j for j in jobs if j.kind == "image" and j.id != refused.id)
    assert new_image.status == "completed" and new_image.idempotency_key != refused.idempotency_key
    assert new_image.step_id == result["step_id"] != refused.step_id
    with rt.db.transaction() as s:
        old = s.get_one(Step, refused.step_id)
        assert (old.status, old.error_code, old.position >= 100) == ("failed", "provider_rejected_request", True)
        copies = s.scalar(
            select(func.count())
            .select_from(ProviderCall)
            .where(ProviderCall.pipeline_id == pid, ProviderCall.operation == "chat")
        )
    assert copies == 1  # the copy that succeeded is not written (or paid for) again
    stats = sim_stats(sim)
    assert stats["duplicate_jobs"] == 0
    assert stats["jobs_total"] == before["jobs_total"] + 2  # one new image job, one video job


def test_only_a_failed_pipeline_can_be_retried(rt: Runtime, sim: SimulatorHandle, upload_dir: Path) -> None:
    api = Genline(runtime=rt)
    pid = api.submit(demo_request(upload_dir, 0, "ok-1")).pipeline_id
    drain(rt)
    with pytest.raises(InvalidState) as caught:
        api.retry(pid)
    assert caught.value.code == "pipeline_not_failed"
    failed = failed_at_image(rt, sim, upload_dir, "twice")
    api.retry(failed)
    with pytest.raises(InvalidState):  # a second retry while the first runs changes nothing
        api.retry(failed)


@pytest.fixture
def capped_rt(tmp_path: Path, sim: SimulatorHandle, make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    """A runtime whose catalog has one global daily cap of a few pipelines."""
    limit = str(micros(estimate_of("standard")) * 3 / 1_000_000)
    catalog = write_catalog(
        tmp_path / "catalog.json", [{"scope": "global", "match": "*", "period": "day", "limit_usd": limit}]
    )
    settings = make_settings(sim.base_url, GENLINE_CATALOG_FILE=catalog)
    upgrade(settings.database_url)
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.close()


def test_a_retry_reserves_the_remaining_estimate_against_the_caps_and_releases_it_at_the_end(
    capped_rt: Runtime, sim: SimulatorHandle, upload_dir: Path
) -> None:
    rt = capped_rt
    pid = failed_at_image(rt, sim, upload_dir, "cap-1")
    with rt.db.transaction() as s:
        estimate = s.get_one(Pipeline, pid).estimate
        assert s.scalars(select(SpendCap.reserved_micros)).one() == 0  # released when it failed
    assert estimate is not None
    remaining = sum(micros(Decimal(x["cost_usd"])) for x in estimate["steps"] if x["kind"] != "copy")
    Genline(runtime=rt).retry(pid)
    with rt.db.transaction() as s:
        assert s.scalars(select(SpendCap.reserved_micros)).one() == remaining
    drain(rt)
    with rt.db.transaction() as s:
        cap = s.scalars(select(SpendCap)).one()
        cost = s.get_one(Pipeline, pid).cost_usd
    assert cap.reserved_micros == 0 and cap.spent_micros == micros(cost, "ROUND_HALF_EVEN")


def test_a_retry_the_caps_cannot_hold_is_refused_and_changes_nothing(
    capped_rt: Runtime, sim: SimulatorHandle, upload_dir: Path
) -> None:
    rt = capped_rt
    pid = failed_at_image(rt, sim, upload_dir, "cap-2")
    with rt.db.transaction() as s:  # the day's cap spent by other work meanwhile
        s.execute(update(SpendCap).values(spent_micros=SpendCap.limit_micros))
        steps_before = sorted((st.id, st.status) for st in s.scalars(select(Step).where(Step.pipeline_id == pid)))
    with pytest.raises(SpendCapExceeded):
        Genline(runtime=rt).retry(pid)
    with rt.db.transaction() as s:
        assert s.get_one(Pipeline, pid).status == "failed"
        assert (
            sorted((st.id, st.status) for st in s.scalars(select(Step).where(Step.pipeline_id == pid))) == steps_before
        )


def test_list_filters_by_user_feature_status_and_time(rt: Runtime, sim: SimulatorHandle, upload_dir: Path) -> None:
    api = Genline(runtime=rt)
    failed = failed_at_image(rt, sim, upload_dir, "l-1", i=0)  # demo-seller-1
    done = api.submit(demo_request(upload_dir, 1, "l-2")).pipeline_id  # demo-seller-2
    drain(rt)
    other = api.submit({**demo_request(upload_dir, 2, "l-3"), "feature": "launch"}).pipeline_id  # pending

    def ids(**kw: Any) -> list[str]:
        return [p["id"] for p in api.list_pipelines(PipelineFilter(**kw))["pipelines"]]

    assert ids() == [other, done, failed]  # newest first
    assert ids(user_id="demo-seller-2") == [done]
    assert ids(feature="launch") == [other]
    assert ids(status=("failed", "pending")) == [other, failed]
    with rt.db.transaction() as s:
        middle = s.get_one(Pipeline, done).created_at
    assert ids(since=middle) == [other, done] and ids(until=middle) == [failed]
    env = cli_env(rt, sim)
    shown = invoke(["list", "--status", "failed", "--json"], env)
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["total"] == 1 and data["pipelines"][0]["id"] == failed
    assert data["pipelines"][0]["error_code"] == "provider_rejected_request"
    text_form = invoke(["list", "--user-id", "demo-seller-1"], env)
    assert failed in text_form.output and "failed" in text_form.output


def test_bulk_cancel_shows_asks_and_acts_only_on_what_the_filter_picks(
    rt: Runtime, sim: SimulatorHandle, upload_dir: Path
) -> None:
    api = Genline(runtime=rt)
    waiting = [api.submit(demo_request(upload_dir, i, f"b-{i}")).pipeline_id for i in range(2)]
    other = api.submit({**demo_request(upload_dir, 2, "b-other"), "feature": "launch"}).pipeline_id
    env = cli_env(rt, sim)

    refused = invoke(["cancel-many", "--yes"], env)  # no filter: never "everything" by accident
    assert refused.exit_code == 2 and "filter_required" in refused.output
    dry = invoke(["cancel-many", "--feature", "listing-video", "--dry-run", "--json"], env)
    assert dry.exit_code == 0, dry.output
    assert sorted(json.loads(dry.output)["pipeline_ids"]) == sorted(waiting)
    said_no = CliRunner().invoke(cli, ["cancel-many", "--feature", "listing-video"], input="n\n", env=env)
    assert said_no.exit_code == 1 and "Cancel these 2 pipeline(s)?" in said_no.output
    assert {api.status(p)["status"] for p in waiting} == {"pending"}  # nothing changed
    needs_yes = invoke(["cancel-many", "--feature", "listing-video", "--json"], env)
    assert needs_yes.exit_code == 2 and "confirmation_required" in needs_yes.output

    done = CliRunner().invoke(cli, ["cancel-many", "--feature", "listing-video"], input="y\n", env=env)
    assert done.exit_code == 0, done.output
    assert "2 done" in done.output
    assert {api.status(p)["status"] for p in waiting} == {"cancelled"}
    assert api.status(other)["status"] == "pending"


def test_bulk_retry_retries_the_failed_pipelines_the_filter_picks(
    rt: Runtime, sim: SimulatorHandle, upload_dir: Path
) -> None:
    api = Genline(runtime=rt)
    failed = [failed_at_image(rt, sim, upload_dir, f"m-{i}", i=i) for i in range(2)]
    env = cli_env(rt, sim)
    wrong = invoke(["retry-many", "--status", "running", "--yes"], env)
    assert wrong.exit_code == 2 and "status_not_actionable" in wrong.output
    result = invoke(["retry-many", "--feature", "listing-video", "--yes", "--json"], env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert sorted(d["pipeline_id"] for d in data["done"]) == sorted(failed) and data["failed"] == []
    for pid in failed:
        assert api.status(pid)["status"] == "running"
    # The CLI nudged through its own broker; here the steps are run as the sweeper would send them.
    with rt.db.transaction() as s:
        queued = s.scalars(select(Step.id).where(Step.pipeline_id.in_(failed), Step.status == "queued")).all()
    for step_id in queued:
        rt.dispatcher.send(step_id, "genline.media")
    drain(rt)
    assert {api.status(pid)["status"] for pid in failed} == {"succeeded"}
