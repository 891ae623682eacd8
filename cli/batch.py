"""``genline batch``: many requests from a JSON Lines file, bad lines reported by number.

The file is streamed line by line, and a line's request (its image decoded and re-encoded) is
submitted and let go before the next line is read, so memory stays bounded by one line and one
image whatever the file's length. With ``--strict`` the file is read twice: every line is checked
first (nothing kept), and only if all are good is it read again and submitted.

Limits, checked before anything is submitted: the file at most ``MAX_BATCH_BYTES`` and
``MAX_BATCH_LINES`` lines of UTF-8 text (else ``batch_too_large`` or ``invalid_json`` for the whole
file, exit 2); a line at most ``MAX_LINE_BYTES`` (else that line alone fails, ``line_too_long``,
without ever being held in memory whole). JSON nested too deeply is that line's ``invalid_json``.

Lines are batch work: priority ``batch`` unless a line names another, so they go to the batch
queue, run at the provider's batch price and take at most ``GENLINE_BATCH_MAX_RUNNING`` workers.
``--window 01:00-06:00`` (UTC) records a window on each new batch pipeline; the workers start it
only inside it (``pipelines/windows.py``). A line without an ``idempotency_key`` gets one derived
from its bytes, so submitting the same file again is a no-op: the same pipelines are answered,
nothing is created or nudged. A line whose pipeline failed is answered with it (or with its latest
retry) and named in the summary; ``--retry-failed`` submits it again under the next derived key,
``<key>:retry-<n>``, and says so. The summary gives every line's pipeline id, whether it is new,
existing or retried, its status and error code (``--json``: one document); ``--wait`` shows how
many pipelines have ended and the running cost until all have.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
from sqlalchemy import Table, bindparam, select

from genline.cli.output import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, emit_json, printable
from genline.config.clock import utcnow
from genline.config.constants import PIPELINE_TERMINAL, PipelineStatus
from genline.config.errors import GenlineError, ValidationError
from genline.config.settings import load_settings
from genline.pipelines.request import PipelineRequest, validate_request
from genline.pipelines.runtime import Runtime
from genline.pipelines.windows import BATCH, Window, next_opening, parse_window, submit_in_window
from genline.provider.safe_http import STRICT, AddressPolicy
from genline.storage.models import Pipeline

MAX_BATCH_BYTES = 64 * 1024 * 1024
MAX_BATCH_LINES = 10_000
MAX_LINE_BYTES = 1024 * 1024  # a request is a few short fields: its photo goes by URL or upload path
_CHUNK = 1024 * 1024
MAX_KEY_CHARS = 200  # an idempotency key's most (pipelines/request.py)
_PIPELINES = cast(Table, Pipeline.__table__)

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


def _as_batch_line(raw: Any, line: bytes) -> Any:
    """A line's request as ``genline batch`` submits it: batch priority unless the line names one,
    and, when it has no ``idempotency_key``, one derived from the line's own bytes (the same line,
    the same key: submitting the file again creates nothing new)."""
    if not isinstance(raw, dict):
        return raw  # validate_request says what is wrong with it
    if "idempotency_key" not in raw:
        raw["idempotency_key"] = "line-" + hashlib.sha256(line.strip()).hexdigest()[:32]
    raw.setdefault("priority", BATCH)
    return raw


def requests_of(
    path: Path, catalog: Any, upload_dirs: Sequence[Path] = (), url_policy: AddressPolicy = STRICT
) -> Iterator[tuple[int, PipelineRequest | None, dict[str, Any] | None]]:
    """``(number, request, None)`` for a good line, ``(number, None, error)`` for a bad one;
    blank lines and ``#`` comments are skipped. One line at a time."""
    for number, line in _raw_lines(path):
        if line is not None and (not line.strip() or line.lstrip().startswith(b"#")):
            continue
        try:
            raw = _as_batch_line(_parse(line), line or b"")
            request = validate_request(raw, catalog, upload_dirs=upload_dirs, url_policy=url_policy)
        except ValidationError as err:
            yield number, None, {"line": number, "error": err.to_dict()}
            continue
        yield number, request, None


def _say_bad(item: dict[str, Any]) -> None:
    err = item["error"]
    field = f" ({printable(err['field'])})" if err["field"] else ""
    click.echo(f"line {item['line']}: error [{printable(err['code'])}]{field}: {printable(err['message'])}", err=True)


