"""Run the schema migrations (Alembic) against a database URL; the same on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from genline.storage.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def require_current(url: str) -> None:
    """Fail at start-up, loudly, when the database's schema is not the one this genline needs
    (a fresh database, or one an older or newer genline migrated), rather than at the first query."""
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import make_url

    from genline.config.errors import ConfigError

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    have = current(url)
    if have == head:
        return
    where = make_url(url).render_as_string(hide_password=True)
    found = "has no genline tables yet" if have is None else f"is at schema revision {have}"
    raise ConfigError(
        f"The database at {where} {found}; this genline needs revision {head}. "
        "Run `genline db upgrade` first (make demo does it for the zero-setup default)."
    )
