"""Provider completion → verified object in storage, under a backlog (``completion_to_stored_p95_s``).

Everything as in production, on loopback: the simulator (own process, 5 MB videos), PostgreSQL,
Redis, moto's S3 server, a ``genline poller`` process (2 s cadence) and a ``genline worker`` on the
store queue (2 processes). The database holds a backlog of 1,000 in-flight video jobs that keep
rendering (the poller polls them all the while) and, after a warm-up pipeline has gone through,
a set of pipelines whose videos finish at spread-out moments. For each of those:

    completion_to_stored = stored_objects.created_at (video, written after HeadObject verified it)
                           − the simulator's done_at for the render

with its parts: detect (done → video step succeeded, the poller), queue (→ store step started,
broker + worker) and store (→ object recorded). ``transfer_s`` is one 5 MB copy with nothing else
running (same code, same servers), so the target reads ``2 s + transfer_s``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from lab.bench_http import create_tasks
from lab.bench_poller import LONG_RENDER_S, Seeder, quantile
from lab.bench_sim import SimProcess

VIDEO_BYTES = 5_000_000
BACKLOG = 1000
INTERVAL_S = 2.0


def _ts(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp()


def measure_completion_to_stored(
    db_url: str, broker: str, var: Path, *, quick: bool, log: Any = print
) -> dict[str, Any]:
    from genline.config.settings import load_settings
    from genline.pipelines.runtime import Runtime
    from genline.storage.factory import open_store
    from genline.storage.migrate import upgrade
    from genline.storage.transfer import copy_url_to_store
    from genline.workers.processes import ProcessGroup
    from tests.support.s3_server import DUMMY_AWS_ENV, UNSET_AWS_ENV, MotoServer

    finishers = 12 if quick else 60
    spread_s = 5.0 if quick else 25.0
    key = "bench-" + uuid.uuid4().hex
    for name in UNSET_AWS_ENV:
        os.environ.pop(name, None)
    os.environ.update(DUMMY_AWS_ENV)
    upgrade(db_url)
    sim_config = {
        "video_seconds": LONG_RENDER_S,
        "image_seconds": 0.0,
        "rate_limit_per_s": 10**9,
        "video_bytes": VIDEO_BYTES,
    }
    with (
        MotoServer() as moto,
        SimProcess(sim_config, api_key=key, log_path=var / "logs" / "store-simulator.log") as sim,
    ):
        env = {
            "GENLINE_VAR_DIR": str(var),
            "GENLINE_DATABASE_URL": db_url,
            "GENLINE_BROKER_URL": broker,
            "GENLINE_STORAGE_URL": "s3://genline-bench-store/outputs",
            "GENLINE_S3_ENDPOINT_URL": moto.endpoint_url,
            "APIMART_BASE_URL": sim.base_url,
            "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator, on loopback
            "APIMART_API_KEY": key,
            "GENLINE_POLL_INTERVAL_S": str(INTERVAL_S),
            # the simulator here allows 10^9 requests a second: the provider's limit is the account's
            "GENLINE_PROVIDER_RATE_PER_S": "1000000",
            "GENLINE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        }
        settings = load_settings(env)
        rt = Runtime.from_settings(settings)
        try:
            rt.store.ensure_bucket()  # type: ignore[attr-defined]
            seeder = Seeder(rt, "")
            image = asyncio.run(
                create_tasks(
                    sim.base_url,
                    key,
                    1,
                    kind="image",
                    model="wan-2.7-image",
                    body={"n": 1, "size": "1:1"},
                    prefix="img",
                )
            )[0]
            seeder.image_url = f"{sim.base_url}/files/{image}/0.png"
            # the transfer alone: one 5 MB copy, nothing else running
            sim.configure(video_seconds=0.0)
            lone = asyncio.run(create_tasks(sim.base_url, key, 2, model=seeder.video_model, prefix="lone"))
            store = open_store(settings.storage_url, endpoint_url=moto.endpoint_url)
            transfers = []
            for i, task_id in enumerate(lone):
                started = time.perf_counter()
                copy_url_to_store(
                    rt.downloads,
                    store,
                    f"{sim.base_url}/files/{task_id}/0.mp4",
                    f"lone/{i}.mp4",
                    expires_at=None,
                    expect_type="video",
                )
                transfers.append(time.perf_counter() - started)
            transfer_s = min(transfers)
            # the backlog: renders that never finish during the run, polled every 2 s
            sim.configure(video_seconds=LONG_RENDER_S)
            long_ids = sim.make_jobs(BACKLOG, model=seeder.video_model, key_prefix="backlog-")
            now = datetime.now(UTC)
            seeder.add(
                "backlog",
                long_ids,
                status="processing",
                estimated_s=[int(LONG_RENDER_S)] * BACKLOG,
                submitted_ago_s=[0.8 * LONG_RENDER_S] * BACKLOG,
                next_poll_at=[now + timedelta(seconds=INTERVAL_S * i / BACKLOG) for i in range(BACKLOG)],
            )
            with ProcessGroup(log_dir=var / "logs", env=env) as group:
                group.start_poller("store-poller")
                group.start_worker("store-worker", queues="genline.store", concurrency=2)
                # warm-up: one pipeline through poller, broker, worker and S3
                sim.configure(video_seconds=0.0)
                warm = asyncio.run(create_tasks(sim.base_url, key, 1, model=seeder.video_model, prefix="warm"))
                warm_steps = seeder.add(
                    "warm",
                    warm,
                    status="processing",
                    estimated_s=[1],
                    submitted_ago_s=[0.8],
                    next_poll_at=[datetime.now(UTC)],
                )
                _wait_stored(rt, warm_steps, 90, group.check, "the warm-up pipeline")
                # the measured renders, finishing over ``spread_s``
                ids: list[str] = []
                estimates: list[int] = []
                base = time.time() + 3.0
                for i in range(finishers):
                    finish = base + spread_s * (i + 0.5) / finishers
                    duration = finish - time.time()
                    sim.configure(video_seconds=round(duration, 3))
                    ids += asyncio.run(
                        create_tasks(
                            sim.base_url, key, 1, model=seeder.video_model, prefix=f"fin{i}-{uuid.uuid4().hex[:6]}"
                        )
                    )
                    estimates.append(max(1, int(duration + 0.999)))
                sim.configure(video_seconds=LONG_RENDER_S)
                now = datetime.now(UTC)
                steps = seeder.add(
                    "fin",
                    ids,
                    status="processing",
                    estimated_s=estimates,
                    # made just now, as the simulator's own clock says: the expected schedule times
                    # the first read from the submit and the progress (a job seeded as submitted
                    # earlier than the simulator began it would look slower than it is)
                    submitted_ago_s=[0.0] * finishers,
                    next_poll_at=[now + timedelta(seconds=INTERVAL_S * (i % 20) / 20) for i in range(finishers)],
                )
                _wait_stored(rt, steps, spread_s + 120, group.check, "the measured pipelines")
            done_at = {tid: float(sim.task(tid)["done_at"]) for tid in ids}
            with rt.db.transaction() as s:
                rows = s.execute(
                    text(
                        "SELECT j.task_id, v.finished_at, st.started_at, o.created_at "
                        "FROM provider_jobs j JOIN steps v ON v.id = j.step_id "
                        "JOIN steps st ON st.pipeline_id = v.pipeline_id AND st.position = v.position + 1 "
                        "JOIN stored_objects o ON o.step_id = st.id AND o.kind = 'video' "
                        "WHERE v.id = ANY(:ids)"
                    ),
                    {"ids": steps},
                ).all()
        finally:
            rt.close()
    total, detect, queue, store_s = [], [], [], []
    for task_id, video_done, store_started, stored in rows:
        done = done_at[task_id]
        t_video, t_started, t_stored = _ts(video_done), _ts(store_started), _ts(stored)
        total.append(t_stored - done)
        detect.append(t_video - done)
        queue.append(t_started - t_video)
        store_s.append(t_stored - t_started)
    out = {
        "completion_to_stored_p95_s": quantile(total, 0.95),
        "completion_to_stored_p50_s": quantile(total, 0.5),
        "completion_to_stored_target_s": 2.0 + transfer_s,
        "transfer_s": transfer_s,
        "detect_p95_s": quantile(detect, 0.95),
        "queue_p95_s": quantile(queue, 0.95),
        "store_p95_s": quantile(store_s, 0.95),
        "measured_pipelines": len(total),
        "backlog_jobs": BACKLOG,
        "video_bytes": VIDEO_BYTES,
    }
    log(
        f"  completion→stored p50 {out['completion_to_stored_p50_s']:.2f} s, p95 "
        f"{out['completion_to_stored_p95_s']:.2f} s (target {out['completion_to_stored_target_s']:.2f} s; parts p95: "
        f"detect {out['detect_p95_s']:.2f}, queue {out['queue_p95_s']:.2f}, store {out['store_p95_s']:.2f})"
    )
    return out


def _wait_stored(rt: Any, video_steps: list[str], timeout_s: float, check: Any, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with rt.db.transaction() as s:
            left = s.scalar(
                text(
                    "SELECT count(*) FROM steps v JOIN pipelines p ON p.id = v.pipeline_id "
                    "WHERE v.id = ANY(:ids) AND p.status NOT IN ('succeeded', 'failed', 'cancelled')"
                ),
                {"ids": video_steps},
            )
            failed = s.scalar(
                text(
                    "SELECT count(*) FROM steps v JOIN pipelines p ON p.id = v.pipeline_id "
                    "WHERE v.id = ANY(:ids) AND p.status <> 'succeeded' AND p.status IN ('failed', 'cancelled')"
                ),
                {"ids": video_steps},
            )
        if failed:
            raise RuntimeError(f"bench: {failed} of {what} did not succeed; see the logs")
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: timed out waiting for {what} ({left} left)")
        check()
        time.sleep(0.25)
