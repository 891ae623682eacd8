"""Pipelines carry what screening found in the seller's description: ``injection_suspected`` (its
signals) and ``pii_masked`` (the kinds of personal data masked), never the text itself

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch_op:
        batch_op.add_column(sa.Column("flags", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pipelines") as batch_op:
        batch_op.drop_column("flags")
