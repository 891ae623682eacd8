"""Money as a resource: spend caps and the holds pipelines reserve against them, an estimate kept
beside the actual cost, costs booked as estimates when a call's outcome is unknown, a response
cache for the copy step, draft pipelines promoted to a premium render, and overnight batch windows

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

MONEY = sa.Numeric(14, 6)


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch_op:
        batch_op.add_column(sa.Column("estimate", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("reserved_usd", MONEY, nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("no_cache", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("promoted_from", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("batch_window", sa.String(length=16), nullable=True))
    with op.batch_alter_table("provider_calls") as batch_op:
        batch_op.add_column(sa.Column("cost_estimated", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("cache_hit", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "spend_caps",
        sa.Column("id", sa.String(length=300), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("period_start", sa.String(length=10), nullable=False),
        sa.Column("limit_micros", sa.BigInteger(), nullable=False),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("alerted_pct", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spend_caps")),
    )
    op.create_table(
        "spend_holds",
        sa.Column("pipeline_id", sa.String(length=40), nullable=False),
        sa.Column("cap_id", sa.String(length=300), nullable=False),
        sa.Column("held_micros", sa.BigInteger(), nullable=False, server_default="0"),
        sa.ForeignKeyConstraint(
            ["pipeline_id"], ["pipelines.id"], name=op.f("fk_spend_holds_pipeline_id_pipelines"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["cap_id"], ["spend_caps.id"], name=op.f("fk_spend_holds_cap_id_spend_caps")),
        sa.PrimaryKeyConstraint("pipeline_id", "cap_id", name=op.f("pk_spend_holds")),
    )
    op.create_table(
        "copy_cache",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_copy_cache")),
    )


def downgrade() -> None:
    op.drop_table("copy_cache")
    op.drop_table("spend_holds")
    op.drop_table("spend_caps")
    with op.batch_alter_table("provider_calls") as batch_op:
        batch_op.drop_column("cache_hit")
        batch_op.drop_column("cost_estimated")
    with op.batch_alter_table("pipelines") as batch_op:
        batch_op.drop_column("batch_window")
        batch_op.drop_column("promoted_from")
        batch_op.drop_column("no_cache")
        batch_op.drop_column("reserved_usd")
        batch_op.drop_column("estimate")
