"""Retention: outputs and audit rows past their feature's retention go (objects and rows together),
audit rows are rolled up into daily totals first, and unfinished multipart uploads are aborted.

Pipelines run for real in drain mode (SQLite, local files, the simulator over HTTP); they are aged by
moving ``finished_at`` / ``ts`` back in the database. S3 runs against moto's server over loopback."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from genline.config.catalog import parse_features
from genline.config.clock import utcnow
from genline.config.errors import ConfigError
from genline.pipelines.api import Genline
from genline.pipelines.retention import RetentionResult, run_retention
from genline.pipelines.runtime import Runtime
from genline.storage.models import AuditDailyTotal, Pipeline, ProviderCall, StoredObject
from genline.storage.s3 import S3ObjectStore, make_s3_client
from genline.workers.drain import drain
from tests.conftest import TEST_KEY

pytestmark = pytest.mark.timeout(120)
RequestFn = Callable[..., dict[str, Any]]


def with_features(rt: Runtime, features: dict[str, Any]) -> None:
    default, listed = parse_features(features, profiles=rt.catalog.profiles)
    rt.catalog = replace(rt.catalog, features=listed, default_feature=default)


def run_pipeline(rt: Runtime, fields: dict[str, Any]) -> str:
    api = Genline(runtime=rt)
    pipeline_id = api.submit(fields).pipeline_id
    drain(rt)
    assert api.status(pipeline_id)["status"] == "succeeded"
    return pipeline_id


def age(rt: Runtime, pipeline_id: str, days: float) -> None:
    """Move the pipeline's end and its audit rows ``days`` into the past."""
    back = utcnow() - timedelta(days=days)
    with rt.db.transaction() as s:
        s.execute(update(Pipeline).where(Pipeline.id == pipeline_id).values(finished_at=back))
        s.execute(update(ProviderCall).where(ProviderCall.pipeline_id == pipeline_id).values(ts=back))


def stored(rt: Runtime, pipeline_id: str) -> list[tuple[str, str]]:
    with rt.db.transaction() as s:
        return [
            (key, location)
            for key, location in s.execute(
                select(StoredObject.key, StoredObject.location).where(StoredObject.pipeline_id == pipeline_id)
            )
        ]


def calls(rt: Runtime, pipeline_id: str) -> tuple[int, Decimal]:
    with rt.db.transaction() as s:
        n, cost = s.execute(
            select(func.count(), func.coalesce(func.sum(ProviderCall.cost_usd), 0)).where(
                ProviderCall.pipeline_id == pipeline_id
            )
        ).one()
    return int(n), Decimal(str(cost))


def figures(result: RetentionResult) -> dict[str, Any]:
    data = result.as_dict()
    data.pop("dry_run")
    return data


def test_outputs_and_audit_past_retention_go_and_totals_keep_their_sums(
    either_rt: Runtime, request_fields: RequestFn
) -> None:
    rt = either_rt
    with_features(rt, {"listing-video": {"outputs_days": 30, "audit_days": 90}})
    old = run_pipeline(rt, request_fields())
    recent = run_pipeline(rt, request_fields())
    age(rt, old, 100)
    age(rt, recent, 10)
    old_objects = stored(rt, old)
    assert len(old_objects) == 2 and all(Path(loc).is_file() for _, loc in old_objects)
    old_calls, old_cost = calls(rt, old)
    assert old_calls > 0 and old_cost > 0
    size = sum(Path(loc).stat().st_size for _, loc in old_objects)

    dry = run_retention(rt, dry_run=True)
    assert dry.dry_run
    f = dry.features["listing-video"]
    assert (f.pipelines, f.objects, f.bytes, f.audit_rows) == (1, 2, size, old_calls)
    assert f.audit_cost_usd == old_cost
    assert stored(rt, old) == old_objects and all(Path(loc).is_file() for _, loc in old_objects)
    assert calls(rt, old) == (old_calls, old_cost)  # the dry run changed nothing

    went = run_retention(rt)
    assert figures(went) == figures(dry)  # the real run applies exactly what the dry run showed
    assert stored(rt, old) == [] and not any(Path(loc).exists() for _, loc in old_objects)
    assert calls(rt, old) == (0, Decimal(0))
    with rt.db.transaction() as s:
        totals = s.scalars(select(AuditDailyTotal)).all()
        assert sum(t.requests for t in totals) == old_calls
        assert Decimal(sum(t.cost_micros for t in totals)) / 1_000_000 == old_cost
        assert {t.feature for t in totals} == {"listing-video"}
    # the recent pipeline keeps everything; the old one's status says its video was removed
    assert len(stored(rt, recent)) == 2 and calls(rt, recent)[0] > 0
    status = Genline(runtime=rt).status(old)
    assert status["status"] == "succeeded"
    assert status["video"]["location"] is None and status["video"]["removed_at"]
    assert Genline(runtime=rt).status(recent)["video"]["location"]
    again = run_retention(rt)  # nothing left to do
    assert again.features == {}


def test_a_feature_without_retention_keeps_everything(rt: Runtime, request_fields: RequestFn) -> None:
    with_features(rt, {"other-feature": {"outputs_days": 1, "audit_days": 1}})
    pipeline_id = run_pipeline(rt, request_fields())
    age(rt, pipeline_id, 3650)
    before = (stored(rt, pipeline_id), calls(rt, pipeline_id))
    assert run_retention(rt, dry_run=True).features == {}
    assert run_retention(rt).features == {}
    assert (stored(rt, pipeline_id), calls(rt, pipeline_id)) == before


