"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-27 00:17:12.647705
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op




revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('pipelines',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('user_id', sa.String(length=128), nullable=False),
    sa.Column('feature', sa.String(length=64), nullable=False),
    sa.Column('profile', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('image_ref', sa.Text(), nullable=False),
    sa.Column('image_url', sa.Text(), nullable=False),
    sa.Column('callback_url', sa.Text(), nullable=True),
    sa.Column('priority', sa.String(length=16), nullable=False),
    sa.Column('models', sa.JSON(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('estimated_cost_usd', sa.Numeric(precision=14, scale=6), nullable=False),
    sa.Column('cost_usd', sa.Numeric(precision=14, scale=6), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipelines')),
    sa.UniqueConstraint('user_id', 'idempotency_key', name=op.f('uq_pipelines_user_id'))
    )
    with op.batch_alter_table('pipelines', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pipelines_status'), ['status'], unique=False)

    op.create_table('provider_calls',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('ts', sa.DateTime(), nullable=False),
    sa.Column('user_id', sa.String(length=128), nullable=True),
    sa.Column('feature', sa.String(length=64), nullable=True),
    sa.Column('pipeline_id', sa.String(length=40), nullable=True),
    sa.Column('step_id', sa.String(length=40), nullable=True),
    sa.Column('operation', sa.String(length=16), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=True),
    sa.Column('request_id', sa.String(length=128), nullable=True),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('latency_ms', sa.Double(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('units', sa.Double(), nullable=True),
    sa.Column('cost_usd', sa.Numeric(precision=14, scale=6), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_provider_calls'))
    )
    with op.batch_alter_table('provider_calls', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_provider_calls_pipeline_id'), ['pipeline_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_provider_calls_ts'), ['ts'], unique=False)

    op.create_table('steps',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('pipeline_id', sa.String(length=40), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=True),
    sa.Column('output', sa.JSON(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['pipeline_id'], ['pipelines.id'], name=op.f('fk_steps_pipeline_id_pipelines'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_steps')),
    sa.UniqueConstraint('pipeline_id', 'position', name=op.f('uq_steps_pipeline_id'))
    )
    with op.batch_alter_table('steps', schema=None) as batch_op:
        batch_op.create_index('ix_steps_status_updated', ['status', 'updated_at'], unique=False)

    op.create_table('provider_jobs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('step_id', sa.String(length=40), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=120), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('task_id', sa.String(length=128), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('progress', sa.Integer(), nullable=False),
    sa.Column('estimated_time_s', sa.Integer(), nullable=True),
    sa.Column('next_poll_at', sa.DateTime(), nullable=True),
    sa.Column('lease_until', sa.DateTime(), nullable=True),
    sa.Column('polls', sa.Integer(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('units', sa.Double(), nullable=False),
    sa.Column('cost_usd', sa.Numeric(precision=14, scale=6), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('submitted_at', sa.DateTime(), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['step_id'], ['steps.id'], name=op.f('fk_provider_jobs_step_id_steps'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_provider_jobs')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_provider_jobs_idempotency_key')),
    sa.UniqueConstraint('task_id', name=op.f('uq_provider_jobs_task_id'))
    )
    with op.batch_alter_table('provider_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_provider_jobs_due', ['status', 'next_poll_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_provider_jobs_step_id'), ['step_id'], unique=False)

    op.create_table('stored_objects',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('pipeline_id', sa.String(length=40), nullable=False),
    sa.Column('step_id', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('location', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('content_type', sa.String(length=100), nullable=False),
    sa.Column('source_expires_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['pipeline_id'], ['pipelines.id'], name=op.f('fk_stored_objects_pipeline_id_pipelines'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['step_id'], ['steps.id'], name=op.f('fk_stored_objects_step_id_steps'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stored_objects')),
    sa.UniqueConstraint('key', name=op.f('uq_stored_objects_key'))
    )
    with op.batch_alter_table('stored_objects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_stored_objects_pipeline_id'), ['pipeline_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_stored_objects_step_id'), ['step_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('stored_objects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_stored_objects_step_id'))
        batch_op.drop_index(batch_op.f('ix_stored_objects_pipeline_id'))

    op.drop_table('stored_objects')
    with op.batch_alter_table('provider_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_provider_jobs_step_id'))
        batch_op.drop_index('ix_provider_jobs_due')

    op.drop_table('provider_jobs')
    with op.batch_alter_table('steps', schema=None) as batch_op:
        batch_op.drop_index('ix_steps_status_updated')

    op.drop_table('steps')
    with op.batch_alter_table('provider_calls', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_provider_calls_ts'))
        batch_op.drop_index(batch_op.f('ix_provider_calls_pipeline_id'))

    op.drop_table('provider_calls')
    with op.batch_alter_table('pipelines', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pipelines_status'))

    op.drop_table('pipelines')
