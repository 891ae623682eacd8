"""Run the schema migrations (Alembic) against a database URL; the same on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config

from genline.config.errors import ConfigError

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    with _database_errors(url):
        command.upgrade(alembic_config(url), revision)


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """A database that cannot be reached (or does not exist, or refuses the login) is a plain
    ``ConfigError`` naming GENLINE_DATABASE_URL (storage/db.py ``database_error``)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    from genline.storage.db import database_error

    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        err = database_error(exc, url)
        if err is None:
            raise
        raise err from exc


def sqlite_file(url: str) -> Path | None:
    """The file of a file-based SQLite database URL (absolute); None for PostgreSQL or ``:memory:``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # make_engine says what is wrong with it
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser().resolve()


def current(url: str) -> str | None:
    """The schema revision of the database; None when it has none. A SQLite file that does not
    exist (or is empty) is not created (or written) to find that out."""
    from alembic.runtime.migration import MigrationContext

    from genline.storage.db import make_engine

    path = sqlite_file(url)
    if path is not None and (not path.exists() or path.stat().st_size == 0):
        return None  # nothing there: connecting would create the file (or write to an empty one)
    engine = make_engine(url)
    try:
        with _database_errors(url), engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def require_database(url: str, *, var_dir: Path | None = None) -> None:
    """For a command that works on existing state (status, cancel, submit, a worker): a SQLite
    database file that does not exist is a plain error, and nothing is created looking for it.
    ``var_dir`` (the settings' GENLINE_VAR_DIR) lets the error say where the state was looked for."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise _no_state(path, var_dir, "there is no database there, so no genline tables yet")


def require_current(url: str, *, var_dir: Path | None = None) -> None:
    """Fail at start-up, loudly, when the database's schema is not the one this genline needs
    (a fresh database, or one an older or newer genline migrated), rather than at the first query.
    A missing SQLite file is refused as ``require_database`` does, and is not created."""
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import make_url

    require_database(url, var_dir=var_dir)
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    have = current(url)
    if have == head:
        return
    path = sqlite_file(url)
    if have is None and path is not None and var_dir is not None and path.parent == var_dir:
        raise _no_state(path, var_dir, "its database has no genline tables yet")  # a stray empty file
    where = make_url(url).render_as_string(hide_password=True)
    found = "has no genline tables yet" if have is None else f"is at schema revision {have}"
    raise ConfigError(
        f"The database at {where} {found}; this genline needs revision {head}. "
        "Run `genline db upgrade` first (make demo does it for the zero-setup default)."
    )


def _no_state(path: Path, var_dir: Path | None, what: str) -> ConfigError:
    """What a newcomer who runs genline from another folder than the one where they ran
    ``make demo`` needs to read: where the state was looked for, what sets that place, which
    command is the installed one, and how to start afresh instead (one sentence)."""
    from genline.config.settings import source_checkout

    if var_dir is None or path.parent != var_dir:  # GENLINE_DATABASE_URL names the file itself
        return ConfigError(
            f"No genline database at {path}, so no genline tables yet: GENLINE_DATABASE_URL (or else "
            "GENLINE_VAR_DIR, default var/genline under the current folder) says where genline keeps its "
            "state, and `genline db upgrade` creates it there."
        )
    lead = (
        f"No genline state in {var_dir} ({what}): GENLINE_VAR_DIR sets that "
        "folder (default: var/genline under the current folder)"
    )
    repo = source_checkout()
    if repo is None:
        return ConfigError(
            f"{lead}, so run the installed command, the repo's .venv/bin/genline, from the folder where "
            "you ran `make demo` or set GENLINE_VAR_DIR to that folder's var/genline, or run "
            "`genline db upgrade` (or `make demo`) first to start afresh here."
        )
    command = repo / ".venv" / "bin" / "genline"
    demo_state = repo / "var" / "genline"
    if demo_state != var_dir and (demo_state / path.name).exists():
        return ConfigError(
            f"{lead}, and `make demo` keeps its state in {demo_state}, so run the installed command, the "
            f"repo's {command}, from {repo} or with GENLINE_VAR_DIR={demo_state}, or run `genline db upgrade` "
            "first to start afresh here."
        )
    return ConfigError(
        f"{lead}, and the installed command is the repo's {command}, so run `make demo` in {repo}, or "
        "`genline db upgrade` here, first."
    )
