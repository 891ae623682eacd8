"""``genline report --html FILE``: the report as one self-contained page that opens offline.

No script, stylesheet, font or image is fetched: the styles are inline and the charts are inline
SVG drawn here (bars and a line over the report's time buckets, a dashed line at the guide's
target where there is one). A small chart library vendored as package data was considered; the
two shapes needed are a few dozen lines, and a page without JavaScript renders the same in any
browser, a mail client or a file viewer. Every value written into the page is HTML-escaped.

Each chart is an ``<svg class="chart" data-chart=NAME data-points=N>`` whose marks carry their
value (``data-value``): what the headless-browser test reads back from the rendered page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 560, 180
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 14, 28
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2733;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dee6}
.meta{color:#5b6775;margin-bottom:12px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{padding:3px 10px;border-bottom:1px solid #eef1f5;text-align:left}
th{color:#5b6775;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17803d}.out{color:#b42318;font-weight:700}.na{color:#8a94a3}
.charts{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #e3e8ef;border-radius:6px;padding:6px 8px}
.card h3{font-size:13px;margin:2px 0 4px;color:#334155}
svg text{font:10px system-ui,sans-serif;fill:#5b6775}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _nice_max(value: float) -> float:
    """The axis top: the first of 1, 2, 2.5, 5, 10 times a power of ten at or above ``value``."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return value


