"""``genline``: submit pipelines, watch them, and run the parts of the system.

Exit codes: 0 done; 1 a waited-for pipeline failed; 2 bad input or bad configuration (nothing was
created); 3 any other error (provider, storage, infrastructure).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

from genline.cli.boundary import GenlineGroup  # what escapes a subcommand: one error line, exit 2 or 3
from genline.cli.output import EXIT_BAD_INPUT, EXIT_ERROR, describe_status, emit_json, fail, printable
from genline.cli.progress import conclude, follow
from genline.config.errors import GenlineError, ValidationError
from genline.config.logging import configure_logging
from genline.config.settings import Settings, load_settings

JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")


def _settings_with_state() -> Settings:
    """The settings of a command that works on existing state (submit, status, cancel, batch).
    Without genline's database where the settings point (genline run from another folder than the
    one ``make demo`` ran in, say), one plain error says where it looked; nothing is created."""
    from genline.storage.migrate import require_current

    settings = load_settings()
    require_current(settings.database_url, var_dir=settings.var_dir)
    return settings


def _api() -> Any:
    from genline.pipelines.api import Genline

    return Genline(_settings_with_state())


@click.group(cls=GenlineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option("0.1.0", prog_name="genline")
def cli() -> None:
    """genline turns one product photo and description into marketing copy, an image and a
    video (copy → image → video → stored), run by Celery workers against an AI provider.

    Settings come from GENLINE_* and APIMART_* environment variables (see `genline config`).
    With none set, everything runs on this machine: SQLite, local files, an embedded broker.
    """
    # Log lines go to stderr as JSON, warnings and worse only, so stdout stays the command's own
    # output (one JSON document with --json). Long-running services set their own level.
    configure_logging("WARNING")


# --- submitting ------------------------------------------------------------------------------------
def _request_options(fn: Any) -> Any:
    options = [
        click.option(
            "--file",
            "file",
            type=click.Path(dir_okay=False, path_type=Path),
            help="A JSON request; options given as well override its fields.",
        ),
        click.option("--user-id", help="Who the work is for (budgets and audit are per user)."),
        click.option("--feature", help="Which product feature asked (e.g. listing-video)."),
        click.option("--description", help="The product, in the seller's words (at most 2,000 characters)."),
        click.option(
            "--image",
            help="The product photo: a local PNG/JPEG/WebP file (≤ 10 MB; read by this command, from any "
            "folder) or an http(s) URL.",
        ),
        click.option("--profile", help="Which profile of models and lengths to use (default: standard)."),
        click.option(
            "--idempotency-key",
            help="Same key, same pipeline: resubmitting creates nothing new. Generated when omitted.",
        ),
        click.option("--callback-url", help="An http(s) URL told when the pipeline ends."),
        click.option("--priority", type=click.Choice(["interactive", "batch"]), help="batch runs on its own queue."),
        click.option("--copy-model", help="Prefer this chat model for the copy."),
        click.option("--image-model", help="Prefer this image model."),
        click.option("--video-model", help="Prefer this video model."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


MAX_REQUEST_FILE_BYTES = 1024 * 1024  # a request is a few fields; the photo is a path, a URL or --image


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_REQUEST_FILE_BYTES + 1)
    except OSError as exc:
        raise ValidationError(
            f"The request file {str(path)!r} cannot be read: {exc.strerror}.", code="file_unreadable", field="file"
        ) from None
    if len(raw) > MAX_REQUEST_FILE_BYTES:
        raise ValidationError(
            f"The request file is over {MAX_REQUEST_FILE_BYTES // 1048576} MB, the most a request may be "
            "(the photo goes by path, URL or --image, not inside it).",
            code="file_too_large",
            field="file",
        )
    try:
        data = json.loads(raw.decode())
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"The request file is not valid JSON: {exc.msg} at line {exc.lineno}.", code="invalid_json", field="file"
        ) from None
    except UnicodeDecodeError:
        raise ValidationError(
            "The request file is not text (is it the photo? pass that with --image).", code="invalid_json", field="file"
        ) from None
    except RecursionError:
        raise ValidationError(
            "The request file is not valid JSON: it is nested too deeply.", code="invalid_json", field="file"
        ) from None
    except ValueError as exc:  # a number too long to convert, ...
        raise ValidationError(
            f"The request file is not valid JSON: {str(exc)[:60]}.", code="invalid_json", field="file"
        ) from None
    if not isinstance(data, dict):
        raise ValidationError("The request file must hold one JSON object.", code="request_not_object", field="file")
    return data


@cli.command()
@_request_options
@click.option("--wait", is_flag=True, help="Stay and show progress until the pipeline ends.")
@JSON_OPT
def submit(file: Path | None, wait: bool, as_json: bool, **fields: Any) -> None:
    """Submit one pipeline; prints its id at once (or, with --wait, its outcome).

    \b
    Example:
      genline submit --user-id seller-42 --feature listing-video \\
        --description "Stoneware mug, speckled glaze" --image mug.png --wait
    """
    try:
        request = _read_json_file(file) if file else {}
        request.update({k: v for k, v in fields.items() if v is not None})
        image = fields.get("image")
        if image is not None and "://" not in image:
            # The operator's own argument: this command reads the file and passes its bytes, so it
            # may be anywhere. A path inside a request (--file, batch) is read only in an upload folder.
            from genline.pipelines.images import read_operator_file

            request["image"] = read_operator_file(Path(image))
        generated = "idempotency_key" not in request
        if generated:
            request["idempotency_key"] = f"cli-{uuid.uuid4().hex}"
        with _api() as api:
            accepted = api.submit(request)
            result: dict[str, Any] = {
                "pipeline_id": accepted.pipeline_id,
                "created": accepted.created,
                "idempotency_key": request["idempotency_key"],
                "status": accepted.status,
            }
            if accepted.estimated_cost_usd is not None:
                result["estimated_cost_usd"] = str(accepted.estimated_cost_usd)
            if not accepted.created:
                result["note"] = _resubmitted(accepted.pipeline_id, accepted.status)
            if not as_json and not accepted.created and accepted.status in ("failed", "cancelled"):
                click.echo(result["note"])  # not "Accepted": nothing was started
            elif not as_json:
                note = "new" if accepted.created else f"already submitted with this key; it is {accepted.status}"
                estimate = (
                    f" Estimated cost ${accepted.estimated_cost_usd:.4f}."
                    if accepted.estimated_cost_usd is not None
                    else ""
                )
                click.echo(
                    f"Accepted pipeline {accepted.pipeline_id} ({note}); idempotency key "
                    f"{request['idempotency_key']}.{estimate}"
                )
            if wait:
                follow(api, accepted.pipeline_id, result, as_json=as_json)
    except GenlineError as err:
        fail(err, as_json=as_json)
    conclude(result, wait=wait, as_json=as_json)


def _resubmitted(pipeline_id: str, status: str) -> str:
    """What a key used before means: that pipeline, as it is; an ended one is not run again."""
    if status in ("failed", "cancelled"):
        return (
            f"Pipeline {pipeline_id} was already submitted with this idempotency key and it {status}; "
            "nothing new was started. To run it again, submit with a new --idempotency-key."
        )
    return f"already submitted with this key; it is {status}"


@cli.command()
@click.argument("pipeline_id")
@JSON_OPT
def status(pipeline_id: str, as_json: bool) -> None:
    """Show a pipeline's status, steps, cost and where its video is stored."""
    try:
        with _api() as api:
            info = api.status(pipeline_id)
    except GenlineError as err:
        fail(err, as_json=as_json)
    emit_json(info) if as_json else click.echo(describe_status(info))


