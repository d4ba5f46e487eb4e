"""saga log, outbox, consumers, catalog

Revision ID: 0001
Revises:
Create Date: 2026-11-26 13:02:25.162878
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('catalog_partitions',
    sa.Column('dataset', sa.String(length=63), nullable=False),
    sa.Column('layer', sa.String(length=10), nullable=False),
    sa.Column('partition_date', sa.Date(), nullable=False),
    sa.Column('table_name', sa.String(length=200), nullable=False),
    sa.Column('saga_id', sa.String(length=36), nullable=False),
    sa.Column('rows', sa.BigInteger(), nullable=False),
    sa.Column('snapshot_id', sa.BigInteger(), nullable=False),
    sa.Column('lineage', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('registered_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("layer IN ('bronze', 'silver', 'gold')", name=op.f('ck_catalog_partitions_layer')),
    sa.PrimaryKeyConstraint('dataset', 'layer', 'partition_date', name=op.f('pk_catalog_partitions'))
    )
    op.create_table('consumers',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('dataset', sa.String(length=63), nullable=False),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('secret', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_consumers')),
    sa.UniqueConstraint('dataset', 'name', name='uq_consumers_dataset_name')
    )
    op.create_table('sagas',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('definition', sa.String(length=100), nullable=False),
    sa.Column('dataset', sa.String(length=63), nullable=False),
    sa.Column('partition_date', sa.Date(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('request', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('manifest', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('request_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('not_before', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'running', 'succeeded', 'compensating', 'compensated', 'failed')", name=op.f('ck_sagas_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sagas')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_sagas_idempotency_key'))
    )
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.create_index('ix_sagas_claim', ['status', 'lease_expires_at'], unique=False)
        batch_op.create_index('ix_sagas_created', ['created_at', 'id'], unique=False)
        batch_op.create_index('ix_sagas_partition', ['dataset', 'partition_date', 'status'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('saga_id', sa.String(length=36), nullable=False),
    sa.Column('consumer_id', sa.String(length=36), nullable=False),
    sa.Column('event_type', sa.String(length=60), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('last_status_code', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('delivered_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'dead')", name=op.f('ck_outbox_status')),
    sa.ForeignKeyConstraint(['consumer_id'], ['consumers.id'], name=op.f('fk_outbox_consumer_id_consumers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['saga_id'], ['sagas.id'], name=op.f('fk_outbox_saga_id_sagas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_outbox_idempotency_key'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_due', ['status', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_outbox_saga', ['saga_id'], unique=False)

    op.create_table('saga_events',
    sa.Column('saga_id', sa.String(length=36), nullable=False),
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('step', sa.String(length=100), nullable=True),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['saga_id'], ['sagas.id'], name=op.f('fk_saga_events_saga_id_sagas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('saga_id', 'seq', name=op.f('pk_saga_events'))
    )
    op.create_table('saga_steps',
    sa.Column('saga_id', sa.String(length=36), nullable=False),
    sa.Column('step', sa.String(length=100), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('checkpoint', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('output', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('compensation_attempt', sa.Integer(), nullable=False),
    sa.Column('compensation_output', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('compensation_error', sa.Text(), nullable=True),
    sa.Column('compensation_started_at', sa.DateTime(), nullable=True),
    sa.Column('compensation_finished_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'running', 'succeeded', 'failed', 'compensating', 'compensated', 'skipped')", name=op.f('ck_saga_steps_status')),
    sa.ForeignKeyConstraint(['saga_id'], ['sagas.id'], name=op.f('fk_saga_steps_saga_id_sagas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('saga_id', 'step', name=op.f('pk_saga_steps'))
    )


def downgrade() -> None:
    op.drop_table('saga_steps')
    op.drop_table('saga_events')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_saga')
        batch_op.drop_index('ix_outbox_due')

    op.drop_table('outbox')
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.drop_index('ix_sagas_partition')
        batch_op.drop_index('ix_sagas_created')
        batch_op.drop_index('ix_sagas_claim')

    op.drop_table('sagas')
    op.drop_table('consumers')
    op.drop_table('catalog_partitions')
