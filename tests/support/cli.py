"""Running ``genline ...`` in-process the way a user's shell would, for the CLI tests.

``GenlineCli(env, var)("submit", ...)`` invokes the click app through ``CliRunner`` with only the
environment given (plus the test process's own, minus any stray GENLINE_*/APIMART_* variable,
which the caller's fixture removes), and checks that the API key never shows in the output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner, Result

from genline.cli.main import cli

ERROR_LINE = re.compile(r"^error \[(?P<code>[a-z_]+)\](?: \((?P<field>[a-z_]+)\))?: (?P<message>\S.*)$")


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    """`genline ARGS` in-process, as a new process would run it (structlog at its defaults; the
    root logger's handlers put back afterwards)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    structlog.reset_defaults()
    try:
        return CliRunner().invoke(cli, args, env=env, catch_exceptions=True, prog_name="genline")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class GenlineCli:
    """`genline ...` for one user: their environment and var folder."""

    def __init__(self, env: dict[str, str], var: Path, secret: str) -> None:
        self.env, self.var, self._secret = env, var, secret

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        result = invoke(list(args), {**self.env, **(env or {})})
        for text in (result.stdout, result.stderr):
            assert self._secret not in text, f"the API key leaked in the output of genline {' '.join(args)}"
        return result

    @property
    def db(self) -> Path:
        return self.var / "genline.db"

    @property
    def broker(self) -> Path:
        return self.var / "broker.sqlite"


def count_rows(db: Path, table: str) -> int:
    """Rows in a table of a SQLite file; 0 when the file or the table does not exist."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def one_error_line(result: Result) -> re.Match[str]:
    """The single `error [<code>] (<field>): <sentence>` line a failed command prints on stderr."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one error line on stderr, got {lines!r}"
    match = ERROR_LINE.match(lines[0])
    assert match, f"not of the form `error [<code>] (<field>): <sentence>`: {lines[0]!r}"
    return match


# --- fixtures every CLI test module uses (imported there; autouse within that module) ---------------
@pytest.fixture(autouse=True)
def no_stray_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings loader refuses unknown GENLINE_*/APIMART_* variables: start from none."""
    for name in list(os.environ):
        if name.startswith(("GENLINE_", "APIMART_")):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Whatever logging a CLI run configured is undone when the test ends."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
