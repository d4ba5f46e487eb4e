"""sagas.queue_head (the saga reached the head of its partition's FIFO queue) and the indexes a
claim and a finish use to find heads without stepping over the sagas queued behind them

A claim used to walk every pending saga oldest first and skip those with an older unfinished
saga in their partition: 10,000 sagas queued behind one running saga made each claim read
10,000 rows. Now the oldest unfinished saga of each partition is marked when it becomes the head
and a claim reads only pending heads (ix_sagas_queue_head); a finishing head marks the next one
(ix_sagas_partition, now in FIFO order per status). Existing sagas are backfilled: the oldest
pending/running/compensating/failed saga of each partition is its head.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 19:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNFINISHED = "('pending', 'running', 'compensating', 'failed')"


def upgrade() -> None:
    # Plain ALTERs, no batch: SQLite adds a column with a constant default in place (a batch
    # would copy the table, and dropping the old one cascades to saga_steps and saga_events).
    op.add_column('sagas', sa.Column('queue_head', sa.Boolean(), server_default=sa.false(),
                                     nullable=False))
    op.drop_index('ix_sagas_partition', table_name='sagas')
    op.create_index('ix_sagas_partition', 'sagas',
                    ['dataset', 'partition_date', 'status', 'created_at', 'id'], unique=False)
    op.create_index('ix_sagas_queue_head', 'sagas', ['queue_head', 'status', 'created_at', 'id'],
                    unique=False)
    op.execute(
        f"UPDATE sagas SET queue_head = true WHERE status IN {_UNFINISHED} AND NOT EXISTS ("
        "SELECT 1 FROM sagas AS earlier WHERE earlier.dataset = sagas.dataset "
        "AND earlier.partition_date = sagas.partition_date "
        f"AND earlier.status IN {_UNFINISHED} AND (earlier.created_at < sagas.created_at "
        "OR (earlier.created_at = sagas.created_at AND earlier.id < sagas.id)))"
    )


def downgrade() -> None:
    op.drop_index('ix_sagas_queue_head', table_name='sagas')
    op.drop_index('ix_sagas_partition', table_name='sagas')
    op.create_index('ix_sagas_partition', 'sagas', ['dataset', 'partition_date', 'status'],
                    unique=False)
    # Plain DROP COLUMN on both backends (SQLite >= 3.35), not a batch: copying the table and
    # dropping the old one would cascade to saga_steps and saga_events.
    op.execute('ALTER TABLE sagas DROP COLUMN queue_head')
