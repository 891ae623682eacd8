"""``genline report --html``: the page, rendered in headless Chromium, holds charts with data.

The demo's requests run in drain mode (tests/test_report.py ``run_demo``); the page is written for
that period and opened by Chromium from a file with networking off, as an operator would open it
offline. The DOM Chromium ends up with is read back: every chart of the demo's feature draws marks
carrying values. A screenshot is taken and checked to show the charts' colours."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from PIL import Image

from genline.config.clock import utcnow
from genline.pipelines.report import build_report
from genline.pipelines.report_html import write_html
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from tests.conftest import require_program
from tests.support.cli import invoke
from tests.test_report import FEATURE, cli_env, run_demo

CHARTS = ("requests", "errors", "text_p95", "spend", "pipelines")


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe is not None
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class Charts(HTMLParser):
    """Each chart of each feature section: its name and the values of its marks."""

    def __init__(self) -> None:
        super().__init__()
        self.feature: str | None = None
        self.chart: str | None = None
        self.found: dict[tuple[str, str], list[float]] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a: dict[str, Any] = dict(attrs)
        if tag == "section" and "feature" in (a.get("class") or ""):
            self.feature = a.get("data-feature")
        if tag == "svg" and a.get("class") == "chart" and self.feature:
            self.chart = a["data-chart"]
            self.found[(self.feature, self.chart)] = []
        if tag in ("rect", "circle") and self.chart and self.feature and "data-value" in a:
            self.found[(self.feature, self.chart)].append(float(a["data-value"]))
        for name in ("src", "href"):
            if a.get(name):
                self.external.append(a[name])

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.chart = None


def test_the_html_report_renders_offline_in_headless_chromium_with_charts_that_hold_data(
    rt: Runtime, sim: SimulatorHandle, upload_dir: Path, tmp_path: Path
) -> None:
    require_program("chromium", "the HTML report is checked in headless Chromium (.ci/run installs it)")
    started = utcnow() - timedelta(seconds=1)
    run_demo(rt, sim, upload_dir)
    report = build_report(rt.db, rt.settings, since=started, until=utcnow() + timedelta(seconds=1))
    page = write_html(report, tmp_path / "report.html")
    assert "<script" not in page.read_text() and "http" not in page.read_text().split("<body>")[0]

    dom = chromium("--virtual-time-budget=2000", "--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = Charts()
    parsed.feed(dom.stdout)
    assert parsed.external == []  # nothing to fetch: the page opens offline
    for chart in CHARTS:
        values = parsed.found.get((FEATURE, chart))
        assert values, f"the {chart} chart of {FEATURE} draws nothing"
        assert all(v > 0 for v in values) and len(values) >= 1
    assert sum(parsed.found[(FEATURE, "pipelines")]) == sum(
        f["pipelines"]["total"] for f in report["features"] if f["feature"] == FEATURE
    )

    shot = tmp_path / "report.png"
    taken = chromium(
        f"--screenshot={shot}", "--window-size=1280,1400", "--hide-scrollbars", page.as_uri(), profile=tmp_path / "p2"
    )
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    keep = os.environ.get("REPORT_SCREENSHOT_TO")  # where a person wants to look at it, if anywhere
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep)
    with Image.open(shot) as image:
        colours = {colour for _count, colour in image.convert("RGB").getcolors(maxcolors=1 << 24) or []}
    for bar in ((0x3B, 0x82, 0xF6), (0x0F, 0x76, 0x6E), (0xB4, 0x23, 0x18)):  # requests, spend, errors
        assert bar in colours, f"no pixel of the chart colour {bar} in the screenshot"


def test_cli_report_html_writes_one_self_contained_page(rt: Runtime, sim: SimulatorHandle, upload_dir: Path) -> None:
    run_demo(rt, sim, upload_dir)
    out = rt.settings.var_dir / "report.html"
    result = invoke(["report", "--since", "1h", "--html", str(out)], cli_env(rt, sim))
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert html.count('class="chart"') >= len(CHARTS) and f"Feature {FEATURE}" in html
    assert "<script" not in html and "<link" not in html
