"""structlog configured once per process: one JSON object per line, secrets scrubbed.

Secrets never reach a log line: a processor replaces the provider key (and any value under a
key that looks like a credential) before rendering. The same scrubber, ``scrub_text``, cleans every
provider text genline stores or shows (a step's or pipeline's error message), so a secret an
answer echoes is no more in a row or on a screen than in a log: registered secrets (the API key,
the passwords in the configured URLs), a URL's ``user:password@`` and a ``Bearer`` token.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SENSITIVE = ("authorization", "api_key", "apikey", "password", "secret", "token")
_secrets: set[str] = set()
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s/@]+@")
_BEARER = re.compile(r"(?i)\b(?P<head>bearer\s+)[A-Za-z0-9._~+/=-]{4,}")
MASK = "********"


def register_secret(value: str | None) -> None:
    """Make ``value`` unloggable in this process."""
    if value and len(value) >= 4:
        _secrets.add(value)


def _scrub_text(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK + "@", text)
    text = _BEARER.sub(lambda m: m["head"] + MASK, text)
    return text


def scrub_text(text: str | None) -> str | None:
    """``text`` with every secret this process knows masked: for provider text that is stored or
    shown (error messages), the same scrubber as the log lines'."""
    return None if text is None else _scrub_text(text)


def scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if any(word in key.lower() for word in _SENSITIVE) and key != "task_id":
            event[key] = "********"
        elif isinstance(value, str):
            event[key] = _scrub_text(value)
    return event


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """JSON lines to stderr (or ``stream``). Safe to call more than once."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    out = stream or sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (Celery, kombu, botocore) go to the same
    # stream as JSON too, and at WARNING at least, so their noise stays out of the way.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                scrub,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
