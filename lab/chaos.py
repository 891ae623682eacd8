"""``make chaos`` (``python -m lab.chaos``): show, under faults and kills, that nothing is lost or paid twice."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from genline.cli.output import EXIT_ERROR, EXIT_FAILED, emit_json

HEADLINE = (
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
    "max_recovery_wait_s",
    "wall_time_s",
)


@click.command(name="chaos")
@click.option(
    "--pipelines",
    type=click.IntRange(1, 5000),
    default=None,
    help="How many pipelines to run through the chaos.  [default: 300; 40 with --quick]",
)
@click.option("--quick", is_flag=True, help="The CI version: 40 pipelines, one kill or restart of each kind.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=10),
    default=None,
    help="Stop waiting for the pipelines after this many seconds (they then count as not ended).  "
    "[default: 900; 420 with --quick]",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("var/chaos/latest.json"),
    show_default=True,
    help="Where to write the figures (the run's logs go next to it, in run-<id>/logs/).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the figures as one JSON document (progress goes to stderr)."
)
def chaos(pipelines: int | None, quick: bool, timeout_s: float | None, out: Path, as_json: bool) -> None:
    """Run genline's production footprint under fire and check that it keeps its promises.

    \b
    It starts, on this machine: its own redis-server on a free port, a fresh PostgreSQL database
    (on 127.0.0.1:5432, user postgres), moto's S3 server, the provider simulator over HTTP, two
    worker processes and a poller, all on genline's shipped settings. The simulator injects 10%
    429 (with Retry-After), 5% 500/503, 2% answers that hang past the client's 30 s timeout, 1%
    jobs that fail, 1% jobs that stay processing far longer than estimated, result links that
    expire after 60 s for 5% of jobs, a dead result link for every 25th video, and downloads at
    100 KB/s. While the pipelines run: a worker is SIGKILLed every ~5 s and restarted, a worker is
    SIGKILLed while it holds a copy (twice; once with --quick), the poller is killed and restarted
    (twice; once with --quick), Redis is killed and restarted once with its data NOT kept (no RDB,
    no AOF), and every PostgreSQL connection of the run is terminated once.

    \b
    At the end it writes var/chaos/latest.json and exits 1 unless every invariant holds:
      terminal == pipelines                 every pipeline ended (succeeded, failed or cancelled)
      failed_without_reason == 0            every failure has an error code and a message
      duplicate_paid_jobs == 0              the simulator's own count of jobs created twice
      stored_objects_verified == succeeded  each stored video's sha256 equals the provider's
      lost_outputs == 0                     no succeeded pipeline's video is missing or different
      |spend_recorded_usd - spend_billed_by_provider_usd| < $0.001
      users_over_cap == 0                   a per-user daily cap (fit to ~85% of each seller's
                                            pipelines) held; it refused the rest at submit
      secrets_found_in_logs == 0            the API key is in no log line, DB row or Redis key
      max_recovery_wait_s <= 90             a killed worker's step ran again within 90 s
      and every planned kill and restart really happened.
    Exit code 3 means the run itself could not be set up (no redis-server, no PostgreSQL).
    Everything it started is stopped on the way out, also on failure and Ctrl-C.
    """
    from lab.chaos_run import ChaosPlan, run_chaos

    plan = ChaosPlan.quick() if quick else ChaosPlan()
    if pipelines is not None:
        plan.pipelines = pipelines
    if timeout_s is not None:
        plan.timeout_s = timeout_s

    def say(line: str) -> None:
        click.echo(line, err=as_json)

    try:
        result, failures = run_chaos(plan, out, say)
    except KeyboardInterrupt:
        click.echo("chaos: interrupted; everything it started has been stopped", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001  # the harness could not run: say why, in one line
        click.echo(f"chaos: could not run: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if as_json:
        emit_json(result)
    else:
        _print_summary(result, out)
    sys.exit(EXIT_FAILED if failures else 0)


def _print_summary(result: dict[str, Any], out: Path) -> None:
    for key in HEADLINE:
        click.echo(f"  {key:<32} {result[key]}")
    click.echo(f"  {'kills':<32} {result['kills']}")
    click.echo(f"  {'redis_data_kept':<32} {result['redis_data_kept']}")
    if result["failed_by_code"]:
        click.echo(f"  {'failed_by_code':<32} {result['failed_by_code']}")
    click.echo(f"wrote {out}; logs in {result['logs']}")
    if result["invariants_failed"]:
        click.echo("FAILED: " + "; ".join(result["invariants_failed"]))
    else:
        click.echo("every invariant held")


if __name__ == "__main__":
    chaos()
