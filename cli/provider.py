"""``genline provider``: see and lift a pause of paid work (after a 401 or 402)."""

from __future__ import annotations

import click

from genline.cli.output import emit_json, fail
from genline.config.errors import GenlineError
from genline.config.settings import load_settings
from genline.provider.shared_state import SharedState, shared_state_for
from genline.provider.stages import PAUSE_KEY


@click.group()
def provider() -> None:
    """The provider account as genline sees it: paused or not, and alerts raised."""


def _state() -> SharedState:
    try:
        settings = load_settings()
    except GenlineError as err:
        fail(err, as_json=False)
    if not settings.embedded_broker and settings.broker_url.startswith(("redis://", "rediss://")):
        return shared_state_for(settings.broker_url, embedded=False)
    from genline.storage.db import Database
    from genline.storage.migrate import require_current

    try:
        require_current(settings.database_url)  # the pause lives in the database here
    except GenlineError as err:
        fail(err, as_json=False)
    return shared_state_for(settings.broker_url, embedded=settings.embedded_broker, db=Database(settings.database_url))


@provider.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
def status(as_json: bool) -> None:
    """Show whether paid work is paused (and why), and how many alerts were raised this week."""
    state = _state()
    paused = state.get(PAUSE_KEY)
    alerts = {name: int(state.get(f"alerts:{name}") or 0) for name in ("provider_paused", "copy_at_risk")}
    if as_json:
        emit_json({"paused": paused, "alerts": alerts})
        return
    click.echo(f"paid work: {f'paused ({paused})' if paused else 'running'}")
    for name, count in alerts.items():
        click.echo(f"alerts {name}: {count}")


@provider.command()
def resume() -> None:
    """Lift a pause now (after topping up the balance or fixing the key); the next call checks."""
    _state().delete(PAUSE_KEY)
    click.echo("paid work resumed")
