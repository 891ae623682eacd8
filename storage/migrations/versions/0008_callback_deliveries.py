"""Webhooks genline owes: one row per callback (a pipeline's end) or alert (to the operators' URL),
with its tries, its state (pending | delivered | failed) and when it is tried next; and an index
on the spend caps that reached their limit, which alert deliveries look for

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "callback_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("webhook_id", sa.String(length=80), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("pipeline_id", sa.String(length=40), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_try_at", sa.DateTime(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["pipelines.id"],
            name=op.f("fk_callback_deliveries_pipeline_id_pipelines"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_deliveries")),
        sa.UniqueConstraint("webhook_id", name=op.f("uq_callback_deliveries_webhook_id")),
    )
    op.create_index("ix_callback_deliveries_due", "callback_deliveries", ["state", "next_try_at"])
    op.create_index(op.f("ix_callback_deliveries_pipeline_id"), "callback_deliveries", ["pipeline_id"])
    op.create_index(
        "ix_spend_caps_reached",
        "spend_caps",
        ["updated_at"],
        postgresql_where=sa.text("alerted_pct >= 100"),
        sqlite_where=sa.text("alerted_pct >= 100"),
    )


def downgrade() -> None:
    op.drop_index("ix_spend_caps_reached", table_name="spend_caps")
    op.drop_index(op.f("ix_callback_deliveries_pipeline_id"), table_name="callback_deliveries")
    op.drop_index("ix_callback_deliveries_due", table_name="callback_deliveries")
    op.drop_table("callback_deliveries")
