"""Copying a large result into S3-compatible storage: memory and speed (``copy_rss_mib_per_gib``,
``copy_vs_raw_boto3``).

The simulator (own process) serves a 1 GiB video (128 MiB with --quick); moto's S3 server (own
process) stores it. Each side of the comparison runs in a fresh child process, so its memory is
its own:

- copy: ``storage.transfer.copy_url_to_store`` with an httpx client and the S3 store, as the store
  step calls it (streamed download → multipart upload → HeadObject verify). After a warm-up copy
  of a small file, the child resets its peak RSS (``/proc/self/clear_refs``) and reports how far
  the peak rose above the RSS it started from.
- raw: the same bytes, downloaded to a local file first (not timed), then uploaded with plain
  ``boto3`` ``upload_file`` (its default multithreaded transfer), timed the same way.

The two sides run raw, copy, copy, raw, and each side's throughput is over both of its runs.

Run as ``python -m lab.bench_copy copy|raw URL ENDPOINT BUCKET KEY [WARMUP_URL]`` for one child.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from lab.bench_http import create_tasks
from lab.bench_sim import SimProcess

MiB = 1024 * 1024
GiB = 1024 * MiB


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _child(mode: str, url: str, endpoint: str, bucket: str, key: str, warmup_url: str | None) -> dict[str, Any]:
    import boto3
    import httpx

    from genline.storage.factory import open_store
    from genline.storage.s3 import make_s3_client

    client = make_s3_client(endpoint_url=endpoint)
    if mode == "copy":
        from genline.storage.transfer import copy_url_to_store

        store = open_store(f"s3://{bucket}/bench", endpoint_url=endpoint)
        http = httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0), follow_redirects=True)
        if warmup_url:  # imports, connections and buffers of a multipart copy, before measuring
            copy_url_to_store(http, store, warmup_url, f"warmup-{key}", expires_at=None, expect_type="video")
            store.delete(f"warmup-{key}")
        baseline = _status("VmRSS")
        _reset_peak()
        started = time.perf_counter()
        info = copy_url_to_store(http, store, url, key, expires_at=None, expect_type="video")
        seconds = time.perf_counter() - started
        size = info.size
        store.delete(key)
    else:
        fd, name = tempfile.mkstemp(prefix="bench-copy-", suffix=".mp4")
        try:
            with os.fdopen(fd, "wb") as out, httpx.stream("GET", url, timeout=60.0) as response:
                for chunk in response.iter_bytes(MiB):
                    out.write(chunk)
            size = os.path.getsize(name)
            raw = boto3.session.Session(region_name="us-east-1").client("s3", endpoint_url=endpoint)
            if warmup_url:
                raw.put_object(Bucket=bucket, Key=f"warmup-{key}", Body=b"x" * MiB)
                raw.delete_object(Bucket=bucket, Key=f"warmup-{key}")
            baseline = _status("VmRSS")
            _reset_peak()
            started = time.perf_counter()
            raw.upload_file(name, bucket, key)
            seconds = time.perf_counter() - started
            raw.delete_object(Bucket=bucket, Key=key)
        finally:
            os.unlink(name)
    del client
    return {
        "bytes": size,
        "seconds": seconds,
        "mib_per_s": size / MiB / seconds,
        "rss_rise_mib": (_status("VmHWM") - baseline) / MiB,
        "baseline_rss_mib": baseline / MiB,
    }


def _run_child(
    mode: str, url: str, endpoint: str, bucket: str, warmup_url: str | None, env: dict[str, str], timeout_s: float
) -> dict[str, Any]:
    key = f"{mode}-{uuid.uuid4().hex[:8]}.mp4"
    args = [sys.executable, "-m", "lab.bench_copy", mode, url, endpoint, bucket, key]
    if warmup_url:
        args.append(warmup_url)
    done = subprocess.run(args, env=env, capture_output=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench copy child ({mode}) failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def _combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput over all runs of one side (bytes / seconds), and the highest RSS rise of any."""
    size = sum(r["bytes"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    return {
        "bytes": results[0]["bytes"],
        "mib_per_s": size / MiB / seconds,
        "rss_rise_mib": max(r["rss_rise_mib"] for r in results),
    }


def measure_copy(var: Path, *, quick: bool, log: Any = print) -> dict[str, Any]:
    from tests.support.s3_server import DUMMY_AWS_ENV, UNSET_AWS_ENV, MotoServer

    size = (128 * MiB) if quick else GiB
    env = {k: v for k, v in os.environ.items() if k not in UNSET_AWS_ENV}
    env.update(DUMMY_AWS_ENV)
    key = "bench-" + uuid.uuid4().hex
    with (
        MotoServer() as moto,
        SimProcess(
            {"video_seconds": 0.0, "rate_limit_per_s": 10**6, "video_bytes": 12 * MiB},
            api_key=key,
            log_path=var / "logs" / "copy-simulator.log",
        ) as sim,
    ):
        import boto3

        s3 = boto3.session.Session(
            region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        ).client("s3", endpoint_url=moto.endpoint_url)
        bucket = "genline-bench-copy"
        s3.create_bucket(Bucket=bucket)
        small = asyncio.run(create_tasks(sim.base_url, key, 1, model="kling-v3-omni", prefix="small"))[0]
        sim.configure(video_bytes=size)
        big = asyncio.run(create_tasks(sim.base_url, key, 1, model="kling-v3-omni", prefix="big"))[0]
        url, warm = (f"{sim.base_url}/files/{t}/0.mp4" for t in (big, small))
        timeout_s = 240.0 if not quick else 90.0
        runs: dict[str, list[dict[str, Any]]] = {"raw": [], "copy": []}
        for mode in ("raw", "copy", "copy", "raw"):  # ABBA: a drift of the machine's speed touches both alike
            runs[mode].append(_run_child(mode, url, moto.endpoint_url, bucket, warm, env, timeout_s))
        raw, copy = (_combine(runs[m]) for m in ("raw", "copy"))
        log(f"  raw boto3 upload_file: {raw['mib_per_s']:.0f} MiB/s, peak RSS +{raw['rss_rise_mib']:.0f} MiB")
        log(f"  copy_url_to_store:     {copy['mib_per_s']:.0f} MiB/s, peak RSS +{copy['rss_rise_mib']:.0f} MiB")
    return {
        "copy_rss_mib_per_gib": copy["rss_rise_mib"],
        "copy_rss_rise_mib": copy["rss_rise_mib"],
        "copy_vs_raw_boto3": copy["mib_per_s"] / raw["mib_per_s"],
        "copy_mib_per_s": copy["mib_per_s"],
        "raw_boto3_mib_per_s": raw["mib_per_s"],
        "raw_boto3_rss_rise_mib": raw["rss_rise_mib"],
        "copy_bytes": copy["bytes"],
    }


if __name__ == "__main__":
    mode, url, endpoint, bucket, key = sys.argv[1:6]
    warmup = sys.argv[6] if len(sys.argv) > 6 else None
    print(json.dumps(_child(mode, url, endpoint, bucket, key, warmup)))
