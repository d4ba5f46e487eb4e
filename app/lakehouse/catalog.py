"""The data catalog: one entry per (dataset, layer, partition) with rows, the lake snapshot that
holds them, the saga that wrote them, and lineage back to the raw files.

Registration records the entries it replaces before writing them, so compensation can put the
previous entries back (or remove ours when there were none).
"""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import delete, insert, select

from app.db.models import CatalogPartitionRow
from app.db.rows import utcnow
from app.db.session import Database
from app.faults import fault_point
from app.saga.step_log import lock_owned

_FIELDS = ("table_name", "saga_id", "rows", "snapshot_id", "lineage")


def current_entries(db: Database, dataset: str, partition_date: date) -> list[dict[str, Any]]:
    with db.read_sessions() as s:
        rows = s.scalars(
            select(CatalogPartitionRow)
            .where(CatalogPartitionRow.dataset == dataset,
                   CatalogPartitionRow.partition_date == partition_date)
            .order_by(CatalogPartitionRow.layer)
        )
        return [_as_dict(r) for r in rows]


def _as_dict(row: CatalogPartitionRow) -> dict[str, Any]:
    return {
        "layer": row.layer,
        **{f: getattr(row, f) for f in _FIELDS},
        "registered_at": row.registered_at.isoformat() + "Z",
    }


def replace_entries(db: Database, dataset: str, partition_date: date,
                    entries: list[dict[str, Any]], *, point: str, saga_id: str,
                    epoch: int) -> None:
    """Make the partition's catalog entries exactly ``entries`` (one transaction, idempotent).

    The saga's epoch is checked (and its row locked) in the same transaction, so a worker that
    lost the saga cannot write the catalog. ``point`` names the fault points
    ``<point>.before_commit`` and ``<point>.after_commit``.
    """
    now = utcnow()
    with db.transaction() as s:
        lock_owned(s, saga_id, epoch)
        s.execute(
            delete(CatalogPartitionRow).where(
                CatalogPartitionRow.dataset == dataset,
                CatalogPartitionRow.partition_date == partition_date,
            )
        )
        if entries:
            # One multi-row INSERT, not an ORM flush of the rows: that is an executemany, which
            # psycopg pipelines and ends with Sync then Flush. The server arms its
            # idle_in_transaction_session_timeout as it answers the Sync, disarms it when the
            # Flush arrives, and arms it again only at a Sync: a worker paused here (a zombie)
            # kept the saga row locked past its lease, and no other worker could claim the saga.
            s.execute(insert(CatalogPartitionRow).values([
                {"dataset": dataset, "partition_date": partition_date, "layer": entry["layer"],
                 "registered_at": now, **{f: entry[f] for f in _FIELDS}}
                for entry in entries
            ]))
        fault_point(f"{point}.before_commit")
    fault_point(f"{point}.after_commit")
