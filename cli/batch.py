"""``genline batch``: many requests from a JSON Lines file, bad lines reported by number.

The file is streamed line by line, and a line's request (its image decoded and re-encoded) is
submitted and let go before the next line is read, so memory stays bounded by one line and one
image whatever the file's length. With ``--strict`` the file is read twice: every line is checked
first (nothing kept), and only if all are good is it read again and submitted.

Limits, checked before anything is submitted: the file at most ``MAX_BATCH_BYTES`` and
``MAX_BATCH_LINES`` lines of UTF-8 text (else ``batch_too_large`` or ``invalid_json`` for the whole
file, exit 2); a line at most ``MAX_LINE_BYTES`` (else that line alone fails, ``line_too_long``,
without ever being held in memory whole). JSON nested too deeply is that line's ``invalid_json``.
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from genline.cli.output import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, emit_json, printable
from genline.cli.progress import wait_for
from genline.config.errors import GenlineError, ValidationError
from genline.config.settings import load_settings
from genline.pipelines.request import PipelineRequest, validate_request
from genline.provider.safe_http import STRICT, AddressPolicy

MAX_BATCH_BYTES = 64 * 1024 * 1024
MAX_BATCH_LINES = 10_000
MAX_LINE_BYTES = 1024 * 1024  # a request is a few short fields: its photo goes by URL or upload path
_CHUNK = 1024 * 1024

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar


def check_file(path: Path) -> int:
    """The file's number of lines, once it is known to be within the limits and UTF-8 text."""
    size = path.stat().st_size
    if size > MAX_BATCH_BYTES:
        raise ValidationError(
            f"{path.name} is {size / 1048576:.1f} MB; a batch file may be at most "
            f"{MAX_BATCH_BYTES // 1048576} MB (split it into several).",
            code="batch_too_large",
            field="file",
        )
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    ends_open = False
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError:
                raise ValidationError(
                    f"{path.name} is not a text file of JSON lines.", code="invalid_json", field="file"
                ) from None
            if b"\0" in chunk:
                raise ValidationError(
                    f"{path.name} is not a text file of JSON lines.", code="invalid_json", field="file"
                )
            lines += chunk.count(b"\n")
            ends_open = not chunk.endswith(b"\n")
    lines += int(ends_open)
    if lines > MAX_BATCH_LINES:
        raise ValidationError(
            f"{path.name} has {lines:,} lines; a batch file may have at most {MAX_BATCH_LINES:,} (split it).",
            code="batch_too_large",
            field="file",
        )
    return lines


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """``(number, line)`` for each line; ``None`` for a line over ``MAX_LINE_BYTES``, whose rest is
    read past in pieces and never held whole."""
    with path.open("rb") as f:
        number = 0
        while line := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
                continue
            yield number, line


def _parse(line: bytes | None) -> Any:
    if line is None:
        raise ValidationError(
            f"this line is over {MAX_LINE_BYTES // 1048576} MB, the most one request may be.", code="line_too_long"
        )
    try:
        return json.loads(line.decode())
    except RecursionError:
        raise ValidationError("this line is not valid JSON (nested too deeply).", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ValidationError(f"this line is not valid JSON ({exc.msg}).", code="invalid_json") from None
    except ValueError as exc:  # a number too long to convert, ...
        raise ValidationError(f"this line is not valid JSON ({str(exc)[:60]}).", code="invalid_json") from None


def requests_of(
    path: Path, catalog: Any, upload_dirs: Sequence[Path] = (), url_policy: AddressPolicy = STRICT
) -> Iterator[tuple[int, PipelineRequest | None, dict[str, Any] | None]]:
    """``(number, request, None)`` for a good line, ``(number, None, error)`` for a bad one;
    blank lines and ``#`` comments are skipped. One line at a time."""
    for number, line in _raw_lines(path):
        if line is not None and (not line.strip() or line.lstrip().startswith(b"#")):
            continue
        try:
            request = validate_request(_parse(line), catalog, upload_dirs=upload_dirs, url_policy=url_policy)
        except ValidationError as err:
            yield number, None, {"line": number, "error": err.to_dict()}
            continue
        yield number, request, None


def _say_bad(item: dict[str, Any]) -> None:
    err = item["error"]
    field = f" ({printable(err['field'])})" if err["field"] else ""
    click.echo(f"line {item['line']}: error [{printable(err['code'])}]{field}: {printable(err['message'])}", err=True)


def run_batch(path: Path, *, strict: bool, wait: bool, as_json: bool) -> int:
    from genline.pipelines.api import Genline
    from genline.pipelines.submit import submit_pipeline

    with Genline(load_settings()) as api:
        rt = api.runtime
        total = check_file(path)
        bad: list[dict[str, Any]] = []
        report: Callable[[dict[str, Any]], None] = (lambda _: None) if as_json else _say_bad
        if strict:
            for _, _, error in requests_of(path, rt.catalog, rt.settings.upload_dirs, rt.url_policy):
                if error is not None:
                    bad.append(error)
                    report(error)
            if bad:
                if as_json:
                    emit_json({"submitted": [], "errors": bad, "strict": True})
                else:
                    click.echo(f"{len(bad)} bad line(s); nothing was submitted (--strict).", err=True)
                return EXIT_BAD_INPUT
        submitted: list[dict[str, Any]] = []
        bar: ProgressBar[int] = click.progressbar(
            length=total,
            label="submitting",
            file=io.StringIO() if as_json else None,
            item_show_func=lambda number: f"line {number}" if number else None,
        )
        with bar:
            done = 0
            for number, request, error in requests_of(path, rt.catalog, rt.settings.upload_dirs, rt.url_policy):
                bar.update(number - done, current_item=number)
                done = number
                if request is not None:
                    try:
                        accepted = submit_pipeline(rt, request)
                    except GenlineError as err:
                        error = {"line": number, "error": err.to_dict()}
                    else:
                        submitted.append(
                            {"line": number, "pipeline_id": accepted.pipeline_id, "created": accepted.created}
                        )
                if error is not None:
                    bad.append(error)
                    report(error)
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