@cli.command()
@click.argument("pipeline_id")
@JSON_OPT
def cancel(pipeline_id: str, as_json: bool) -> None:
    """Cancel a pipeline: no later step starts, and a provider job that can be cancelled is.
    A job the provider can no longer stop is still followed to its end so its cost is recorded."""
    try:
        with _api() as api:
            result = api.cancel(pipeline_id)
    except GenlineError as err:
        fail(err, as_json=as_json)
    refused = result.get("provider_cancel_errors") or []
    if refused:  # cancelled here, but the provider was asked in vain to stop a job: not a success
        first = refused[0]
        error = {
            "code": first["code"],
            "field": None,
            "message": f"The provider did not stop {len(refused)} job(s) of pipeline {pipeline_id}: "
            f"{first['message'][:1].lower()}{first['message'][1:].rstrip('.')}. They run to their end and their "
            "cost is recorded.",
        }
        result["error"] = error
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"Cancelled pipeline {pipeline_id}: {result['provider_jobs_cancelled']} provider job(s) "
            f"stopped, {result['provider_jobs_left_running']} left to finish (their cost is recorded)."
        )
    if refused:
        if not as_json:
            click.echo(f"error [{printable(error['code'])}]: {printable(error['message'])}", err=True)
        sys.exit(EXIT_BAD_INPUT if error["code"] == "provider_key_invalid" else EXIT_ERROR)


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--strict", is_flag=True, help="Submit nothing if any line is bad.")
@click.option("--wait", is_flag=True, help="Stay and show progress and the running cost until every pipeline ends.")
@click.option("--window", help="Start the pipelines only inside this UTC window, HH:MM-HH:MM (e.g. 01:00-06:00).")
@click.option("--retry-failed", is_flag=True, help="Submit again, under new keys, the lines whose pipelines failed.")
@JSON_OPT
def batch(path: Path, strict: bool, wait: bool, window: str | None, retry_failed: bool, as_json: bool) -> None:
    """Submit one pipeline per line of a JSON Lines file (blank lines and # comments skipped).

    Lines run as batch work (their own queue, the provider's batch price, a few workers at most)
    unless a line sets its priority. Each line's idempotency_key (derived from the line when it
    has none) means submitting the same file again creates nothing new. Bad lines are reported by
    line number; the exit code is 2 if any line was bad. The summary names every line's pipeline.
    """
    from genline.cli.batch import run_batch

    try:
        _settings_with_state()
        sys.exit(run_batch(path, strict=strict, wait=wait, as_json=as_json, window=window, retry_failed=retry_failed))
    except GenlineError as err:
        fail(err, as_json=as_json)


