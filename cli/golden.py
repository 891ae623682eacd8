"""``genline golden``: run the prompt templates' golden set and gate on its checks and estimated cost."""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from genline.cli.output import EXIT_FAILED, emit_json, fail, printable
from genline.config.errors import ConfigError, GenlineError
from genline.config.settings import PRODUCTION_BASE_URL, Secret, Settings, load_settings

if TYPE_CHECKING:
    from genline.pipelines.golden import Cost, Result


@contextlib.contextmanager
def _provider(settings: Settings, use_simulator: bool) -> Iterator[tuple[Settings, str]]:
    """The settings to call with, and what they point at (for the report): the configured provider,
    or an embedded simulator on loopback (stopped on the way out)."""
    if not use_simulator:
        yield settings, settings.provider_base_url
        return
    from genline.provider.simulator import SimConfig, start_simulator

    key = "golden-" + secrets.token_hex(12)  # a throwaway key, so the run exercises auth too
    with start_simulator(SimConfig(api_key=key)) as sim:
        yield (
            settings.with_overrides(provider_base_url=sim.base_url, provider_api_key=Secret(key)),
            (f"the embedded simulator at {sim.base_url}"),
        )


@click.command()
@click.option(
    "--update",
    is_flag=True,
    help="Record this run's estimated costs and template versions as the new baseline (only when every "
    "output check passes), and say what changed.",
)
@click.option(
    "--simulator/--configured-provider",
    "use_simulator",
    default=None,
    help="Run against an embedded provider simulator, or the provider the settings name. Default: the "
    "simulator, unless APIMART_API_KEY (or _FILE) or APIMART_BASE_URL is set.",
)
@click.option(
    "--set",
    "set_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The golden set file (default: config/prompts/golden.json).",
)
@click.option(
    "--baseline",
    "baseline_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The baseline file to compare with and --update (default: config/prompts/golden_baseline.json).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
def golden(
    update: bool, use_simulator: bool | None, set_path: Path | None, baseline_path: Path | None, as_json: bool
) -> None:
    """Check the prompt templates against the golden set (docs/PROMPTS.md).

    Each case's copy prompt is rendered from the current templates and sent to the provider; the
    copy is checked (required fields and phrases, length, banned phrases) and one pipeline's cost is
    estimated. The run fails when a check fails, when the estimated cost of a case or of the set
    (the pipeline, or its copy step) rises more than 10% over the committed baseline, or when a
    template was edited in place instead of added as a new version.

    \b
    Exit codes:
      0  every check held and the cost is within the baseline's +10%
         (with --update: the baseline was rewritten)
      1  the gate failed: a check, a cost rise, an edited template, or a case without a baseline
         (like a failed pipeline you waited for; with --update nothing is written)
      2  the golden set, the baseline or the settings are invalid
      3  the provider could not be reached or answered with an error
    """
    from genline.config.catalog import load_catalog
    from genline.pipelines.golden import (
        BASELINE_FILE,
        Baseline,
        gateway_for,
        load_baseline,
        load_set,
        run_golden,
        write_baseline,
    )

    try:
        settings = load_settings()
        if use_simulator is None:
            use_simulator = settings.provider_api_key is None and settings.provider_base_url == PRODUCTION_BASE_URL
        catalog = load_catalog()  # the baseline is estimated on the catalog committed beside it
        golden_set = load_set(catalog, set_path)
        target = baseline_path or BASELINE_FILE
        previous: Baseline | None = None
        if not update:
            previous = load_baseline(target)
        elif target.exists():
            with contextlib.suppress(ConfigError):  # --update replaces a baseline it cannot read
                previous = load_baseline(target)
        with _provider(settings, use_simulator) as (call_settings, where):
            gateway = gateway_for(call_settings, catalog)
            try:
                # --update judges the outputs only: the costs are what it is about to record.
                result = run_golden(golden_set, gateway, catalog, None if update else previous)
            finally:
                gateway.close()
    except GenlineError as err:
        fail(err, as_json=as_json)

    changes: list[str] | None = None
    if update and result.passed:
        try:
            changes = write_baseline(result, previous, target)
        except GenlineError as err:
            fail(err, as_json=as_json)
    if as_json:
        emit_json({**result.to_dict(), "provider": where, "updated": changes is not None, "changes": changes or []})
    else:
        _report(result, where, len(golden_set.cases))
        if update:
            if changes is None:
                click.echo(f"The baseline {target} was not changed: fix the failed checks first.")
            else:
                click.echo(f"Rewrote the baseline {target}:")
                for line in changes:
                    click.echo(f"  {printable(line)}")
    if not result.passed:
        sys.exit(EXIT_FAILED)


def _figures(cost: Cost, base: Cost | None) -> str:
    from genline.pipelines.golden import percent, rise, usd

    pipeline, copy = usd(cost.pipeline_usd), usd(cost.copy_usd)
    if base is None:
        return f"{pipeline:<12} copy {copy}"
    up_pipeline = f"{pipeline} ({percent(rise(cost.pipeline_usd, base.pipeline_usd))})"
    return f"{up_pipeline:<20} copy {copy} ({percent(rise(cost.copy_usd, base.copy_usd))})"


def _report(result: Result, where: str, count: int) -> None:
    names = ", ".join(t["name"] for t in result.templates.values())
    click.echo(f"golden set: {count} cases against {where} (templates {names})")
    against = " (change over the baseline)" if result.baseline_total else ""
    click.echo(f"  estimated cost of one pipeline, and of its copy step{against}:")
    for c in result.cases:
        chars = len(str(c.output.get("text", "")))
        click.echo(
            f"  {'PASS' if c.passed else 'FAIL'} {printable(c.case.name):<26} {c.case.profile:<9} {chars:>4} chars"
            f"  {_figures(c.cost, c.baseline)}"
        )
    click.echo(f"  set of {count} pipelines{'':<29}{_figures(result.total, result.baseline_total)}")
    for note in result.notes:
        click.echo(f"note: {printable(note)}")
    for failure in result.all_failures:
        click.echo(f"FAILED [{failure.check}]: {printable(failure.message)}")
    if result.passed and result.baseline_total is None:
        click.echo("Passed: every check held.")
    elif result.passed:
        click.echo("Passed: every check held and the estimated cost is within 10% of the baseline.")
    else:
        click.echo(f"Failed: {len(result.all_failures)} problem(s) above.")
