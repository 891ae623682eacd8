"""``genline report``: each feature's and model's health over a period, beside the guide's targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from genline.cli.output import emit_json, fail, printable
from genline.config.errors import GenlineError

_STATE = {True: "ok", False: "OUTSIDE TARGET", None: "no data"}


@click.command()
@click.option("--since", help="Start of the period: ISO time (UTC unless it names a zone) or a span: 90m, 24h, 7d.")
@click.option("--until", help="End of the period (not included); default now.")
@click.option("--feature", help="Only this feature.")
@click.option("--model", help="Only this model in the per-model part.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write one self-contained HTML page with charts over time (opens offline).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
def report(
    since: str | None, until: str | None, feature: str | None, model: str | None, html_path: Path | None, as_json: bool
) -> None:
    """Requests, latency percentiles by operation, errors by class, cache and rate-limit hit rates,
    spend, pipelines by status, step durations and copies at risk, per feature and per model, over
    a period (the last 24 hours by default). Each figure the integration guide sets a target for is
    shown beside it and flagged when outside it (text p95 < 3 s, errors < 0.1%, cache hits > 40%,
    rate-limit hits < 1%, an image render < 20 s).

    \b
    Example:
      genline report --since 7d --feature listing-video --html var/report.html
    """
    from genline.cli.main import _api
    from genline.pipelines.report import flagged

    try:
        with _api() as api:
            data = api.report(since, until, feature=feature, model=model)
    except GenlineError as err:
        fail(err, as_json=as_json)
    data["flagged"] = flagged(data)
    if html_path is not None:
        from genline.pipelines.report_html import write_html

        write_html(data, html_path)
    if as_json:
        emit_json(data)
        return
    click.echo(render_text(data))
    if html_path is not None:
        click.echo(f"HTML report written to {printable(html_path)}.")


def _f(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else printable(value)


def render_text(data: dict[str, Any]) -> str:
    period = data["period"]
    lines = [f"genline report {period['since']} → {period['until']}"]
    if not data["features"] and not data["models"]:
        lines.append("Nothing happened in this period.")
    for section, key in (("features", "feature"), ("models", "model")):
        for item in data[section]:
            lines.append("")
            lines.append(f"{key} {printable(item[key])}")
            for check in item["checks"]:
                mark = _STATE[check["ok"]]
                lines.append(f"  {check['describe']:<56} {_f(check['value']):>10}  ({check['target']})  {mark}")
            ops = ", ".join(f"{printable(op)} {n}" for op, n in item["requests"]["by_operation"].items())
            lines.append(f"  requests {item['requests']['total']}" + (f" ({ops})" if ops else ""))
            for op, s in item["latency_ms"].items():
                lines.append(
                    f"  latency {printable(op):<7} p50 {_f(s['p50'])} ms, p95 {_f(s['p95'])} ms, p99 {_f(s['p99'])} ms"
                )
            classes = ", ".join(f"{printable(c)} {n}" for c, n in item["errors"]["by_class"].items())
            lines.append(f"  errors {item['errors']['total']}" + (f" ({classes})" if classes else ""))
            lines.append(
                f"  cache hits {item['cache']['hits']} of {item['cache']['chat_calls']} chat calls; "
                f"rate-limit hits {item['rate_limit']['hits']}; spend ${item['spend']['usd']}"
            )
            if key == "feature":
                states = ", ".join(f"{printable(s)} {n}" for s, n in item["pipelines"]["by_status"].items())
                lines.append(f"  pipelines {item['pipelines']['total']}" + (f" ({states})" if states else ""))
                for kind, s in item["steps"].items():
                    sec = s["seconds"]
                    lines.append(
                        f"  step {printable(kind):<6} {s['succeeded']} ok, {s['failed']} failed; "
                        f"p50 {_f(sec['p50'])} s, p95 {_f(sec['p95'])} s, p99 {_f(sec['p99'])} s"
                    )
                lines.append(f"  copies at risk now {item['copies_at_risk']}")
    if data.get("flagged"):
        lines.append("")
        lines.append("Outside the guide's targets: " + ", ".join(printable(x) for x in data["flagged"]))
    return "\n".join(lines)
