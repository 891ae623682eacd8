"""How the CLI speaks: plain sentences for people, one JSON document for scripts (``--json``).

Text for people may carry what a provider or a user wrote: its control characters (a terminal's
escape sequences, carriage returns) and bidi overrides are shown escaped (``\\x1b``), never
written to the terminal as they are. JSON escapes them itself.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from typing import Any, NoReturn

import click

from genline.config.errors import ConfigError, GenlineError, UserError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_ERROR = 0, 1, 2, 3
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(value: object) -> str:
    """``value`` as text fit for a terminal: control characters and bidi overrides escaped."""
    text = str(value)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char in _BIDI_CONTROLS or unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def fail(err: GenlineError, *, as_json: bool) -> NoReturn:
    """Print a GenlineError (one line, its code, the field) and exit with the matching code."""
    code = EXIT_BAD_INPUT if isinstance(err, (UserError, ConfigError)) else EXIT_ERROR
    if as_json:
        emit_json({"error": err.to_dict()})
    else:
        where = f" ({printable(err.field)})" if err.field else ""
        click.echo(f"error [{printable(err.code)}]{where}: {printable(err.message)}", err=True)
    sys.exit(code)


def describe_status(status: dict[str, Any]) -> str:
    """A pipeline's status for people, one line per step; every value escaped by ``printable``."""
    p = printable
    lines = [
        f"pipeline {p(status['id'])}: {p(status['status'])}  cost ${p(status['cost_usd'])}"
        f" (estimated ${p(status['estimated_cost_usd'])})"
    ]
    for step in status["steps"]:
        extra = f" via {p(step['model'])}" if step.get("model") else ""
        err = f" — {p(step['error']['message'])}" if step.get("error") else ""
        lines.append(f"  {p(step['kind']):<6} {p(step['status']):<10} {step['progress']:>3}%{extra}{err}")
    if (video := status.get("video")) and video.get("removed_at"):
        lines.append(f"  video: removed by retention on {p(video['removed_at'])}")
    elif video:
        lines.append(f"  video: {p(video['location'])} ({p(video['size'])} bytes)")
    if status.get("error"):
        lines.append(f"  reason [{p(status['error']['code'])}]: {p(status['error']['message'])}")
    if status.get("promoted_from"):
        lines.append(f"  promoted from {p(status['promoted_from'])} (its copy and image reused)")
    if status.get("batch_window"):
        lines.append(f"  batch window {p(status['batch_window'])} UTC: runs only inside it")
    for flag, names in (status.get("flags") or {}).items():  # what screening found in the description
        lines.append(f"  flag {p(flag)}: {', '.join(p(n) for n in names)}")
    if cb := status.get("callback"):  # the callback_url's webhook: waiting, pending, delivered or failed
        tries = f", {cb['attempts']} {'try' if cb['attempts'] == 1 else 'tries'}" if cb["attempts"] else ""
        last = f" — last: {p(cb['last_error'])}" if cb.get("last_error") else ""
        nxt = f" (next try {p(cb['next_try_at'])})" if cb["state"] == "pending" and cb.get("next_try_at") else ""
        lines.append(f"  callback: {p(cb['state'])}{tries}{last}{nxt}")
    return "\n".join(lines)
