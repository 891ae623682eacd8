"""``genline retention``: remove stored outputs and audit rows past their feature's retention, and
abort multipart uploads left unfinished (``pipelines/retention.py``); ``--dry-run`` only shows it."""

from __future__ import annotations

import click

from genline.cli.output import emit_json, fail, printable
from genline.config.errors import GenlineError


@click.command()
@click.option("--dry-run", is_flag=True, help="Show what would go; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
def retention(dry_run: bool, as_json: bool) -> None:
    """Per feature (the catalog's outputs_days and audit_days; absent keeps forever): the stored
    video and image of pipelines that ended longer ago, and audit rows older (rolled up into daily
    totals first, so `genline report` keeps their spend and counts); and multipart uploads
    unfinished for a day. The pollers run the same pass every GENLINE_RETENTION_EVERY_S.

    \b
    Example:
      genline retention --dry-run
    """
    from genline.cli.main import _settings_with_state
    from genline.pipelines.retention import run_retention
    from genline.pipelines.runtime import Runtime

    try:
        rt = Runtime.from_settings(_settings_with_state())
        try:
            result = run_retention(rt, dry_run=dry_run)
        finally:
            rt.close()
    except GenlineError as err:
        fail(err, as_json=as_json)
    data = result.as_dict()
    if as_json:
        emit_json(data)
        return
    verb = "would go" if dry_run else "went"
    click.echo(f"Retention{' (dry run)' if dry_run else ''}: what {verb}.")
    if not data["features"]:
        click.echo("  No stored outputs or audit rows are past their feature's retention.")
    for name, f in data["features"].items():
        click.echo(
            f"  feature {printable(name)}: {f['pipelines']} pipelines' outputs, {f['objects']} objects, "
            f"{f['bytes']:,} bytes; {f['audit_rows']} audit rows (${f['audit_cost_usd']} rolled into totals)"
        )
    click.echo(f"  unfinished multipart uploads aborted: {data['uploads_aborted']}")
