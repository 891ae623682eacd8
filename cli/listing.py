"""``genline list``, ``genline retry`` and the bulk forms ``cancel-many`` and ``retry-many``.

The bulk forms are commands of their own rather than a ``--where`` on ``cancel``/``retry``: the
single forms keep one required argument, a pipeline id, and a bulk action can never be the result
of a forgotten id. They take the filter of ``genline list`` (at least one filter: there is no
"everything" by accident), show how many pipelines it picks, and ask before acting (``--yes`` to
skip the question, ``--dry-run`` to only show them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from genline.cli.output import EXIT_ERROR, emit_json, fail, printable
from genline.config.clock import utcnow
from genline.config.errors import GenlineError, InvalidState, ValidationError
from genline.pipelines.listing import STATUSES, PipelineFilter

JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
SHOWN_BEFORE_ASKING = 20
LIMIT_OPT = click.option(
    "--limit", default=1000, show_default=True, type=click.IntRange(1, 10_000), help="Act on at most this many."
)


def _filter_options(fn: Any) -> Any:
    options = [
        click.option("--user-id", help="Only this user's pipelines."),
        click.option("--feature", help="Only this feature's pipelines."),
        click.option(
            "--status", "statuses", multiple=True, type=click.Choice(STATUSES), help="Only these statuses (repeatable)."
        ),
        click.option("--since", help="Created at or after: ISO time (UTC unless it names a zone) or a span: 90m, 24h."),
        click.option("--until", help="Created before: ISO time or a span before now."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _when(value: str | None, name: str, now: datetime) -> datetime | None:
    from genline.pipelines.report import parse_when

    return parse_when(value, now, name=name) if value else None


def build_filter(
    user_id: str | None, feature: str | None, statuses: tuple[str, ...], since: str | None, until: str | None
) -> PipelineFilter:
    now = utcnow()
    return PipelineFilter(
        user_id=user_id,
        feature=feature,
        status=tuple(statuses),
        since=_when(since, "since", now),
        until=_when(until, "until", now),
    )


def _line(p: dict[str, Any]) -> str:
    err = f"  [{printable(p['error_code'])}]" if p.get("error_code") else ""
    return (
        f"{p['id']}  {p['status']:<9}  {printable(p['feature'])}  {printable(p['user_id'])}  "
        f"{p['created_at'][:19]}  ${p['cost_usd']}{err}"
    )


@click.command("list")
@_filter_options
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000), help="Show at most this many.")
@JSON_OPT
def list_cmd(
    user_id: str | None,
    feature: str | None,
    statuses: tuple[str, ...],
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List pipelines, newest first, by user, feature, status and time of creation."""
    from genline.cli.main import _api

    try:
        where = build_filter(user_id, feature, statuses, since, until)
        with _api() as api:
            found = api.list_pipelines(where, limit=limit)
    except GenlineError as err:
        fail(err, as_json=as_json)
    if as_json:
        emit_json(found)
        return
    if not found["pipelines"]:
        click.echo("No pipeline matches.")
        return
    for p in found["pipelines"]:
        click.echo(_line(p))
    if found["total"] > found["shown"]:
        click.echo(f"({found['shown']} of {found['total']} shown; --limit shows more)")


@click.command()
@click.argument("pipeline_id")
@JSON_OPT
def retry(pipeline_id: str, as_json: bool) -> None:
    """Run a failed pipeline again from the step that failed. The steps that succeeded are kept;
    the failed step runs as a new step, so its paid jobs get new idempotency keys (the earlier
    jobs stay as history). Its remaining estimate is reserved against the spend caps again."""
    from genline.cli.main import _api

    try:
        with _api() as api:
            result = api.retry(pipeline_id)
    except GenlineError as err:
        fail(err, as_json=as_json)
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"Pipeline {pipeline_id} runs again from its {result['from_step']} step "
            f"(reserved ${result['reserved_usd']} for the remaining steps)."
        )


