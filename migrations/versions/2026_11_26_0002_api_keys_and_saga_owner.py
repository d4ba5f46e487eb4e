"""api keys, saga owner, idempotency keys per owner

Downgrading fails if two owners used the same Idempotency-Key (the old constraint was global).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 15:24:35.175755
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys'))
    )
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=36), server_default='', nullable=False))
        batch_op.drop_constraint(batch_op.f('uq_sagas_idempotency_key'), type_='unique')
        batch_op.create_index('ix_sagas_owner_status', ['owner', 'status'], unique=False)
        batch_op.create_unique_constraint('uq_sagas_owner_idempotency_key', ['owner', 'idempotency_key'])


def downgrade() -> None:
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.drop_constraint('uq_sagas_owner_idempotency_key', type_='unique')
        batch_op.drop_index('ix_sagas_owner_status')
        batch_op.create_unique_constraint(batch_op.f('uq_sagas_idempotency_key'), ['idempotency_key'])
        batch_op.drop_column('owner')

    op.drop_table('api_keys')
