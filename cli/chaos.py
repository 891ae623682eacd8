"""``genline chaos``: prove, under faults and kills, that nothing is lost or paid twice."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.output import emit_json
from config.logging import configure_logging


@click.command()
@click.option(
    "--pipelines",
    default=300,
    show_default=True,
    type=click.IntRange(1, 5000),
    help="How many pipelines to run through the chaos.",
)
@click.option("--quick", is_flag=True, help="40 pipelines and one kill of each kind (what CI runs).")
@click.option(
    "--timeout",
    "timeout_s",
    default=900.0,
    show_default=True,
    type=float,
    help="Give up waiting for the pipelines after this long.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("var/chaos/latest.json"),
    show_default=True,
    help="Where to write the figures.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON document.")
def chaos(pipelines: int, quick: bool, timeout_s: float, out: Path, as_json: bool) -> None:
    """Run the production footprint (Redis, PostgreSQL, an S3-compatible server, the simulator, two
    worker processes and a poller) under injected provider faults (10% 429, 5% 5xx, 2% timeouts,
    failed and stalled jobs, links that expire in 60 s) while a worker is SIGKILLed every 5 s, the
    poller is killed, Redis is restarted and PostgreSQL connections are dropped.

    \b
    It exits 1 unless every invariant holds:
      every pipeline ended; none failed without a reason; no paid job was started twice;
      every stored video is byte-identical to the provider's; nothing was lost;
      recorded spend equals the provider's bill to the cent; the API key is nowhere in logs or rows.
    Needs redis-server on the PATH and PostgreSQL on 127.0.0.1:5432.
    """
    from workers.chaos import ChaosPlan, run_chaos

    configure_logging("WARNING")
    plan = ChaosPlan(pipelines=40 if quick else pipelines, poller_kills=1 if quick else 2, timeout_s=timeout_s)
    say = (lambda *_: None) if as_json else click.echo  # noqa: E731
    result, failures = run_chaos(plan, out, say)
    if as_json:
        emit_json(result)
    else:
        for key in (
            "pipelines",
            "terminal",
            "succeeded",
            "failed_with_reason",
            "failed_without_reason",
            "duplicate_paid_jobs",
            "stored_objects_verified",
            "lost_outputs",
            "spend_recorded_usd",
            "spend_billed_by_provider_usd",
            "secrets_found_in_logs",
            "wall_time_s",
        ):
            click.echo(f"  {key:<32} {result[key]}")
        click.echo(f"  kills                            {result['kills']}")
        click.echo(f"wrote {out}")
        click.echo("every invariant held" if not failures else "FAILED: " + "; ".join(failures))
    sys.exit(1 if failures else 0)
