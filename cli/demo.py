"""``genline demo``: the whole system on this machine, end to end, in one command.

It starts the provider simulator, a Celery worker and the poller as real processes on the
zero-setup default (SQLite, local files, the embedded broker), submits sample pipelines through
the same API an application service uses, shows live progress, and prints each pipeline's status,
cost and stored video. It stops everything it started, and exits 0 only if every sample succeeded.
"""

from __future__ import annotations

import secrets
import sys
import time
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from genline.cli.output import emit_json, fail, printable
from genline.cli.progress import wait_for
from genline.config.errors import GenlineError
from genline.config.logging import configure_logging
from genline.config.settings import Secret, load_settings

SAMPLES = (
    ("Hand-thrown stoneware mug with a speckled oatmeal glaze, 350 ml, dishwasher safe.", "standard"),
    ("Full-grain leather weekender bag in cognac, brass hardware, fits carry-on limits.", "standard"),
    ("Bamboo desk lamp with a warm dimmable LED and a hidden USB-C charging port.", "draft"),
    ("Merino wool running socks, cushioned heel, sold in packs of three.", "standard"),
    ("Cold-pressed olive oil from a single Cretan grove, 500 ml dark glass bottle.", "premium"),
)


def sample_image(folder: Path, index: int) -> Path:
    """A real PNG product photo stand-in (the simulator's deterministic renderer draws it), kept in
    an upload folder (``samples/`` in the first of GENLINE_UPLOAD_DIRS): the demo submits it by
    path, as a service that saves its users' uploads there would."""
    from genline.provider.simulator.media import png_bytes

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"product-{index + 1}.png"
    if not path.exists():
        path.write_bytes(png_bytes(f"sample-product-{index}".encode(), 96))
    return path


@click.command()
@click.option("--count", default=3, show_default=True, type=click.IntRange(1, 200), help="Sample pipelines to run.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 8), help="Worker processes to start.")
@click.option(
    "--video-seconds",
    default=4.0,
    show_default=True,
    type=float,
    help="How long the simulated provider takes to render a video.",
)
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, type=float, help="Give up after this long.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON document.")
def demo(count: int, workers: int, video_seconds: float, timeout_s: float, as_json: bool) -> None:
    """Run sample pipelines end to end on this machine and report each one's outcome."""
    from genline.pipelines.api import Genline
    from genline.pipelines.runtime import Runtime
    from genline.provider.simulator import SimConfig, start_simulator
    from genline.storage.migrate import upgrade
    from genline.tasks.app import CeleryDispatcher, make_celery
    from genline.workers.processes import ProcessGroup

    try:
        settings = load_settings()
    except GenlineError as err:
        fail(err, as_json=as_json)
    configure_logging("WARNING")
    say = (lambda *_: None) if as_json else click.echo  # noqa: E731
    demo_key = "demo-" + secrets.token_hex(12)  # a throwaway key, so the demo exercises auth too
    upgrade(settings.database_url)
    sim = start_simulator(SimConfig(api_key=demo_key, image_seconds=1.5, video_seconds=video_seconds))
    # The simulator listens on loopback, which genline reaches only when it is allowed to.
    allowed = (*settings.allow_private_hosts, ip_network(urlsplit(sim.base_url).hostname or "127.0.0.1"))
    settings = settings.with_overrides(
        provider_base_url=sim.base_url, provider_api_key=Secret(demo_key), allow_private_hosts=allowed
    )
    env = {
        **settings.child_env(),
        "APIMART_API_KEY": demo_key,
        "GENLINE_ALLOW_PRIVATE_HOSTS": ",".join(str(host) for host in allowed),
    }
    env.pop("APIMART_API_KEY_FILE", None)
    say(f"simulator listening on {sim.base_url}; state in {settings.var_dir}")
    group = ProcessGroup(log_dir=settings.var_dir / "logs", env=env)
    rt = Runtime.from_settings(settings, CeleryDispatcher(make_celery(settings)))
    run = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    try:
        for n in range(workers):
            group.start_worker(f"worker{n + 1}")
        group.start_poller()
        say(f"started {workers} worker process(es) and the poller; logs in {group.log_dir}")
        api = Genline(runtime=rt)
        ids = []
        for i in range(count):
            description, profile = SAMPLES[i % len(SAMPLES)]
            accepted = api.submit(
                {
                    "user_id": f"demo-seller-{i % 3 + 1}",
                    "feature": "listing-video",
                    "description": description,
                    "image": str(sample_image(settings.upload_dirs[0] / "samples", i % len(SAMPLES))),
                    "profile": profile,
                    "idempotency_key": f"demo-{run}-{i}",
                }
            )
            ids.append(accepted.pipeline_id)
        say(f"submitted {count} sample pipeline(s): copy → image → video → stored")
        final = wait_for(ids, api.status, show=not as_json, timeout_s=timeout_s, label="demo", tick=group.check)
    except (GenlineError, RuntimeError) as err:
        if isinstance(err, GenlineError):
            fail(err, as_json=as_json)
        click.echo(f"error [demo_process_died]: {err}", err=True)
        sys.exit(3)
    finally:
        # A worker's warm shutdown takes a few seconds (workers/processes.py says where they go).
        say(f"stopping the worker{'s' if workers > 1 else ''}, the poller and the simulator…")
        group.stop()
        sim.stop()
        rt.close()
    report(final, as_json=as_json)


def report(final: dict[str, dict[str, Any]], *, as_json: bool) -> None:
    rows = []
    for pid, st in final.items():
        video = st.get("video") or {}
        location: str | None = video.get("location")
        exists = location is not None and (not location.startswith("/") or Path(location).exists())
        rows.append(
            {
                "pipeline_id": pid,
                "status": st["status"],
                "profile": st["profile"],
                "cost_usd": st["cost_usd"],
                "video": location,
                "video_bytes": video.get("size"),
                "video_exists": exists,
                "error": st.get("error"),
            }
        )
    ok = [r for r in rows if r["status"] == "succeeded" and r["video_exists"]]
    if as_json:
        emit_json({"pipelines": rows, "succeeded": len(ok), "total": len(rows)})
    else:
        click.echo("")
        for r in rows:
            line = f"{r['pipeline_id']}  {r['status']:<9}  {r['profile']:<8}  ${r['cost_usd']:<10}"
            if r["video"]:
                line += f"  video: {r['video']} ({r['video_bytes']} bytes)"
            if r["error"]:
                line += f"  reason [{printable(r['error']['code'])}]: {printable(r['error']['message'])}"
            click.echo(line)
        if len(ok) == len(rows):
            click.echo(f"All {len(rows)} sample pipelines succeeded; every stored video exists.")
        else:
            click.echo(f"{len(rows) - len(ok)} of {len(rows)} sample pipelines did not succeed.")
    sys.exit(0 if len(ok) == len(rows) else 1)
