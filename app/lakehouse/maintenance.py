"""Lake maintenance (``lakesaga maintenance``): expire old snapshots and delete the data files
only they referenced, but never a snapshot that an unfinished saga may still restore.

Silver and gold record the snapshot they start from (``before_snapshot`` in their checkpoint)
before they write, and their compensations restore the partition ``AT (VERSION => it)``. A saga
that is pending, running, compensating or failed (an operator may retry it) can still be rolled
back, so the oldest snapshot such a saga recorded is a *floor*: only snapshots older than the
floor (and older than ``older_than``) are expired; the floor itself and everything after it stay.

A step reads the current snapshot and records it a moment later, in another transaction.
Maintenance therefore reads the current snapshot *before* the recorded ones (a snapshot recorded
after that read is no older than it), and keeps every snapshot that was current less than
``margin_s`` ago (one being recorded right now, superseded meanwhile by another commit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from app.db.models import SagaRow, SagaStepRow
from app.db.session import Database
from app.lakehouse.duck import LAKE, Lake, first_row
from app.saga.states import SagaStatus

#: Statuses of a saga whose recorded snapshots may still be restored.
UNFINISHED = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.FAILED)
#: Snapshots that were current this recently are kept whatever ``older_than`` says.
PIN_MARGIN_S = 60.0
_INTERVAL = re.compile(r"\d{1,6} (second|minute|hour|day|week)s?")


@dataclass(frozen=True)
class Expiry:
    """What one maintenance run did."""

    #: Snapshot ids expired.
    expired: list[int]
    #: The oldest snapshot kept for rollbacks (everything from it on was kept).
    floor: int
    #: Unfinished sagas -> the oldest snapshot each may restore.
    pinned: dict[str, int]


def check_interval(text: str) -> str:
    """A DuckDB interval like ``7 days`` or ``12 hours``; ValueError otherwise."""
    if not _INTERVAL.fullmatch(text.strip()):
        raise ValueError("use e.g. '7 days' or '12 hours'")
    return text.strip()


def pinned_snapshots(db: Database) -> dict[str, int]:
    """The oldest ``before_snapshot`` each unfinished saga recorded (sagas that recorded none
    are left out)."""
    query = (select(SagaStepRow.saga_id, SagaStepRow.checkpoint)
             .join(SagaRow, SagaRow.id == SagaStepRow.saga_id)
             .where(SagaRow.status.in_([s.value for s in UNFINISHED]),
                    SagaStepRow.checkpoint.is_not(None)))
    pins: dict[str, int] = {}
    with db.read_sessions() as s:
        for saga_id, checkpoint in s.execute(query):
            before = (checkpoint or {}).get("before_snapshot")
            if before is not None:
                pins[saga_id] = min(int(before), pins.get(saga_id, int(before)))
    return pins


def expire_snapshots(db: Database, lake: Lake, older_than: str, *,
                     margin_s: float = PIN_MARGIN_S) -> Expiry:
    """Expire the snapshots older than ``older_than`` that no unfinished saga may restore, then
    delete the files no remaining snapshot references."""
    interval = check_interval(older_than)
    cur = lake.cursor()
    with lake.write_guard:
        current = lake.current_snapshot(cur)
        pinned = pinned_snapshots(db)
        floor = min([current, *pinned.values()])
        # The snapshot that was current margin_s ago: it and every later one may be in a
        # step's hands between reading the current snapshot and recording it.
        row = first_row(cur.execute(
            f"SELECT max(snapshot_id) FROM ducklake_snapshots('{LAKE}') "
            "WHERE snapshot_time <= now() - to_microseconds(?::BIGINT)",
            [int(margin_s * 1_000_000)]))
        floor = min(floor, int(row[0]) if row and row[0] is not None else 0)
        versions = [int(r[0]) for r in cur.execute(
            f"SELECT snapshot_id FROM ducklake_snapshots('{LAKE}') WHERE snapshot_id < ? "
            f"AND snapshot_time < now() - INTERVAL '{interval}' ORDER BY snapshot_id",
            [floor]).fetchall()]
        if versions:
            listed = ", ".join(str(v) for v in versions)
            cur.execute(f"CALL ducklake_expire_snapshots('{LAKE}', versions => [{listed}])")
        cur.execute(f"CALL ducklake_cleanup_old_files('{LAKE}', cleanup_all => true)")
    return Expiry(versions, floor, pinned)


def describe(result: Expiry) -> dict[str, Any]:
    """The run as the CLI prints it."""
    return {"expired": len(result.expired), "kept_from_snapshot": result.floor,
            "sagas_pinning_snapshots": len(result.pinned)}