def chart(
    name: str,
    title: str,
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    kind: str = "bar",
    color: str = "#3b82f6",
    target: float | None = None,
    unit: str = "",
) -> str:
    """One chart as inline SVG: bars (``kind="bar"``) or a line, over ``labels``; a dashed line at
    ``target``. Empty buckets (None) draw nothing."""
    present = [v for v in values if v is not None]
    top = _nice_max(max([*present, target or 0.0, 0.0]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    n = max(1, len(values))
    slot = plot_w / n

    def y(v: float) -> float:
        return TOP + plot_h - (v / top) * plot_h

    parts = [
        f'<svg class="chart" data-chart="{escape(name)}" data-points="{len(present)}" '
        f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" stroke="#cbd5e1"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#cbd5e1"/>',
    ]
    for tick in (0.0, top / 2, top):
        parts.append(f'<text x="{LEFT - 4}" y="{y(tick) + 3:.1f}" text-anchor="end">{_fmt(tick)}{escape(unit)}</text>')
    for i in sorted({0, n // 2, n - 1}) if labels else []:
        label = escape(labels[i][11:19] if len(labels[i]) > 19 else labels[i])
        parts.append(f'<text x="{LEFT + slot * (i + 0.5):.1f}" y="{HEIGHT - 8}" text-anchor="middle">{label}</text>')
    if kind == "bar":
        for i, v in enumerate(values):
            if v is None or v <= 0:
                continue
            h = max(1.0, (v / top) * plot_h)
            parts.append(
                f'<rect class="bar" data-value="{v:g}" x="{LEFT + slot * i + slot * 0.15:.1f}" '
                f'y="{TOP + plot_h - h:.1f}" '
                f'width="{max(1.0, slot * 0.7):.1f}" height="{h:.1f}" fill="{color}"><title>{escape(labels[i])}: '
                f"{_fmt(v)}{escape(unit)}</title></rect>"
            )
    else:
        points = [(LEFT + slot * (i + 0.5), y(v), v) for i, v in enumerate(values) if v is not None]
        if points:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _v in points)
            parts.append(f'<polyline class="line" points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
            parts.extend(
                f'<circle class="dot" data-value="{v:g}" cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>'
                for px, py, v in points
            )
    if target is not None:
        parts.append(
            f'<line class="target" x1="{LEFT}" y1="{y(target):.1f}" x2="{WIDTH - RIGHT}" y2="{y(target):.1f}" '
            f'stroke="#b42318" stroke-dasharray="4 3"/>'
        )
    parts.append("</svg>")
    return f'<div class="card"><h3>{escape(title)}</h3>{"".join(parts)}</div>'


def _checks_table(checks: Sequence[dict[str, Any]]) -> str:
    rows = []
    for c in checks:
        state = {True: ("ok", "within target"), False: ("out", "OUTSIDE TARGET"), None: ("na", "no data")}[c["ok"]]
        rows.append(
            f"<tr><td>{escape(c['describe'])}</td><td class='num'>{escape(_fmt(c['value']))}</td>"
            f"<td>{escape(c['target'])}</td><td class='{state[0]}'>{state[1]}</td></tr>"
        )
    return "<table><tr><th>guide's target</th><th>value</th><th>target</th><th></th></tr>" + "".join(rows) + "</table>"


def _figures_table(item: dict[str, Any]) -> str:
    rows = [
        ("requests", item["requests"]["total"]),
        *((f"requests: {op}", n) for op, n in item["requests"]["by_operation"].items()),
        *(
            (f"latency {op} p50 / p95 / p99 (ms)", f"{_fmt(s['p50'])} / {_fmt(s['p95'])} / {_fmt(s['p99'])}")
            for op, s in item["latency_ms"].items()
        ),
        ("errors", f"{item['errors']['total']} ({_fmt(item['errors']['rate'])})"),
        *((f"errors: {code}", n) for code, n in item["errors"]["by_class"].items()),
        ("cache hits / chat calls", f"{item['cache']['hits']} / {item['cache']['chat_calls']}"),
        ("rate-limit hits", f"{item['rate_limit']['hits']} ({_fmt(item['rate_limit']['rate'])})"),
        ("spend (USD)", f"{item['spend']['usd']} (estimated part {item['spend']['estimated_usd']})"),
    ]
    if "pipelines" in item:
        rows.append(("pipelines", item["pipelines"]["total"]))
        rows.extend((f"pipelines: {st}", n) for st, n in item["pipelines"]["by_status"].items())
        for kind, s in item["steps"].items():
            sec = s["seconds"]
            rows.append(
                (
                    f"{kind} step: ok / failed, p50 / p95 / p99 (s)",
                    f"{s['succeeded']} / {s['failed']}, {_fmt(sec['p50'])} / {_fmt(sec['p95'])} / {_fmt(sec['p99'])}",
                )
            )
        rows.append(("copies at risk (now)", item["copies_at_risk"]))
    body = "".join(f"<tr><td>{escape(k)}</td><td class='num'>{escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _feature_charts(buckets: Sequence[dict[str, Any]]) -> str:
    labels = [b["start"] for b in buckets]
    return (
        '<div class="charts">'
        + "".join(
            [
                chart("requests", "Provider requests", labels, [float(b["requests"]) for b in buckets]),
                chart(
                    "errors",
                    "Errors and rate-limit hits",
                    labels,
                    [float(b["errors"] + b["rate_limited"]) for b in buckets],
                    color="#b42318",
                ),
                chart(
                    "text_p95",
                    "Text (chat) latency p95, ms",
                    labels,
                    [b["text_p95_ms"] for b in buckets],
                    kind="line",
                    color="#7c3aed",
                    target=3000.0,
                ),
                chart("spend", "Spend, USD", labels, [float(b["spend_usd"]) for b in buckets], color="#0f766e"),
                chart(
                    "pipelines", "Pipelines started", labels, [float(b["pipelines"]) for b in buckets], color="#a16207"
                ),
            ]
        )
        + "</div>"
    )


def render_html(report: dict[str, Any]) -> str:
    """The whole page for a report built by ``report.build_report`` (with its series)."""
    series = report.get("series") or {"bucket_s": 0, "features": {}}
    sections = []
    for item in report["features"]:
        name = item["feature"]
        sections.append(
            f"<section class='feature' data-feature='{escape(name)}'><h2>Feature {escape(name)}</h2>"
            + _checks_table(item["checks"])
            + _feature_charts(series["features"].get(name, []))
            + _figures_table(item)
            + "</section>"
        )
    for item in report["models"]:
        sections.append(
            f"<section class='model'><h2>Model {escape(item['model'])}</h2>"
            + _checks_table(item["checks"])
            + _figures_table(item)
            + "</section>"
        )
    period = report["period"]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>genline report {escape(period['since'])} – {escape(period['until'])}</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>genline report</h1>"
        f"<div class='meta'>From {escape(period['since'])} to {escape(period['until'])}; charts in buckets of "
        f"{series['bucket_s']} s; copies at risk as of {escape(report['as_of'])}.</div>"
        + ("".join(sections) or "<p>Nothing happened in this period.</p>")
        + "</body></html>"
    )


def write_html(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
