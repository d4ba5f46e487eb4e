"""SQLAlchemy models: the saga log (sagas, saga_steps, saga_events), the outbox, consumers and
the data catalog. One schema for PostgreSQL and SQLite; times are naive UTC."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base
from app.saga.states import SagaStatus, StepStatus

JsonType = JSON().with_variant(JSONB(), "postgresql")


def _in_check(column: str, values: list[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class SagaRow(Base):
    __tablename__ = "sagas"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    definition: Mapped[str] = mapped_column(String(100))
    dataset: Mapped[str] = mapped_column(String(63))
    partition_date: Mapped[date] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(20), default=SagaStatus.PENDING.value)
    request: Mapped[dict[str, Any]] = mapped_column(JsonType)
    manifest: Mapped[dict[str, Any]] = mapped_column(JsonType)
    #: The API key that submitted the saga ('' when submitted in-process, e.g. by the CLI).
    owner: Mapped[str] = mapped_column(String(36), default="", server_default="")
    #: Unique per owner: two callers may use the same Idempotency-Key independently.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str] = mapped_column(String(64))
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime())
    #: Fencing token: incremented by every claim; writes carrying an older epoch are refused.
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    #: ``seq`` of the saga's last ``saga_events`` row: a transition increments it under the row
    #: lock and numbers its event with the result.
    event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The saga reached the head of its partition's FIFO queue: it is (or was) the oldest
    #: unfinished saga of its (dataset, partition_date). Set when the saga is created into an
    #: idle partition, or when the head before it finishes (in that saga's last transition);
    #: never cleared. A claim looks only at pending heads (``ix_sagas_queue_head``), so sagas
    #: queued behind a busy partition cost it nothing.
    queue_head: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: Do not claim before this time (backoff of a step after the pivot).
    not_before: Mapped[datetime | None] = mapped_column(DateTime())
    created_at: Mapped[datetime] = mapped_column(DateTime())
    updated_at: Mapped[datetime] = mapped_column(DateTime())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime())

    __table_args__ = (
        CheckConstraint(_in_check("status", [s.value for s in SagaStatus]), name="status"),
        Index("ix_sagas_claim", "status", "lease_expires_at"),
        #: The sagas of a partition in FIFO order per status: the next head when one finishes.
        Index("ix_sagas_partition", "dataset", "partition_date", "status", "created_at", "id"),
        Index("ix_sagas_created", "created_at", "id"),
        #: Claims walk the pending (and the abandoned) sagas oldest first and stop at the first.
        Index("ix_sagas_fifo", "status", "created_at", "id"),
        #: Claims walk the pending queue heads oldest first and take the first.
        Index("ix_sagas_queue_head", "queue_head", "status", "created_at", "id"),
        Index("ix_sagas_owner_status", "owner", "status"),
        UniqueConstraint("owner", "idempotency_key", name="uq_sagas_owner_idempotency_key"),
    )


class SagaStepRow(Base):
    __tablename__ = "saga_steps"

    saga_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("sagas.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[str] = mapped_column(String(100), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=StepStatus.PENDING.value)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    #: Intent recorded before the step writes (e.g. the lake snapshot it started from).
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    output: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime())
    compensation_attempt: Mapped[int] = mapped_column(Integer, default=0)
    compensation_output: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    compensation_error: Mapped[str | None] = mapped_column(Text)
    compensation_started_at: Mapped[datetime | None] = mapped_column(DateTime())
    compensation_finished_at: Mapped[datetime | None] = mapped_column(DateTime())

    __table_args__ = (
        CheckConstraint(_in_check("status", [s.value for s in StepStatus]), name="status"),
    )


class SagaEventRow(Base):
    __tablename__ = "saga_events"

    saga_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("sagas.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(40))
    step: Mapped[str | None] = mapped_column(String(100))
    epoch: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(DateTime())


class ConsumerRow(Base):
    __tablename__ = "consumers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    dataset: Mapped[str] = mapped_column(String(63))
    url: Mapped[str] = mapped_column(String(2048))
    #: HMAC key for the webhook signature; never returned by the API or logged.
    secret: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime())

    __table_args__ = (
        UniqueConstraint("dataset", "name", name="uq_consumers_dataset_name"),
    )


class OutboxRow(Base):
    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    saga_id: Mapped[str] = mapped_column(String(36), ForeignKey("sagas.id", ondelete="CASCADE"))
    consumer_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("consumers.id", ondelete="CASCADE")
    )
    event_type: Mapped[str] = mapped_column(String(60))
    #: Stable across retries and re-enqueues: consumers deduplicate on it.
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime())

    __table_args__ = (
        CheckConstraint(_in_check("status", ["pending", "delivered", "dead"]), name="status"),
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_saga", "saga_id"),
    )


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    #: Public part of the token (``lsk_<id>_<secret>``).
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    #: SHA-256 (hex) of the secret part; the secret itself is never stored.
    secret_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(DateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime())


class CatalogPartitionRow(Base):
    __tablename__ = "catalog_partitions"

    dataset: Mapped[str] = mapped_column(String(63), primary_key=True)
    layer: Mapped[str] = mapped_column(String(10), primary_key=True)
    partition_date: Mapped[date] = mapped_column(Date, primary_key=True)
    table_name: Mapped[str] = mapped_column(String(200))
    saga_id: Mapped[str] = mapped_column(String(36))
    rows: Mapped[int] = mapped_column(BigInteger)
    snapshot_id: Mapped[int] = mapped_column(BigInteger)
    #: Upstream tables/partitions and the raw files this partition was built from.
    lineage: Mapped[dict[str, Any]] = mapped_column(JsonType)
    registered_at: Mapped[datetime] = mapped_column(DateTime())

    __table_args__ = (
        CheckConstraint(_in_check("layer", ["bronze", "silver", "gold"]), name="layer"),
    )
