"""``genline estimate``: what one pipeline would cost, by step, before submitting it.

It reads only the settings and the price catalog: no database, broker or provider is needed.
"""

from __future__ import annotations

import click

from genline.cli.output import emit_json, fail, printable
from genline.config.catalog import load_catalog
from genline.config.errors import GenlineError
from genline.config.settings import load_settings
from genline.pipelines.estimate import Estimate, estimate_for_feature, money

_UNITS = {"tokens": ("token", "tokens"), "images": ("image", "images"), "seconds": ("second", "seconds")}


def describe_estimate(estimate: Estimate) -> str:
    """The estimate for people: one line per step, then the total."""
    rates = "batch" if estimate.batch else "normal"
    lines = [f"Estimate for profile {printable(estimate.profile)} at {rates} rates:"]
    rows = [("step", "model", "units", "cost")]
    for step in estimate.steps:
        if step.unit:
            one, many = _UNITS.get(step.unit, (step.unit, step.unit))
            count = f"{step.units:g}"
            units = f"{count} {one if step.units == 1 else many}"
        else:
            units = "-"
        rows.append((step.kind, printable(step.model) or "-", units, f"${money(step.cost_usd)}"))
    rows.append(("total", "", "", f"${money(estimate.total_usd)}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        lines.append(f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>10}".rstrip())
    return "\n".join(lines)


@click.command()
@click.option("--profile", required=True, help="Which profile of models and lengths to price (e.g. standard).")
@click.option(
    "--description",
    default="",
    help="The product, in the seller's words: the copy prompt is counted with it (default: empty).",
)
@click.option("--feature", help="Which product feature asks: refuse, as submit would, what it may not use.")
@click.option("--batch", is_flag=True, help="Price at the overnight batch rates (where the catalog has them).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
def estimate(profile: str, description: str, feature: str | None, batch: bool, as_json: bool) -> None:
    """Estimate what one pipeline costs, step by step, at the catalog's rates in effect now.

    The copy is counted at its prompt plus the profile's most tokens, the image at one image, the
    video at the profile's seconds, each on the profile's first-choice model.

    \b
    Example:
      genline estimate --profile standard --description "Stoneware mug, speckled glaze"
    """
    try:
        catalog = load_catalog(load_settings().catalog_file)
        result = estimate_for_feature(catalog, profile, feature=feature, description=description, batch=batch)
    except GenlineError as err:
        fail(err, as_json=as_json)
    if as_json:
        emit_json(result.as_json())
    else:
        click.echo(describe_estimate(result))
