"""``genline provider``: see and lift a pause of paid work (after a 401 or 402).

The pause and the alerts live where the workers share state (provider/shared_state.py): in Redis
when Redis is the broker, else in genline's database (the zero-setup default among them). These
commands read them there strictly: where a worker fails open (no pause holds while Redis is
down), ``provider status`` would be guessing, so a store it cannot read is an error (exit 2 with
the reason), never "running".
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import click
from sqlalchemy import Table, delete, select, text, update

from genline.cli.output import emit_json, fail
from genline.config.boundary import config_error
from genline.config.clock import utcnow
from genline.config.constants import StepStatus
from genline.config.errors import ConfigError, GenlineError, ProviderPaused
from genline.config.settings import Settings, load_settings
from genline.provider.shared_state import PREFIX
from genline.provider.stages import KeyReader, Pause, alert_counts, lift_pause, read_pause
from genline.storage.db import Database
from genline.storage.models import SharedEntry, Step

JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")


@click.group()
def provider() -> None:
    """The provider account as genline sees it: paused or not (and until when), alerts raised."""


class _RedisReader:
    """The shared state in Redis, read without failing open: an unreachable Redis raises."""

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3, decode_responses=True)

    def get(self, key: str) -> str | None:
        value = self._redis.get(PREFIX + key)
        return None if value is None else str(value)

    def delete_existing(self, *keys: str) -> list[str]:
        pipe = self._redis.pipeline()  # MULTI/EXEC: which existed, and gone, in one step
        for key in keys:
            pipe.exists(PREFIX + key)
        pipe.delete(*(PREFIX + key for key in keys))
        *found, _ = pipe.execute()
        return [key for key, present in zip(keys, found, strict=True) if present]

    def close(self) -> None:
        self._redis.close()


class _DatabaseReader:
    """The shared state in genline's database (the rows DatabaseSharedState keeps), read without
    failing open: a database that cannot be reached raises."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._table: Table = SharedEntry.__table__  # type: ignore[assignment]

    def get(self, key: str) -> str | None:
        t = self._table
        with self._db.engine.connect() as conn:
            row = conn.execute(select(t.c.value).where(t.c.key == key, t.c.expires_at > time.time())).first()
        return None if row is None else str(row[0])

    def delete_existing(self, *keys: str) -> list[str]:
        t = self._table
        with self._db.engine.begin() as conn:
            if self._db.is_postgres:  # the lock every DatabaseSharedState operation takes
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('genline:shared_state'))"))
            present = conn.execute(select(t.c.key).where(t.c.key.in_(keys), t.c.expires_at > time.time()))
            found = {str(row[0]) for row in present}
            conn.execute(delete(t).where(t.c.key.in_(keys)))
        return [key for key in keys if key in found]

    def close(self) -> None:
        self._db.dispose()


def _settings(as_json: bool) -> Settings:
    try:
        return load_settings()
    except GenlineError as err:
        fail(err, as_json=as_json)


def _uses_redis(settings: Settings) -> bool:
    return not settings.embedded_broker and settings.broker_url.startswith(("redis://", "rediss://"))


def _database(settings: Settings) -> Database:
    """genline's database, with its schema checked (a plain error, exit 2, when it is not there)."""
    from genline.storage.migrate import require_current

    require_current(settings.database_url, var_dir=settings.var_dir)
    return Database(settings.database_url, pool_size=1)


def _reader(settings: Settings) -> _RedisReader | _DatabaseReader:
    """Where the workers keep the pause: Redis when it is the broker, else the database."""
    if _uses_redis(settings):
        return _RedisReader(settings.broker_url)
    return _DatabaseReader(_database(settings))


def _read(settings: Settings, as_json: bool, what: Any, *, doing: str) -> Any:
    """``what(reader)``; a store that cannot be read is one error line (exit 2) that starts with
    ``doing`` (what could not be done), never a guess."""
    reader = None
    try:
        reader = _reader(settings)
        return what(reader)
    except Exception as exc:
        err = config_error(exc, settings)
        if err is None:
            raise
        fail(ConfigError(f"{doing}: {err.message[:1].lower()}{err.message[1:]}", code=err.code), as_json=as_json)
    finally:
        if reader is not None:
            reader.close()


def _ends(pause: Pause) -> str:
    """`until 12:05:00 UTC (in 4 min 10 s)`, or how it ends when its end is not known."""
    if pause.until is None:
        return "until the next successful call after GENLINE_PAUSE_S, or `genline provider resume`"
    left = max(0, round((pause.until - datetime.now(UTC)).total_seconds()))
    minutes, seconds = divmod(left, 60)
    span = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    return f"until {pause.until:%Y-%m-%d %H:%M:%S} UTC (in {span}), or sooner with `genline provider resume`"


@provider.command()
@JSON_OPT
def status(as_json: bool) -> None:
    """Show whether paid work is paused (why, and until when) and the alerts raised this week."""
    settings = _settings(as_json)

    def look(reader: KeyReader) -> tuple[Pause | None, dict[str, int]]:
        return read_pause(reader), alert_counts(reader)

    pause, alerts = _read(settings, as_json, look, doing="Cannot tell whether paid work is paused")
    if as_json:
        emit_json(
            {
                "paused": pause.reason if pause else None,
                "paused_until": pause.until.isoformat() if pause and pause.until else None,
                "alerts": alerts,
            }
        )
        return
    click.echo(f"paid work: paused ({pause.reason}) {_ends(pause)}" if pause else "paid work: running")
    for name, count in alerts.items():
        click.echo(f"alerts {name}: {count}")


def release_held_steps(db: Database) -> int:
    """Steps a pause refused (queued again, due only after GENLINE_SWEEP_AFTER_S) are due now: the
    sweeper (every couple of seconds, in the poller) sends them at once. Returns how many."""
    now = utcnow()
    with db.transaction() as s:
        result = s.execute(
            update(Step)
            .where(
                Step.status == StepStatus.QUEUED,
                Step.error_code == ProviderPaused.code,
                Step.not_before > now,
            )
            # updated_at kept (not bumped by its onupdate): the sweeper sends a queued step whose
            # not_before came after its last update, so it must stay before ``now``.
            .values(not_before=now, updated_at=Step.updated_at)
            .execution_options(synchronize_session=False)
        )
    return int(getattr(result, "rowcount", 0) or 0)


@provider.command()
@JSON_OPT
def resume(as_json: bool) -> None:
    """Lift a pause now (after topping up the balance or fixing the key); the steps it held
    restart within seconds. Says so when nothing was paused."""
    settings = _settings(as_json)

    def lift(reader: KeyReader) -> Pause | None:
        pause = read_pause(reader)
        return pause if lift_pause(reader) else None

    was = _read(settings, as_json, lift, doing="Cannot lift the pause of paid work")
    db = _database(settings)
    try:
        released = release_held_steps(db)
    finally:
        db.dispose()
    if as_json:
        emit_json({"was_paused": was is not None, "reason": was.reason if was else None, "steps_released": released})
        return
    held = f"; {released} held step(s) restart now" if released else ""
    if was is not None:
        click.echo(f"paid work resumed (it was paused: {was.reason}){held}")
    else:
        click.echo(f"paid work was not paused; nothing to resume{held}")
