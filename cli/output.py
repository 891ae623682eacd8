"""How the CLI speaks: plain sentences for people, one JSON document for scripts (``--json``)."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from genline.config.errors import ConfigError, GenlineError, UserError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_ERROR = 0, 1, 2, 3


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def fail(err: GenlineError, *, as_json: bool) -> NoReturn:
    """Print a GenlineError (one line, its code, the field) and exit with the matching code."""
    code = EXIT_BAD_INPUT if isinstance(err, (UserError, ConfigError)) else EXIT_ERROR
    if as_json:
        emit_json({"error": err.to_dict()})
    else:
        where = f" ({err.field})" if err.field else ""
        click.echo(f"error [{err.code}]{where}: {err.message}", err=True)
    sys.exit(code)


def describe_status(status: dict[str, Any]) -> str:
    lines = [
        f"pipeline {status['id']}: {status['status']}  cost ${status['cost_usd']}"
        f" (estimated ${status['estimated_cost_usd']})"
    ]
    for step in status["steps"]:
        extra = f" via {step['model']}" if step.get("model") else ""
        err = f" — {step['error']['message']}" if step.get("error") else ""
        lines.append(f"  {step['kind']:<6} {step['status']:<10} {step['progress']:>3}%{extra}{err}")
    if status.get("video"):
        lines.append(f"  video: {status['video']['location']} ({status['video']['size']} bytes)")
    if status.get("error"):
        lines.append(f"  reason [{status['error']['code']}]: {status['error']['message']}")
    return "\n".join(lines)
