"""Live progress for people waiting on pipelines: one bar through every step of every pipeline."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import click

from genline.config.constants import PIPELINE_TERMINAL

STEP_WEIGHT = 100


def _done_units(status: dict[str, Any]) -> int:
    if status["status"] in PIPELINE_TERMINAL:
        return len(status["steps"]) * STEP_WEIGHT
    return sum(min(STEP_WEIGHT, int(s["progress"])) for s in status["steps"])


def wait_for(
    ids: Sequence[str],
    read: Callable[[str], dict[str, Any]],
    *,
    show: bool = True,
    timeout_s: float = 3600.0,
    every_s: float = 0.5,
    label: str = "pipelines",
    tick: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Poll our own database (never the provider) until every pipeline has ended."""
    latest = {pid: read(pid) for pid in ids}
    total = sum(len(s["steps"]) * STEP_WEIGHT for s in latest.values())
    deadline = time.monotonic() + timeout_s
    with click.progressbar(
        length=total, label=label, show_percent=True, show_eta=False, file=None if show else io.StringIO()
    ) as bar:  # noqa: SIM115
        shown = 0
        said: dict[str, str] = {}
        narrate = show and not sys.stdout.isatty()  # no bar to redraw in a log: say what changed
        while True:
            latest = {pid: read(pid) for pid in ids}
            if narrate:
                for pid, st in latest.items():
                    where = next(
                        (f"{x['kind']} {x['status']}" for x in st["steps"] if x["status"] != "succeeded"),
                        "all steps done",
                    )
                    line = f"{st['status']} ({where})"
                    if said.get(pid) != line:
                        said[pid] = line
                        click.echo(f"  {pid}: {line}")
            done = sum(_done_units(s) for s in latest.values())
            bar.update(max(0, done - shown))
            shown = max(shown, done)
            finished = sum(1 for s in latest.values() if s["status"] in PIPELINE_TERMINAL)
            bar.label = f"{label} {finished}/{len(ids)} done"
            if finished == len(ids) or time.monotonic() > deadline:
                return latest
            if tick is not None:
                tick()
            time.sleep(every_s)


def follow(api: Any, pipeline_id: str, result: dict[str, Any], *, as_json: bool) -> None:
    """``--wait``: show progress until the pipeline ends, then put its status into ``result``
    (and print it, for people)."""
    from genline.cli.output import describe_status

    final = wait_for([pipeline_id], api.status, show=not as_json)[pipeline_id]
    result.update(final)
    if not as_json:
        click.echo(describe_status(final))


def conclude(result: dict[str, Any], *, wait: bool, as_json: bool) -> None:
    """The end of a command that accepted one pipeline: its JSON document for scripts, and exit 1
    when it was waited for and did not succeed."""
    from genline.cli.output import EXIT_FAILED, emit_json

    if as_json:
        emit_json(result)
    if wait and result.get("status") != "succeeded":
        sys.exit(EXIT_FAILED)
