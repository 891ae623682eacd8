"""Submits/s against bare ``apply_async``/s on the same Redis broker (``submit_vs_bare_apply_async``).

A submit is what an application service pays for: ``Genline.submit`` = validation, one
transaction on PostgreSQL (pipeline + 4 steps, idempotency check) and the nudge of the first step.
The yardstick is a bare Celery ``apply_async`` of a no-op task to the same broker, from the same
process, on kombu's own Redis transport; it is also measured on genline's (``workers/broker.py``),
which is what ``submit_vs_apply_async_same_transport`` divides by. No worker consumes any of them
(only enqueueing is measured). They run in alternating slices so a drift of the machine's speed
touches all alike.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from genline.workers.broker import REDIS_TRANSPORT
from lab.bench_profile import Spy, summarise


def measure_submit(
    db_url: str, broker: str, var: Path, sim_url: str, *, quick: bool, profile_dir: Path | None
) -> dict[str, Any]:
    import redis

    from genline.config.settings import load_settings
    from genline.pipelines.api import Genline
    from genline.storage.migrate import upgrade
    from lab import bench_tasks

    n = 400 if quick else 2000
    slices = 4
    env = {
        "GENLINE_VAR_DIR": str(var),
        "GENLINE_DATABASE_URL": db_url,
        "GENLINE_BROKER_URL": broker,
        "APIMART_BASE_URL": sim_url,
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator, on loopback
        "APIMART_API_KEY": "bench-submit",
        "GENLINE_LOG_LEVEL": "WARNING",
    }
    upgrade(db_url)
    run = uuid.uuid4().hex[:8]
    bench_tasks.app.conf.broker_url = broker
    same = bench_tasks.make_app(REDIS_TRANSPORT)
    same.conf.broker_url = broker
    same_noop = same.tasks["bench.noop"]

    def request(i: int) -> dict[str, Any]:
        return {
            "user_id": f"bench-{i % 10}",
            "feature": "bench",
            "description": f"Bench product {i}: hand-thrown stoneware mug, speckled glaze, 350 ml.",
            "image": "https://images.example.com/product.png",
            "idempotency_key": f"{run}-{i}",
        }

    with Genline(load_settings(env)) as api:
        for i in range(20):  # connections, caches, queue declarations
            api.submit(request(-1 - i))
            bench_tasks.noop.apply_async()
            same_noop.apply_async()
        submit_s = bare_s = same_s = 0.0
        per = n // slices
        spy = Spy(os.getpid(), profile_dir / "submit.raw", rate=250, idle=True) if profile_dir else None
        if spy:
            spy.__enter__()
        try:
            for k in range(slices):
                started = time.perf_counter()
                for _ in range(per):
                    bench_tasks.noop.apply_async()
                bare_s += time.perf_counter() - started
                started = time.perf_counter()
                for _ in range(per):
                    same_noop.apply_async()
                same_s += time.perf_counter() - started
                started = time.perf_counter()
                for i in range(k * per, (k + 1) * per):
                    api.submit(request(i))
                submit_s += time.perf_counter() - started
        finally:
            if spy:
                spy.__exit__(None, None, None)
    redis.Redis.from_url(broker).flushdb()
    submits_per_s = per * slices / submit_s
    bare_per_s = per * slices / bare_s
    same_per_s = per * slices / same_s
    out: dict[str, Any] = {
        "submits_per_s": submits_per_s,
        "bare_apply_async_per_s": bare_per_s,
        "submit_vs_bare_apply_async": submits_per_s / bare_per_s,
        "same_transport_apply_async_per_s": same_per_s,
        "submit_vs_apply_async_same_transport": submits_per_s / same_per_s,
        "submits": per * slices,
    }
    if profile_dir:
        out["profile"] = summarise(profile_dir / "submit.raw", focus="submit_pipeline")
    return out
