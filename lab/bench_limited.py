"""The limited-provider section: genline within a provider's per-key request limit.

Set-up, all on loopback: the simulator in its own process allowing 100 requests a second per key
(429 with ``Retry-After`` beyond it) and rendering with model-dependent, jittered times (video
renders of 30-120 s: a nominal 60 s, a spread the provider's estimate knows of, 0.55-1.75x, and a
jitter it does not, 0.9-1.15x); Redis as the broker and shared state, a PostgreSQL database of its
own, docker-compose.yml's workers (one per queue: copy, media, store; 2 processes each) and a
poller process, all on the shipped defaults except ``GENLINE_PROVIDER_RATE_PER_S=100``: the
provider's limit is the account's, so it must be told.

1. Baseline: new pipelines at 5/s for a while with no other jobs in flight; submit → first step
   (the copy, a chat call) done, p95.
2. Load: 2,000 video jobs made on the simulator at once and seeded as in-flight jobs of 2,000
   pipelines (copy and image done, video waiting, store pending; their first polls due over the
   next 2 s, as submits would have left them), then new pipelines at 5/s again, and the section
   waits until the 2,000 renders are done and a few seconds more.

Figures: ``rate_limit_hit_rate`` (429s ÷ every request the simulator answered, downloads
included), ``polls_per_completed_job`` (reads of the 2,000 jobs that completed, from their rows;
beside it what a fixed 2 s cadence from the submit on would have spent on the same renders),
``detect_lag_p99_s`` for the jobs that finished within their estimate (the video step committed
as succeeded − the render's end) and the same for those that ran late, and
``submit_p95_under_poll_load_ratio`` (load ÷ baseline).
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

LIMIT_PER_S = 100
VIDEO_NOMINAL_S = 60.0
IMAGE_NOMINAL_S = 12.0
SPREAD = (0.55, 1.75)
JITTER = (0.9, 1.15)
SUBMITS_PER_S = 5.0


def sim_config(quick: bool) -> dict[str, Any]:
    from genline.config.catalog import load_catalog

    catalog = load_catalog(None)
    scale = 0.1 if quick else 1.0  # a quick run: renders of 3-12 s
    renders = {
        name: (IMAGE_NOMINAL_S if model.kind == "image" else VIDEO_NOMINAL_S) * scale
        for name, model in catalog.models.items()
        if model.kind in ("image", "video")
    }
    return {
        "rate_limit_per_s": LIMIT_PER_S,
        "render_seconds": renders,
        "render_spread_low": SPREAD[0],
        "render_spread_high": SPREAD[1],
        "render_jitter_low": JITTER[0],
        "render_jitter_high": JITTER[1],
        "video_bytes": 65536,
        "image_px": 64,
    }


def _stream(api: Any, n: int, run: str, request: Callable[[int, str], dict[str, Any]]) -> list[str]:
    """``n`` pipelines submitted at ``SUBMITS_PER_S``, each on its own tick; their ids."""
    ids = []
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / SUBMITS_PER_S - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        ids.append(api.submit(request(i, run)).pipeline_id)
    return ids


def _first_step_p95(rt: Any, pattern: str, wait_s: float) -> tuple[float, int]:
    """p95 of pipeline accepted → first step finished, over the pipelines whose key matches
    ``pattern``, waiting up to ``wait_s`` for their first steps; and how many were measured."""
    from lab.bench_poller import quantile

    deadline = time.monotonic() + wait_s
    while True:
        with rt.db.transaction() as s:
            rows = s.execute(
                text(
                    "SELECT p.created_at, st.finished_at FROM pipelines p JOIN steps st ON st.pipeline_id = p.id "
                    "AND st.position = 0 WHERE p.idempotency_key LIKE :pattern"
                ),
                {"pattern": pattern},
            ).all()
        if all(f is not None for _, f in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lat = [(f - c).total_seconds() for c, f in rows if f is not None]
    missing = sum(1 for _, f in rows if f is None)
    lat += [wait_s] * missing  # not done in time: counted at the wait, a lower bound
    return quantile(lat, 0.95), len(rows)


def _first_step_parts(rt: Any, pattern: str) -> dict[str, float]:
    """Where the first step's time went, p95 each: queued (accepted → a worker began it), the
    chat call itself (its audit row's latency), and the rest (claim, completion, the budget's wait)."""
    from lab.bench_poller import quantile

    with rt.db.transaction() as s:
        rows = s.execute(
            text(
                "SELECT p.created_at, st.started_at, st.finished_at, "
                "(SELECT max(c.latency_ms) FROM provider_calls c WHERE c.step_id = st.id AND c.operation = 'chat') "
                "FROM pipelines p JOIN steps st ON st.pipeline_id = p.id AND st.position = 0 "
                "WHERE p.idempotency_key LIKE :pattern AND st.finished_at IS NOT NULL"
            ),
            {"pattern": pattern},
        ).all()
    queued = [(b - a).total_seconds() for a, b, _, _ in rows]
    chat = [(ms or 0.0) / 1000 for *_, ms in rows]
    rest = [(c - b).total_seconds() - (ms or 0.0) / 1000 for _, b, c, ms in rows]
    return {
        name: quantile(values, 0.95)
        for name, values in (("queued_p95_s", queued), ("chat_p95_s", chat), ("rest_p95_s", rest))
    }


@contextlib.contextmanager
def _group(env: dict[str, str], var: Path) -> Iterator[Any]:
    from genline.config.constants import Queue
    from genline.workers.processes import ProcessGroup

    with ProcessGroup(log_dir=var / "logs", env=env) as group:
        # docker-compose.yml's layout: a worker per queue, so a new pipeline's copy step never
        # waits behind the stored videos of the renders finishing around it (2 processes each here)
        for queue in (Queue.COPY, Queue.MEDIA, Queue.STORE):
            group.start_worker(f"limited-{queue.value.rsplit('.', 1)[-1]}", queues=queue.value, concurrency=2)
        group.start_poller("limited-poller")
        yield group


def measure_limited(
    db_url: str,
    broker: str,
    var: Path,
    *,
    quick: bool,
    genline_env: Callable[..., dict[str, str]],
    request: Callable[[int, str], dict[str, Any]],
    log: Any = print,
) -> dict[str, Any]:
    from genline.config.settings import load_settings
    from genline.pipelines.api import Genline
    from genline.storage.migrate import upgrade
    from lab.bench_poller import Seeder, quantile
    from lab.bench_sim import SimProcess

    jobs = 300 if quick else 2000
    # a p95 of 50 samples moved between 0.028 and 0.061 s run to run: a quick run's ratio is a rough one
    baseline_n = 30 if quick else 150
    load_n = 30 if quick else 300
    key = "bench-" + uuid.uuid4().hex
    with SimProcess(sim_config(quick), api_key=key, log_path=var / "logs" / "limited-simulator.log") as sim:
        env = genline_env(var, db_url, broker, sim.base_url, key)
        env.pop("GENLINE_POLL_INTERVAL_S", None)  # the shipped cadence (2 s)
        env["GENLINE_PROVIDER_RATE_PER_S"] = str(LIMIT_PER_S)  # the provider's limit: the account's to tell
        settings = load_settings(env)
        upgrade(db_url)
        with _group(env, var) as group, Genline(settings) as api:
            rt = api.runtime
            api.submit(request(0, "limited-warmup"))
            _first_step_p95(rt, "limited-warmup%", 60)
            group.check()
            run = uuid.uuid4().hex[:8]
            # 1. baseline: the stream alone
            _stream(api, baseline_n, f"{run}-base", request)
            base_p95, base_count = _first_step_p95(rt, f"{run}-base-%", 30)
            log(
                f"  baseline: {base_count} pipelines at {SUBMITS_PER_S:.0f}/s, submit → first step p95 {base_p95:.3f} s"
            )
            # 2. 2,000 renders in flight, and the stream again
            made_at = time.time()
            model = rt.catalog.profiles["standard"].video_models[0]
            body = {"kind": "video", "count": jobs, "model": model, "prompt": "bench product reveal"}
            made = sim._admin("POST", "/_sim/jobs", body | {"key_prefix": f"lim-{run}-"})
            image = {"kind": "image", "count": 1, "model": "wan-2.7-image", "prompt": "bench", "n": 1, "size": "1:1"}
            image_id = sim._admin("POST", "/_sim/jobs", image)["task_ids"][0]  # the pipelines' image
            seeder = Seeder(rt, f"{sim.base_url}/files/{image_id}/0.png")
            now = datetime.now(UTC)
            prefix = f"l{run[:6]}"
            video_steps = seeder.add(
                prefix,
                made["task_ids"],
                status="pending",
                estimated_s=made["estimated_times"],
                submitted_ago_s=[time.time() - made_at] * jobs,
                next_poll_at=[now + timedelta(seconds=2.0 * (i + 0.5) / jobs) for i in range(jobs)],
                image_stored=True,  # as the video step leaves it: the store step copies only the video
            )
            with rt.db.transaction() as s:  # as a submit leaves them: polled, not yet read
                s.execute(text("UPDATE provider_jobs SET progress = 0 WHERE id LIKE :p"), {"p": f"job_{prefix}%"})
            stats_before = sim.stats()
            before = stats_before["requests_by_status"]
            log(
                f"  seeded {jobs} in-flight video jobs (renders {min(made['done_at']) - made_at:.0f}-"
                f"{max(made['done_at']) - made_at:.0f} s); submitting at {SUBMITS_PER_S:.0f}/s"
            )
            _stream(api, load_n, f"{run}-load", request)
            load_p95, load_count = _first_step_p95(rt, f"{run}-load-%", 60)
            base_parts, load_parts = _first_step_parts(rt, f"{run}-base-%"), _first_step_parts(rt, f"{run}-load-%")
            group.check()
            last = max(made["done_at"])
            while time.time() < last + 6:
                time.sleep(1.0)
                group.check()
            stats_after = sim.stats()
            after = stats_after["requests_by_status"]
            with rt.db.transaction() as s:
                rows = s.execute(
                    text(
                        "SELECT j.task_id, j.status, j.polls, st.finished_at FROM provider_jobs j "
                        "JOIN steps st ON st.id = j.step_id WHERE st.id = ANY(:ids)"
                    ),
                    {"ids": video_steps},
                ).all()
                stretched = rt.shared.get("polls:stretched")
                reads = s.execute(
                    text(
                        "SELECT step_id, array_agg(extract(epoch FROM ts) ORDER BY ts) FROM provider_calls "
                        "WHERE step_id = ANY(:ids) AND operation = 'poll' GROUP BY step_id"
                    ),
                    {"ids": video_steps},
                ).all()
    requests = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    total = sum(requests.values())
    refused = requests.get("429", 0)
    index = {tid: i for i, tid in enumerate(made["task_ids"])}
    on_time: list[float] = []
    late: list[float] = []
    polls: list[int] = []
    fixed: list[int] = []
    for task_id, status, n_polls, finished in rows:
        i = index[task_id]
        done, estimate = made["done_at"][i], made["estimated_times"][i]
        render = done - made_at
        if status != "completed" or finished is None:
            continue
        polls.append(n_polls)
        fixed.append(math.ceil(render / 2.0))
        lag = finished.replace(tzinfo=UTC).timestamp() - done
        (on_time if render <= estimate else late).append(lag)
    completed = len(polls)
    # when each seeded job was read, as a share of its estimate (diagnostics: first reads, last reads)
    step_task = {sid: made["task_ids"][i] for i, sid in enumerate(video_steps)}
    first_share: list[float] = []
    last_after_done: list[float] = []
    samples: list[dict[str, Any]] = []
    for step_id, times in reads:
        i = index[step_task[step_id]]
        if len(samples) < 12:
            samples.append(
                {
                    "estimate_s": made["estimated_times"][i],
                    "done_s": round(made["done_at"][i] - made_at, 2),
                    "reads_s": [round(float(t) - made_at, 2) for t in times],
                }
            )
        first_share.append((float(times[0]) - made_at) / made["estimated_times"][i])
        last_after_done.append(float(times[-1]) - made["done_at"][i])
    return {
        "rate_limit_hit_rate": refused / total if total else math.nan,
        "polls_per_completed_job": sum(polls) / completed if completed else math.nan,
        "polls_per_completed_job_fixed_2s": sum(fixed) / completed if completed else math.nan,
        "detect_lag_p99_s": quantile(on_time, 0.99) if on_time else math.nan,
        "detect_lag_p99_s_late_jobs": quantile(late, 0.99) if late else math.nan,
        "detect_lag_p50_s": quantile(on_time, 0.5) if on_time else math.nan,
        "submit_p95_under_poll_load_ratio": load_p95 / base_p95 if base_p95 else math.nan,
        "submit_to_first_step_p95_s": load_p95,
        "submit_to_first_step_p95_s_no_load": base_p95,
        "first_step_parts_no_load": base_parts,
        "first_step_parts_under_load": load_parts,
        "jobs_in_flight": jobs,
        "jobs_completed": completed,
        "jobs_finished_within_estimate": len(on_time),
        "jobs_finished_late": len(late),
        "pipelines_submitted": base_count + load_count,
        "provider_requests": total,
        "provider_429s": refused,
        "requests_by_status": requests,
        # what the requests were: status reads (of every job, the stream's too), chats, jobs made
        "requests_by_route": {
            k: v - stats_before["requests_by_route"].get(k, 0) for k, v in stats_after["requests_by_route"].items()
        },
        "requests_polls": stats_after["polls_total"] - stats_before["polls_total"],
        "requests_chats": stats_after["chat_calls"] - stats_before["chat_calls"],
        "jobs_submitted": stats_after["jobs_total"] - stats_before["jobs_total"],
        "window_s": round(time.time() - made_at, 1),
        "first_read_at_share_of_estimate_p5_p50_p95": [quantile(first_share, q) for q in (0.05, 0.5, 0.95)]
        if first_share
        else None,
        "read_samples": samples,
        "last_read_after_done_s_p5_p50_p95": [quantile(last_after_done, q) for q in (0.05, 0.5, 0.95)]
        if last_after_done
        else None,
        "provider_limit_per_s": LIMIT_PER_S,
        "cadence_stretched_at_end": stretched,
    }