@cli.command("config")
@click.option("--markdown", is_flag=True, help="Print the settings table as Markdown (as in the README).")
def config_cmd(markdown: bool) -> None:
    """Check the settings from the environment and print them (the API key is never shown)."""
    from genline.config.settings import SETTINGS, settings_table_markdown

    if markdown:
        click.echo(settings_table_markdown())
        return
    try:
        settings = load_settings()
    except GenlineError as err:
        fail(err, as_json=False)
    for s in SETTINGS:
        value = getattr(settings, s.attr, None)
        if s.attr == "provider_api_key":
            value = "(set)" if settings.provider_api_key else "(not set)"
        elif s.attr == "provider_api_key_file":  # a path, not the key; settings keep only the key
            value = os.environ.get(s.env) or "(not set)"
        elif isinstance(value, tuple):
            value = ("," if s.attr == "allow_private_hosts" else os.pathsep).join(str(v) for v in value) or "(none)"
        elif isinstance(value, str) and "://" in value and "@" in value:  # every URL, the provider's too
            value = _without_password(value)
        click.echo(f"{s.env:<32} {value}")


def _provider_group() -> click.Group:
    from genline.cli.provider import provider

    return provider


def _without_password(url: str) -> str:
    """``scheme://user:***@host/...``: a URL fit to print (its password, if any, masked)."""
    parts = urlsplit(url)
    credentials, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _register_subcommands() -> None:
    from genline.cli.demo import demo
    from genline.cli.golden import golden
    from genline.cli.money import caps
    from genline.cli.services import db, flower, poller, simulator, worker

    for command in (demo, worker, poller, simulator, db, flower, caps):
        cli.add_command(command)
    cli.add_command(golden)  # the prompt templates' golden set and cost gate (docs/PROMPTS.md)
    from genline.cli.estimate import estimate

    cli.add_command(estimate)  # what a pipeline costs, by step, before it is submitted
    from genline.cli.promote import promote

    cli.add_command(promote)  # a finished draft rendered again on a costlier profile (pipelines/promote.py)
    from genline.cli.metrics import metrics

    cli.add_command(metrics)  # Prometheus's /metrics for workers, pollers and state (docs/METRICS.md)
    from genline.cli.listing import cancel_many, list_cmd, retry, retry_many
    from genline.cli.report import report

    for command in (report, list_cmd, retry, cancel_many, retry_many):  # health report; list, retry, bulk forms
        cli.add_command(command)
    from genline.cli.retention import retention

    cli.add_command(retention)  # outputs and audit rows past their feature's retention (pipelines/retention.py)


_register_subcommands()
cli.add_command(_provider_group())


def main() -> None:
    cli(prog_name="genline")


if __name__ == "__main__":
    main()