# --- a line's pipeline, its retries ------------------------------------------------------------------
_BY_KEY = select(_PIPELINES.c.id, _PIPELINES.c.status).where(
    _PIPELINES.c.user_id == bindparam("user_id"), _PIPELINES.c.idempotency_key == bindparam("key")
)


def retry_key(base: str, n: int) -> str:
    """The key of a line's ``n``-th retry: ``<base>:retry-<n>``, within the 200 characters a key
    may have (a long base is cut and a digest of it kept, so two long keys never share retries)."""
    suffix = f":retry-{n}"
    if len(base) + len(suffix) <= MAX_KEY_CHARS:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:16]
    return f"{base[: MAX_KEY_CHARS - len(suffix) - len(digest) - 1]}-{digest}{suffix}"


def latest_of_line(rt: Runtime, user_id: str, base_key: str, first: tuple[str, str]) -> tuple[str, str, int]:
    """The line's current pipeline ``(id, status, retries)``: the last of its retries, if any."""
    latest, n = first, 0
    with rt.db.engine.connect() as conn:
        while row := conn.execute(_BY_KEY, {"user_id": user_id, "key": retry_key(base_key, n + 1)}).first():
            latest, n = (row.id, row.status), n + 1
    return latest[0], latest[1], n


def submit_line(
    rt: Runtime, number: int, request: PipelineRequest, window: Window | None, *, retry_failed: bool
) -> dict[str, Any]:
    """Submit one line; its entry in the summary. A line whose pipeline failed is answered with its
    latest retry, and with ``retry_failed`` submitted again under the next retry key."""
    accepted = submit_in_window(rt, request, window)
    entry: dict[str, Any] = {
        "line": number,
        "pipeline_id": accepted.pipeline_id,
        "created": accepted.created,
        "outcome": "new" if accepted.created else "existing",
        "idempotency_key": request.idempotency_key,
    }
    if accepted.created or accepted.status != PipelineStatus.FAILED:
        return entry
    pipeline_id, status, retries = latest_of_line(
        rt, request.user_id, request.idempotency_key, (accepted.pipeline_id, accepted.status)
    )
    if retries:
        entry.update(pipeline_id=pipeline_id, idempotency_key=retry_key(request.idempotency_key, retries))
    if status != PipelineStatus.FAILED or not retry_failed:
        return entry
    key = retry_key(request.idempotency_key, retries + 1)
    again = submit_in_window(rt, replace(request, idempotency_key=key), window)
    entry.update(
        pipeline_id=again.pipeline_id,
        created=again.created,
        outcome="retried",
        idempotency_key=key,
        retried_from=pipeline_id,
    )
    return entry


# --- reading the batch's pipelines -------------------------------------------------------------------
_READ_CHUNK = 500


