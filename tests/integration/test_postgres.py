"""The same schema and the same claims on PostgreSQL as on SQLite."""

from __future__ import annotations

from datetime import timedelta

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import update

from genline.config.clock import utcnow
from genline.config.settings import load_settings
from genline.pipelines.runtime import Runtime
from genline.storage.migrate import alembic_config, current, upgrade
from genline.storage.models import Pipeline, ProviderJob, Step
from genline.workers.poller import Poller


def test_migrations_build_the_models_schema_on_postgres(pg_url: str) -> None:
    upgrade(pg_url)
    assert current(pg_url) == ScriptDirectory.from_config(alembic_config(pg_url)).get_current_head()
    command.check(alembic_config(pg_url))  # raises if the models and the migrated schema differ


def test_the_poller_index_migration_goes_down_and_up_again_on_postgres(pg_url: str) -> None:
    upgrade(pg_url)  # 0004 swaps the poller's index CONCURRENTLY, outside the migration's transaction
    command.downgrade(alembic_config(pg_url), "0003")
    assert current(pg_url) == "0003"
    upgrade(pg_url)
    command.check(alembic_config(pg_url))


def test_two_pollers_never_claim_the_same_job(pg_url: str, tmp_path: object) -> None:
    upgrade(pg_url)
    settings = load_settings(
        {"GENLINE_DATABASE_URL": pg_url, "GENLINE_VAR_DIR": str(tmp_path), "GENLINE_POLLER_BATCH": "30"}
    )
    rt = Runtime.from_settings(settings)
    with rt.db.transaction() as s:
        s.add(
            Pipeline(
                id="pl_x",
                user_id="u",
                feature="f",
                profile="standard",
                description="d",
                image_ref="i",
                image_url="https://x/i.png",
                idempotency_key="k",
                request_hash="h",
                status="running",
            )
        )
        s.add(Step(id="st_x", pipeline_id="pl_x", position=1, kind="video", status="waiting"))
        s.flush()
        for i in range(50):
            s.add(
                ProviderJob(
                    id=f"job_{i}",
                    step_id="st_x",
                    attempt=1,
                    idempotency_key=f"k{i}",
                    kind="video",
                    model="minimax-hailuo-2.3",
                    task_id=f"task_{i}",
                    status="processing",
                    next_poll_at=utcnow() - timedelta(seconds=1),
                )
            )
    first, second = Poller(rt), Poller(rt)
    a = {c.job_id for c in first.claim()}
    b = {c.job_id for c in second.claim()}
    assert len(a) == 30 and len(b) == 20 and not a & b
    assert not second.claim()  # everything is leased
    with rt.db.transaction() as s:  # a lease that runs out makes the job claimable again
        s.execute(update(ProviderJob).values(lease_until=utcnow() - timedelta(seconds=1)))
    assert len(first.claim()) == 30
    rt.close()


def test_a_committed_job_rings_the_pollers_doorbell_with_its_due_time_and_a_rollback_does_not(pg_url: str) -> None:
    import asyncio
    from collections.abc import Callable
    from datetime import UTC, datetime, timedelta

    from genline.storage.db import Database, wake_poller
    from genline.workers.wakeup import Doorbell

    class Recording(Doorbell):
        """The doorbell, keeping each ring's payload as its LISTEN loop hands it over."""

        def __init__(self, database_url: str) -> None:
            super().__init__(database_url)
            self.payloads: list[str] = []

        def ring(self, payload: str = "") -> None:
            self.payloads.append(payload)
            super().ring(payload)

    async def until(condition: Callable[[], bool]) -> None:
        """A notification arrives when PostgreSQL delivers it: wait for that, a bounded while."""
        async with asyncio.timeout(30):
            while not condition():
                await asyncio.sleep(0.01)

    db = Database(pg_url)
    due = datetime.now(UTC) + timedelta(seconds=42)
    marker = due + timedelta(seconds=60)  # a later job's ring, committed after the rollback

    async def scenario() -> tuple[bool, float, float]:
        bell = Recording(pg_url)
        bell.start()
        try:
            await asyncio.wait_for(bell.rung.wait(), 30)  # rung once on connecting: it was not listening before
            rung_on_connect = bell.due
            bell.rung.clear()
            bell.due = float("inf")

            def rolled_back() -> None:
                try:
                    with db.transaction() as s:
                        wake_poller(s, due)
                        raise RuntimeError("roll back")
                except RuntimeError:
                    pass

            def committed(*jobs_due: datetime) -> None:
                with db.transaction() as s:
                    for job_due in jobs_due:
                        wake_poller(s, job_due)

            await asyncio.to_thread(rolled_back)
            # Notifications arrive in commit order: a ring from the rollback would come before the marker's.
            await asyncio.to_thread(committed, marker)
            await until(lambda: len(bell.payloads) >= 2)
            rang_on_rollback = bell.payloads[1:] != [f"{marker.timestamp():.3f}"]
            bell.rung.clear()
            bell.due = float("inf")

            # two jobs in one transaction: both rings are heard, and the earlier due time counts
            await asyncio.to_thread(committed, due + timedelta(seconds=5), due)
            await until(lambda: len(bell.payloads) >= 4)
            return rang_on_rollback, rung_on_connect, bell.due
        finally:
            await bell.aclose()

    try:
        rang_on_rollback, rung_on_connect, rung_due = asyncio.run(scenario())
    finally:
        db.dispose()
    assert rung_on_connect == 0.0  # look now: something may have been committed before it listened
    assert not rang_on_rollback
    assert rung_due == pytest.approx(due.timestamp(), abs=0.001)
