"""structlog configured once per process: one JSON object per line, secrets scrubbed.

Secrets never reach a log line: a processor replaces the provider key (and any value under a
key that looks like a credential) before rendering.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SENSITIVE = ("authorization", "api_key", "apikey", "password", "secret", "token")
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Make ``value`` unloggable in this process."""
    if value and len(value) >= 4:
        _secrets.add(value)


def _scrub_text(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "********")
    return text


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
