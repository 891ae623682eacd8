"""The ``genline`` command's one place for failures no subcommand handled itself.

``GenlineGroup`` is the top-level click group: whatever escapes a subcommand ends here.

- A ``GenlineError``: its line ``error [code] (field): sentence`` (or ``{"error": ...}`` with
  ``--json``), exit 2 for the user's or operator's errors, 3 for the rest (cli/output.py ``fail``).
- A wrong setting met through a third-party exception (a database that does not answer, a Redis
  that is down, a bucket that does not exist, a key the provider refuses): its ``ConfigError``
  (config/boundary.py), exit 2.
- Anything else is a bug or an unknown failure: its traceback (for the report), then one last
  line ``error [unexpected_error]: ...``, exit 3 (never 1, which means a pipeline you waited for
  failed).
"""

from __future__ import annotations

import traceback
from typing import Any

import click

from genline.cli.output import EXIT_ERROR, emit_json, fail
from genline.config.boundary import config_error
from genline.config.errors import GenlineError
from genline.config.logging import scrub_text

_ARGS = "genline.args"


class GenlineGroup(click.Group):
    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        ctx.meta.setdefault(_ARGS, list(args))  # the words after `genline`: is --json among them?
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: usage errors (exit 2), --help, Ctrl-C
        except Exception as exc:  # noqa: BLE001  # the last stop: every failure ends as one line
            as_json = _wants_json(ctx)
            err = config_error(exc, _settings())
            if err is not None:
                fail(err, as_json=as_json)
            if isinstance(exc, GenlineError):
                fail(exc, as_json=as_json)
            unexpected(exc, as_json=as_json)


def _wants_json(ctx: click.Context) -> bool:
    words: list[str] = ctx.meta.get(_ARGS, [])
    return "--json" in (words[: words.index("--")] if "--" in words else words)


def _settings() -> Any:
    """The settings, to name the URL at fault; None when they cannot be read."""
    from genline.config.settings import load_settings

    try:
        return load_settings()
    except GenlineError:
        return None


def unexpected(exc: BaseException, *, as_json: bool) -> None:
    """A failure genline does not know: the traceback (what a bug report needs) on stderr, then
    one last line that says what happened; exit 3."""
    # The registered secrets (the key, URL passwords) scrubbed, as in every log line.
    click.echo(scrub_text("".join(traceback.format_exception(exc))), err=True, nl=False)
    message = (
        f"genline stopped on an unexpected {type(exc).__name__} (the traceback above says where); "
        "nothing more was done. Please report it if it is not a part of the machine failing."
    )
    if as_json:
        emit_json({"error": {"code": "unexpected_error", "field": None, "message": message}})
    else:
        click.echo(f"error [unexpected_error]: {message}", err=True)
    raise SystemExit(EXIT_ERROR)
