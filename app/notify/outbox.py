"""The notification outbox: one row per (saga, consumer, event) with a stable idempotency key.

Enqueueing is idempotent (a re-run of the notify step adds nothing), so every consumer of a
succeeded saga gets at least one delivery, all carrying the same key.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, select

from app.db.models import ConsumerRow, OutboxRow
from app.db.rows import utcnow
from app.db.session import Database, run_on_driver
from app.faults import fault_point
from app.saga.step_log import lock_owned

PARTITION_READY = "partition.ready"


def idempotency_key(saga_id: str, consumer_id: str, event_type: str) -> str:
    return f"{saga_id}:{consumer_id}:{event_type}"


def enqueue_for_dataset(db: Database, saga_id: str, epoch: int, dataset: str, event_type: str,
                        payload: dict[str, Any], *, point: str = "notify_downstream") -> list[str]:
    """Queue ``payload`` for every consumer of ``dataset``; returns the consumer names.

    Fenced like every saga write: the saga's epoch is checked in the same transaction.
    """
    now = utcnow()
    with db.transaction() as s:
        lock_owned(s, saga_id, epoch)
        consumers = list(s.scalars(select(ConsumerRow).where(ConsumerRow.dataset == dataset)
                                   .order_by(ConsumerRow.name)))
        existing = set(s.scalars(select(OutboxRow.consumer_id).where(
            OutboxRow.saga_id == saga_id, OutboxRow.event_type == event_type)))
        for consumer in consumers:
            if consumer.id in existing:
                continue
            s.add(OutboxRow(
                saga_id=saga_id,
                consumer_id=consumer.id,
                event_type=event_type,
                idempotency_key=idempotency_key(saga_id, consumer.id, event_type),
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            ))
        s.flush()
        fault_point(f"{point}.before_commit")
    fault_point(f"{point}.after_commit")
    return [c.name for c in consumers]


_DELIVERIES = (
    select(ConsumerRow.name, OutboxRow.consumer_id, OutboxRow.event_type,
           OutboxRow.idempotency_key, OutboxRow.status, OutboxRow.attempts,
           OutboxRow.last_status_code, OutboxRow.last_error, OutboxRow.delivered_at)
    .join(ConsumerRow, ConsumerRow.id == OutboxRow.consumer_id)
    .where(OutboxRow.saga_id == bindparam("saga_id"))
    .order_by(ConsumerRow.name)
)


def deliveries_for_saga(conn: Connection, saga_id: str) -> list[dict[str, Any]]:
    """The saga's webhook deliveries (payloads left out), read on the caller's connection."""
    return [
        {
            "consumer": row.name,
            "consumer_id": row.consumer_id,
            "event": row.event_type,
            "idempotency_key": row.idempotency_key,
            "status": row.status,
            "attempts": row.attempts,
            "last_status_code": row.last_status_code,
            "last_error": row.last_error,
            "delivered_at": row.delivered_at.isoformat() + "Z" if row.delivered_at else None,
        }
        for row in run_on_driver(conn, _DELIVERIES, {"saga_id": saga_id}).rows
    ]
