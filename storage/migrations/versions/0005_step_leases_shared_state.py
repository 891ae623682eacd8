"""Steps hold a lease while a worker runs them, and wait out a retry's backoff; shared state (the
account pause, alerts, rate limit and breakers) gets a table for footprints whose broker is not
Redis, so every process sees one pause

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("steps") as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("not_before", sa.DateTime(), nullable=True))
    op.create_table(
        "shared_state",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_shared_state")),
    )


def downgrade() -> None:
    op.drop_table("shared_state")
    with op.batch_alter_table("steps") as batch_op:
        batch_op.drop_column("not_before")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("lease_owner")