def test_the_default_entry_applies_to_unlisted_features(rt: Runtime, request_fields: RequestFn) -> None:
    with_features(rt, {"default": {"outputs_days": 7}, "other-feature": {"pii": "mask"}})
    pipeline_id = run_pipeline(rt, request_fields())
    age(rt, pipeline_id, 8)
    result = run_retention(rt)
    assert result.features["listing-video"].objects == 2
    assert result.features["listing-video"].audit_rows == 0  # audit kept forever
    assert stored(rt, pipeline_id) == [] and calls(rt, pipeline_id)[0] > 0


def test_a_crash_between_storage_and_rows_is_redone_by_the_next_pass(rt: Runtime, request_fields: RequestFn) -> None:
    with_features(rt, {"listing-video": {"outputs_days": 1}})
    pipeline_id = run_pipeline(rt, request_fields())
    age(rt, pipeline_id, 2)
    for key, _ in stored(rt, pipeline_id):  # as if the pass died after deleting the objects
        rt.store.delete(key)
    assert run_retention(rt).features["listing-video"].objects == 2
    assert stored(rt, pipeline_id) == []


@pytest.mark.parametrize("value", [0, -3, 1.5, "30", True])
def test_bad_retention_days_are_a_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match="whole number of days above zero"):
        parse_features({"listing-video": {"outputs_days": value}})


def test_the_cli_dry_run_prints_json(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    from genline.cli.main import cli

    monkeypatch.setenv("GENLINE_VAR_DIR", str(rt.settings.var_dir))
    monkeypatch.setenv("APIMART_BASE_URL", rt.settings.provider_base_url)
    monkeypatch.setenv("APIMART_API_KEY", TEST_KEY)
    monkeypatch.setenv("GENLINE_ALLOW_PRIVATE_HOSTS", "127.0.0.1")
    out = CliRunner().invoke(cli, ["retention", "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    assert '"dry_run": true' in out.output and '"uploads_aborted": 0' in out.output
    text = CliRunner().invoke(cli, ["retention", "--dry-run"])
    assert text.exit_code == 0 and "dry run" in text.output and "No stored outputs" in text.output, text.output


# --- S3: unfinished multipart uploads --------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_client(moto_endpoint: str) -> Any:
    return make_s3_client(endpoint_url=moto_endpoint)  # moto_endpoint keeps the dummy credentials set


def test_unfinished_multipart_uploads_under_the_prefix_are_aborted(s3_client: Any) -> None:
    store = S3ObjectStore(f"genline-ret-{uuid.uuid4().hex[:12]}", "outputs", s3_client)
    store.ensure_bucket()
    mine = s3_client.create_multipart_upload(Bucket=store.bucket, Key="outputs/pl_x/video.mp4")
    s3_client.upload_part(
        Bucket=store.bucket, Key="outputs/pl_x/video.mp4", UploadId=mine["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    s3_client.create_multipart_upload(Bucket=store.bucket, Key="elsewhere/file.bin")  # not under the prefix

    def keys() -> list[str]:
        return sorted(u["Key"] for u in s3_client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []))

    # moto reports every upload as initiated on 2010-11-10 (a fixed value in its answer), so the age
    # check itself is exercised by the local store's test below; here: prefix, dry run, abort.
    assert store.abort_stale_uploads(86_400, dry_run=True) == 1
    assert keys() == ["elsewhere/file.bin", "outputs/pl_x/video.mp4"]
    assert store.abort_stale_uploads(86_400) == 1
    assert keys() == ["elsewhere/file.bin"]  # another prefix's upload is not ours to abort


def test_local_store_removes_stale_temporary_files(tmp_path: Path) -> None:
    from genline.storage.local import LocalObjectStore

    store = LocalObjectStore(tmp_path / "objects")
    store.put_stream("pl_1/video.mp4", [b"abc"], content_type="video/mp4", expected_size=3)
    orphan = tmp_path / "objects" / "pl_1" / ".video.mp4.abc123.tmp"
    orphan.write_bytes(b"half")
    assert store.abort_stale_uploads(86_400) == 0
    assert store.abort_stale_uploads(-60, dry_run=True) == 1 and orphan.exists()
    assert store.abort_stale_uploads(-60) == 1
    assert not orphan.exists() and store.read_bytes("pl_1/video.mp4") == b"abc"


def test_the_sweeper_runs_a_pass_at_most_every_interval(
    rt: Runtime, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from genline.pipelines import retention
    from genline.workers.sweeper import sweep

    with_features(rt, {"listing-video": {"outputs_days": 1}})
    first = run_pipeline(rt, request_fields())
    age(rt, first, 2)
    monkeypatch.setattr(retention, "_last_pass", 0.0)
    sweep(rt)
    assert stored(rt, first) == []
    second = run_pipeline(rt, request_fields())
    age(rt, second, 2)
    monkeypatch.setattr(retention, "_last_pass", 0.0)  # another process: the shared key still holds it back
    sweep(rt)
    assert len(stored(rt, second)) == 2
    rt.shared.delete("retention:pass")  # the interval is over
    monkeypatch.setattr(retention, "_last_pass", 0.0)
    sweep(rt)
    assert stored(rt, second) == []
