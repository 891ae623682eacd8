"""``genline promote``: render a finished draft again on a costlier profile, paying only for the video.

Exit codes as ``submit``: 0 accepted (or, with --wait, succeeded); 1 a waited-for pipeline failed;
2 bad input (unknown pipeline, a draft not finished, a profile the feature may not use, a spend cap;
nothing was created); 3 any other error.
"""

from __future__ import annotations

from typing import Any

import click

from genline.cli.output import fail, printable
from genline.cli.progress import conclude, follow
from genline.config.errors import GenlineError


def describe_promotion(result: dict[str, Any]) -> str:
    """The promotion for people: the new pipeline, that copy and image are reused, the estimate."""
    p = printable
    note = "new" if result["created"] else f"already promoted with this key; it is {p(result['status'])}"
    lines = [
        f"Promoted pipeline {p(result['promoted_from'])} to profile {p(result['profile'])}: "
        f"pipeline {p(result['pipeline_id'])} ({note}); idempotency key {p(result['idempotency_key'])}.",
        "Copy and image are reused from the draft: no new copy or image charge; only the video is rendered.",
    ]
    rows = [("step", "model", "units", "cost")]
    for step in result["estimate"].get("steps", []):
        if step.get("reused"):
            units = "reused"
        elif step.get("unit"):
            units = f"{step['units']:g} {step['unit']}"
        else:
            units = "-"
        rows.append((p(step["kind"]), p(step.get("model") or "-"), units, f"${p(step['cost_usd'])}"))
    rows.append(("total", "", "", f"${p(result['estimated_cost_usd'])}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines.append("Estimate:")
    for row in rows:
        lines.append(f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>10}".rstrip())
    return "\n".join(lines)


@click.command()
@click.argument("pipeline_id")
@click.option(
    "--profile",
    default="premium",
    show_default=True,
    help="The profile to render the video on again (the draft's feature must be allowed it).",
)
@click.option(
    "--idempotency-key",
    help="Same key, same promotion: running it again creates nothing new (default: one per draft and profile).",
)
@click.option("--wait", is_flag=True, help="Stay and show progress until the promoted pipeline ends.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
def promote(pipeline_id: str, profile: str, idempotency_key: str | None, wait: bool, as_json: bool) -> None:
    """Render a finished draft again on PROFILE (default premium) as a new pipeline linked to it.

    The draft's copy and image are reused as they are (no second copy or image charge); only the
    video is rendered on the new profile's model and length, then stored. The new pipeline is
    estimated and reserved against the spend caps like any submit. Promoting the same draft to the
    same profile again returns the same pipeline.

    \b
    Example:
      genline promote pl_0123abcd --profile premium --wait
    """
    from genline.cli.main import _api
    from genline.pipelines.promote import default_key, promotion_of

    try:
        with _api() as api:
            accepted = api.promote(pipeline_id, profile, idempotency_key=idempotency_key)
            linked = promotion_of(api.runtime, accepted.pipeline_id)
            result: dict[str, Any] = {
                "pipeline_id": accepted.pipeline_id,
                "created": accepted.created,
                "promoted_from": linked["promoted_from"],
                "profile": linked["profile"],
                "idempotency_key": idempotency_key or default_key(pipeline_id, profile),
                "status": accepted.status,
                "estimated_cost_usd": str(accepted.estimated_cost_usd),
                "reused": ["copy", "image"],
                "estimate": linked["estimate"],
            }
            if not as_json:
                click.echo(describe_promotion(result))
            if wait:
                follow(api, accepted.pipeline_id, result, as_json=as_json)
    except GenlineError as err:
        fail(err, as_json=as_json)
    conclude(result, wait=wait, as_json=as_json)
