"""sagas.event_seq (the saga's last event number) and ix_sagas_fifo (claims in FIFO order)

Transitions number their event by incrementing event_seq under the saga's row lock instead of
reading max(saga_events.seq); existing sagas are backfilled from their events. A claim walks
ix_sagas_fifo (status, created_at, id) from the oldest pending saga instead of sorting them all.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 16:09:17.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('event_seq', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index('ix_sagas_fifo', ['status', 'created_at', 'id'], unique=False)
    op.execute(
        "UPDATE sagas SET event_seq = "
        "(SELECT coalesce(max(seq), 0) FROM saga_events WHERE saga_events.saga_id = sagas.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.drop_index('ix_sagas_fifo')
        batch_op.drop_column('event_seq')
