"""``genline batch``: many requests from a JSON Lines file, bad lines reported by number."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import click

from genline.cli.output import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, emit_json
from genline.cli.progress import wait_for
from genline.config.errors import GenlineError, ValidationError
from genline.config.settings import load_settings
from genline.pipelines.request import PipelineRequest, validate_request


def read_lines(path: Path, catalog: Any) -> tuple[list[tuple[int, PipelineRequest]], list[dict[str, Any]]]:
    good: list[tuple[int, PipelineRequest]] = []
    bad: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValidationError(
            f"{path.name} is not a text file of JSON lines.", code="invalid_json", field="file"
        ) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValidationError(f"this line is not valid JSON ({exc.msg}).", code="invalid_json") from None
            good.append((number, validate_request(raw, catalog)))
        except ValidationError as err:
            bad.append({"line": number, "error": err.to_dict()})
    return good, bad


def _say_bad(item: dict[str, Any]) -> None:
    err = item["error"]
    field = f" ({err['field']})" if err["field"] else ""
    click.echo(f"line {item['line']}: error [{err['code']}]{field}: {err['message']}", err=True)


def run_batch(path: Path, *, strict: bool, wait: bool, as_json: bool) -> int:
    from genline.pipelines.api import Genline
    from genline.pipelines.submit import submit_pipeline

    with Genline(load_settings()) as api:
        rt = api.runtime
        good, bad = read_lines(path, rt.catalog)
        for item in bad:
            if not as_json:
                _say_bad(item)
        submitted: list[dict[str, Any]] = []
        if bad and strict:
            if as_json:
                emit_json({"submitted": [], "errors": bad, "strict": True})
            else:
                click.echo(f"{len(bad)} bad line(s); nothing was submitted (--strict).", err=True)
            return EXIT_BAD_INPUT
        with click.progressbar(
            good,
            label="submitting",
            file=io.StringIO() if as_json else None,
            item_show_func=lambda item: f"line {item[0]}" if item else None,
        ) as bar:
            for number, request in bar:
                try:
                    accepted = submit_pipeline(rt, request)
                except GenlineError as err:
                    bad.append({"line": number, "error": err.to_dict()})
                    if not as_json:
                        _say_bad(bad[-1])
                    continue
                submitted.append({"line": number, "pipeline_id": accepted.pipeline_id, "created": accepted.created})
        new = sum(1 for s in submitted if s["created"])
        result: dict[str, Any] = {"submitted": submitted, "errors": bad, "new": new, "existing": len(submitted) - new}
        if wait and submitted:
            final = wait_for([s["pipeline_id"] for s in submitted], api.status, show=not as_json)
            for s in submitted:
                s["status"] = final[s["pipeline_id"]]["status"]
        if as_json:
            emit_json(result)
        else:
            click.echo(
                f"{len(submitted)} pipeline(s) accepted: {new} new, {len(submitted) - new} already "
                f"submitted with the same key; {len(bad)} bad line(s)."
            )
        if bad:
            return EXIT_BAD_INPUT
        if wait and any(s.get("status") != "succeeded" for s in submitted):
            return EXIT_FAILED
        return EXIT_OK