def read_pipelines(rt: Runtime, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{id: {status, error_code, cost_usd, estimated_cost_usd}}`` for many pipelines, a few
    hundred per query (never one query per pipeline)."""
    found: dict[str, dict[str, Any]] = {}
    query = select(
        _PIPELINES.c.id,
        _PIPELINES.c.status,
        _PIPELINES.c.error_code,
        _PIPELINES.c.cost_usd,
        _PIPELINES.c.estimated_cost_usd,
    ).where(_PIPELINES.c.id.in_(bindparam("ids", expanding=True)))
    unique = list(dict.fromkeys(ids))
    with rt.db.engine.connect() as conn:
        for i in range(0, len(unique), _READ_CHUNK):
            for row in conn.execute(query, {"ids": unique[i : i + _READ_CHUNK]}):
                found[row.id] = {
                    "status": row.status,
                    "error_code": row.error_code,
                    "cost_usd": Decimal(str(row.cost_usd or 0)),
                    "estimated_cost_usd": Decimal(str(row.estimated_cost_usd or 0)),
                }
    return found


def running_cost(states: dict[str, dict[str, Any]]) -> tuple[int, Decimal]:
    """How many of the pipelines have ended, and what they cost so far (a pipeline's cost is
    summed from its provider calls when it ends)."""
    ended = sum(1 for s in states.values() if s["status"] in PIPELINE_TERMINAL)
    return ended, sum((s["cost_usd"] for s in states.values()), Decimal(0))


def watch(
    rt: Runtime,
    ids: Sequence[str],
    *,
    show: bool,
    every_s: float = 1.0,
    timeout_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, dict[str, Any]]:
    """Read our own database (never the provider) until every pipeline has ended, showing how
    many have and the running cost: a bar on a terminal, a line per change in a log."""
    unique = list(dict.fromkeys(ids))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    tty = show and sys.stdout.isatty()
    bar: ProgressBar[int] = click.progressbar(
        length=len(unique), label="batch", show_percent=True, show_eta=False, file=None if tty else io.StringIO()
    )
    said: tuple[int, Decimal] | None = None
    with bar:
        while True:
            states = read_pipelines(rt, unique)
            ended, cost = running_cost(states)
            bar.label = f"batch {ended}/{len(unique)} done, ${cost:.4f} so far"
            bar.update(ended - bar.pos)
            if show and not tty and said != (ended, cost):
                said = (ended, cost)
                click.echo(f"  {ended}/{len(unique)} pipeline(s) ended; ${cost:.4f} spent so far.")
            if ended == len(unique) or (deadline is not None and time.monotonic() > deadline):
                return states
            sleep(every_s)


# --- the command ---------------------------------------------------------------------------------------
def _say_line(entry: dict[str, Any]) -> None:
    how = {"new": "new", "existing": "already submitted", "retried": "retried under a new key"}[entry["outcome"]]
    extra = f" (failed pipeline {entry['retried_from']})" if entry.get("retried_from") else ""
    error = f" [{printable(entry['error_code'])}]" if entry.get("error_code") else ""
    click.echo(f"line {entry['line']}: {entry['pipeline_id']} {how}{extra}, {printable(entry['status'])}{error}")


def _summary(submitted: list[dict[str, Any]], bad: list[dict[str, Any]], window: Window | None) -> str:
    new = sum(1 for s in submitted if s["outcome"] == "new")
    existing = sum(1 for s in submitted if s["outcome"] == "existing")
    retried = [s["line"] for s in submitted if s["outcome"] == "retried"]
    text = f"{len(submitted)} pipeline(s) accepted: {new} new, {existing} already submitted with the same key"
    if retried:
        text += f", {len(retried)} retried under a new key (line(s) {', '.join(map(str, retried))})"
    text += f"; {len(bad)} bad line(s)."
    failed = [s["line"] for s in submitted if s["status"] == PipelineStatus.FAILED and s["outcome"] != "retried"]
    if failed:
        text += (
            f" {len(failed)} line(s) have a failed pipeline (line(s) {', '.join(map(str, failed[:20]))}"
            f"{', ...' if len(failed) > 20 else ''}); run again with --retry-failed to retry them."
        )
    if window is not None:
        opening = next_opening(window, utcnow())
        when = "now" if opening is None else f"from {opening:%Y-%m-%d %H:%M} UTC"
        text += f" Batch work starts only inside {window} UTC ({when})."
    return text


def run_batch(
    path: Path,
    *,
    strict: bool,
    wait: bool,
    as_json: bool,
    window: str | None = None,
    retry_failed: bool = False,
) -> int:
    from genline.pipelines.api import Genline

    hours = parse_window(window) if window is not None else None
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
                        submitted.append(submit_line(rt, number, request, hours, retry_failed=retry_failed))
                    except GenlineError as err:
                        error = {"line": number, "error": err.to_dict()}
                if error is not None:
                    bad.append(error)
                    report(error)
        ids = [s["pipeline_id"] for s in submitted]
        states = watch(rt, ids, show=not as_json) if wait and ids else read_pipelines(rt, ids)
        for s in submitted:
            state = states.get(s["pipeline_id"], {})
            s["status"] = state.get("status")
            s["error_code"] = state.get("error_code")
            s["cost_usd"] = str(state.get("cost_usd", Decimal(0)))
        _, cost = running_cost(states)
        estimated = sum((st["estimated_cost_usd"] for st in states.values()), Decimal(0))
        new = sum(1 for s in submitted if s["outcome"] == "new")
        existing = sum(1 for s in submitted if s["outcome"] == "existing")
        retried = [s["line"] for s in submitted if s["outcome"] == "retried"]
        if as_json:
            emit_json(
                {
                    "submitted": submitted,
                    "errors": bad,
                    "new": new,
                    "existing": existing,
                    "retried": retried,
                    "window": str(hours) if hours is not None else None,
                    "cost_usd": str(cost),
                    "estimated_cost_usd": str(estimated),
                }
            )
        else:
            for s in submitted:
                _say_line(s)
            click.echo(_summary(submitted, bad, hours))
            click.echo(f"Cost so far ${cost:.4f} of an estimated ${estimated:.4f}.")
        if bad:
            return EXIT_BAD_INPUT
        if wait and any(s.get("status") != PipelineStatus.SUCCEEDED for s in submitted):
            return EXIT_FAILED
        return EXIT_OK
