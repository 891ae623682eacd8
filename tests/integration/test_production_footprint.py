"""The production footprint, end to end: real worker processes and a poller on Redis (the test
session's own redis-server, never the machine's shared one), PostgreSQL, an S3-compatible server
(moto's server mode) and the simulator over HTTP. Every stored video must be byte-identical to
what the provider produced, and no paid job may have been started twice."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from genline.config.constants import PIPELINE_TERMINAL
from genline.config.settings import load_settings
from genline.pipelines.api import Genline
from genline.provider.simulator import SimConfig, start_simulator
from genline.storage.factory import open_store
from genline.storage.migrate import upgrade
from genline.storage.s3 import S3ObjectStore
from genline.workers.processes import ProcessGroup
from tests.conftest import TEST_KEY
from tests.support.s3_server import MotoServer

PIPELINES = 20


def test_twenty_pipelines_on_redis_postgres_s3_and_the_simulator(
    pg_url: str, redis_url: str, tmp_path: Path, product_png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim_config = SimConfig(api_key=TEST_KEY, image_seconds=0.3, video_seconds=0.8, video_bytes=300_000)
    with MotoServer() as moto, start_simulator(sim_config) as sim:
        env = {
            "GENLINE_VAR_DIR": str(tmp_path / "var"),
            "GENLINE_DATABASE_URL": pg_url,
            "GENLINE_BROKER_URL": redis_url,
            "GENLINE_STORAGE_URL": "s3://genline-e2e/outputs",
            "GENLINE_S3_ENDPOINT_URL": moto.endpoint_url,
            "APIMART_BASE_URL": sim.base_url,
            "APIMART_API_KEY": TEST_KEY,
            "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator
            "GENLINE_POLL_INTERVAL_S": "0.2",
            "GENLINE_LOG_LEVEL": "INFO",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = load_settings()
        upgrade(settings.database_url)
        store = open_store(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
        assert isinstance(store, S3ObjectStore)
        store.ensure_bucket()

        with ProcessGroup(log_dir=tmp_path / "logs", env=env) as group, Genline(settings) as api:
            group.start_worker("interactive", queues="genline.copy,genline.media", concurrency=2)
            group.start_worker("store", queues="genline.store,genline.batch", concurrency=1)
            group.start_poller()
            ids = [
                api.submit(
                    {
                        "user_id": f"seller-{i % 4}",
                        "feature": "listing-video",
                        "profile": "standard",
                        "description": f"Product number {i}: a hand-thrown mug in glaze {i}.",
                        "image": str(product_png),
                        "idempotency_key": f"e2e-{i}",
                    }
                ).pipeline_id
                for i in range(PIPELINES)
            ]
            deadline = time.monotonic() + 150
            while True:
                statuses = {pid: api.status(pid) for pid in ids}
                if all(s["status"] in PIPELINE_TERMINAL for s in statuses.values()):
                    break
                group.check()
                assert time.monotonic() < deadline, {p: s["status"] for p, s in statuses.items()}
                time.sleep(0.5)
            logs = "".join(child.log_path.read_text(errors="replace") for child in group.children)

            failed = {p: s["error"] for p, s in statuses.items() if s["status"] != "succeeded"}
            assert not failed

            with api.runtime.db.engine.connect() as conn:
                jobs: dict[str, str] = dict(
                    conn.execute(
                        text(
                            "SELECT s.pipeline_id, j.task_id FROM provider_jobs j JOIN steps s ON s.id = j.step_id "
                            "WHERE j.kind = 'video'"
                        )
                    ).all()
                )
                db_text = " ".join(
                    str(row)
                    for table in ("pipelines", "steps", "provider_jobs", "stored_objects", "provider_calls")
                    for row in conn.execute(text(f"SELECT * FROM {table}"))
                )  # noqa: S608
            for pid, status in statuses.items():
                video = status["video"]
                assert video["location"].startswith("s3://genline-e2e/outputs/")
                data = store.read_bytes(video["key"])
                produced = httpx.get(f"{sim.base_url}/_sim/tasks/{jobs[pid]}").json()
                assert hashlib.sha256(data).hexdigest() == video["sha256"]
                assert video["sha256"] in str(produced), "stored bytes differ from the provider's"
                assert len(data) == 300_000

            stats = httpx.get(f"{sim.base_url}/_sim/stats").json()
            assert stats["duplicate_jobs"] == 0
            assert stats["jobs_total"] == 2 * PIPELINES  # one image and one video per pipeline, no more
            assert TEST_KEY not in logs and TEST_KEY not in db_text
            assert '"event": "step_succeeded"' in logs  # the workers really did the work, in JSON lines