def _bulk(
    action: str,
    statuses: tuple[str, ...],
    where: PipelineFilter,
    *,
    limit: int,
    yes: bool,
    dry_run: bool,
    as_json: bool,
    act: Callable[[Any, str], dict[str, Any]],
) -> None:
    """Pick the pipelines, show them, ask, then act on each one; one failure does not stop the rest."""
    from genline.cli.main import _api
    from genline.pipelines.listing import matching_ids

    try:
        if where.empty:
            raise ValidationError(
                f"Name at least one filter (--user-id, --feature, --status, --since, --until) of the pipelines "
                f"to {action}; list them first with genline list.",
                code="filter_required",
            )
        where = where.narrowed(statuses, action={"cancel": "cancelled", "retry": "retried"}[action])
        if not (yes or dry_run) and as_json:
            raise ValidationError(
                f"With --json, {action}-many needs --yes (act) or --dry-run (only show).", code="confirmation_required"
            )
        with _api() as api:
            ids = matching_ids(api.runtime.db, where, limit=limit)
            summary: dict[str, Any] = {"action": action, "filter": where.as_dict(), "matched": len(ids)}
            if dry_run or not ids:
                summary["pipeline_ids"] = ids
                summary["dry_run"] = dry_run
                if as_json:
                    emit_json(summary)
                else:
                    click.echo(f"{len(ids)} pipeline(s) match" + (":" if ids else "."))
                    for pid in ids:
                        click.echo(f"  {pid}")
                return
            if not yes:
                for pid in ids[:SHOWN_BEFORE_ASKING]:
                    click.echo(f"  {pid}")
                if len(ids) > SHOWN_BEFORE_ASKING:
                    click.echo(f"  ... and {len(ids) - SHOWN_BEFORE_ASKING} more")
                click.confirm(f"{action.capitalize()} these {len(ids)} pipeline(s)?", abort=True)
            done, skipped, failed = [], [], []
            for pid in ids:
                try:
                    done.append(act(api, pid))
                except InvalidState as err:  # it ended (or was retried) since it was picked
                    skipped.append({"pipeline_id": pid, "code": err.code, "message": err.message})
                except GenlineError as err:
                    failed.append({"pipeline_id": pid, "code": err.code, "message": err.message})
    except GenlineError as err:
        fail(err, as_json=as_json)
    summary.update({"done": done, "skipped": skipped, "failed": failed})
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"{action.capitalize()}: {len(done)} done, {len(skipped)} skipped, {len(failed)} failed.")
        for item in (*skipped, *failed):
            click.echo(f"  {item['pipeline_id']} [{printable(item['code'])}]: {printable(item['message'])}")
    if failed:
        sys.exit(EXIT_ERROR)


def _bulk_command(verb: str, done: str, allowed: tuple[str, ...], doc: str, act: Any) -> click.Command:
    """``<verb>-many`` (cancel, retry): the list's filter, a confirmation, then ``act`` on each
    pipeline the filter picks among those whose status is in ``allowed``."""

    @click.command(f"{verb}-many", help=doc)
    @_filter_options
    @LIMIT_OPT
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    @click.option("--dry-run", is_flag=True, help=f"Only show which pipelines would be {done}.")
    @JSON_OPT
    def command(
        user_id: str | None,
        feature: str | None,
        statuses: tuple[str, ...],
        since: str | None,
        until: str | None,
        limit: int,
        yes: bool,
        dry_run: bool,
        as_json: bool,
    ) -> None:
        try:
            where = build_filter(user_id, feature, statuses, since, until)
        except GenlineError as err:
            fail(err, as_json=as_json)
        _bulk(verb, allowed, where, limit=limit, yes=yes, dry_run=dry_run, as_json=as_json, act=act)

    return command


cancel_many = _bulk_command(
    "cancel",
    "cancelled",
    ("pending", "running"),
    "Cancel every pending or running pipeline the filter picks, after asking.",
    lambda api, pid: api.cancel(pid),
)
retry_many = _bulk_command(
    "retry",
    "retried",
    ("failed",),
    "Retry every failed pipeline the filter picks from its failed step, after asking.",
    lambda api, pid: api.retry(pid),
)
