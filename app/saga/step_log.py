"""The persistent saga log: every status change is a compare-and-set that also checks the
saga's epoch, and inserts one ``saga_events`` row in the same transaction.

Each write first touches the saga row under ``WHERE id AND epoch`` (taking its row lock on
PostgreSQL, the database lock on SQLite); zero rows means a newer claim owns the saga and the
caller gets :class:`LostOwnership`. Events are numbered per saga under that same lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Result, and_, exists, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from app.db.models import SagaEventRow, SagaRow, SagaStepRow
from app.db.session import Database
from app.faults import fault_point
from app.saga.errors import InvalidTransition, LostOwnership
from app.saga.states import (
    ACTIVE_SAGA_STATUSES,
    ALLOWED_SAGA_TRANSITIONS,
    SagaStatus,
    StepStatus,
    saga_sources_of,
    sources_of,
)

#: Statuses that hold their partition: later sagas of the same partition wait behind them.
#: ``failed`` is included because its partition may be half rolled back.
_BLOCKING = [
    SagaStatus.PENDING.value,
    SagaStatus.RUNNING.value,
    SagaStatus.COMPENSATING.value,
    SagaStatus.FAILED.value,
]


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE/DELETE (what every compare-and-set checks)."""
    return int(cast("CursorResult[Any]", result).rowcount)


def utcnow() -> datetime:
    """Naive UTC: the log stores naive UTC timestamps on both backends."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Claim:
    saga_id: str
    epoch: int
    status: SagaStatus
    attempts: int
    definition: str


@dataclass(frozen=True)
class NewSaga:
    id: str
    definition: str
    dataset: str
    partition_date: date
    request: dict[str, Any]
    manifest: dict[str, Any]
    request_fingerprint: str
    idempotency_key: str | None
    steps: list[str]
    #: Who submitted it (an API key id; '' in-process). Idempotency keys are unique per owner.
    owner: str = ""


class ActiveLimitReached(Exception):
    """The owner already has as many unfinished sagas as it may."""


ACTIVE = (SagaStatus.PENDING.value, SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)


class StepLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create_saga(self, new: NewSaga, max_active: int = 0) -> tuple[SagaRow, bool]:
        """Insert the saga, its steps and its first event. Returns (row, created).

        With an idempotency key already used, returns the existing saga (created=False); the
        caller compares fingerprints. With ``max_active``, raises ActiveLimitReached if the
        owner already has that many unfinished sagas (checked under a per-owner lock).
        """
        now = utcnow()
        try:
            with self.db.transaction() as s:
                if max_active:
                    self._check_active(s, new.owner, max_active)
                row = SagaRow(
                    id=new.id,
                    definition=new.definition,
                    dataset=new.dataset,
                    partition_date=new.partition_date,
                    status=SagaStatus.PENDING.value,
                    request=new.request,
                    manifest=new.manifest,
                    owner=new.owner,
                    idempotency_key=new.idempotency_key,
                    request_fingerprint=new.request_fingerprint,
                    epoch=0,
                    attempts=0,
                    cancel_requested=False,
                    created_at=now,
                    updated_at=now,
                )
                s.add(row)
                s.flush()
                s.execute(
                    insert(SagaStepRow),
                    [
                        {"saga_id": new.id, "step": name, "position": i, "status": "pending",
                         "attempt": 0, "compensation_attempt": 0}
                        for i, name in enumerate(new.steps)
                    ],
                )
                _append_event(s, new.id, 0, "created", None, {"status": SagaStatus.PENDING.value})
            return row, True
        except IntegrityError:
            if new.idempotency_key is None:
                raise
            existing = self.find_by_idempotency_key(new.owner, new.idempotency_key)
            if existing is None:
                raise
            return existing, False

    def _check_active(self, s: Session, owner: str, max_active: int) -> None:
        if self.db.is_postgres:  # SQLite already serializes writers (BEGIN IMMEDIATE)
            s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})
        active = s.scalar(select(func.count()).select_from(SagaRow)
                          .where(SagaRow.owner == owner, SagaRow.status.in_(ACTIVE)))
        if (active or 0) >= max_active:
            raise ActiveLimitReached(f"{active} sagas of this key are unfinished "
                                     f"(limit {max_active})")

    def find_by_idempotency_key(self, owner: str, key: str) -> SagaRow | None:
        with self.db.sessions() as s:
            return s.scalars(select(SagaRow).where(SagaRow.owner == owner,
                                                   SagaRow.idempotency_key == key)).first()

    def get(self, saga_id: str) -> SagaRow | None:
        with self.db.sessions() as s:
            return s.get(SagaRow, saga_id)

    def steps(self, saga_id: str) -> list[SagaStepRow]:
        with self.db.sessions() as s:
            return list(
                s.scalars(
                    select(SagaStepRow)
                    .where(SagaStepRow.saga_id == saga_id)
                    .order_by(SagaStepRow.position)
                )
            )

    def events(self, saga_id: str, after_seq: int = 0, limit: int = 1000) -> list[SagaEventRow]:
        with self.db.sessions() as s:
            return list(
                s.scalars(
                    select(SagaEventRow)
                    .where(SagaEventRow.saga_id == saga_id, SagaEventRow.seq > after_seq)
                    .order_by(SagaEventRow.seq)
                    .limit(limit)
                )
            )

    def claim_next(self, owner: str, lease_ttl_s: float) -> Claim | None:
        """Claim one runnable saga: pending, or active with an expired lease (crash recovery).

        The oldest non-terminal saga of a partition goes first; the others wait behind it.
        """
        now = utcnow()
        other = aliased(SagaRow)
        earlier_blocker = exists().where(
            other.dataset == SagaRow.dataset,
            other.partition_date == SagaRow.partition_date,
            other.status.in_(_BLOCKING),
            or_(
                other.created_at < SagaRow.created_at,
                and_(other.created_at == SagaRow.created_at, other.id < SagaRow.id),
            ),
        )
        runnable = or_(
            SagaRow.status == SagaStatus.PENDING.value,
            and_(
                SagaRow.status.in_([s.value for s in ACTIVE_SAGA_STATUSES]),
                or_(SagaRow.lease_expires_at.is_(None), SagaRow.lease_expires_at < now),
            ),
        )
        query = (
            select(SagaRow.id, SagaRow.epoch, SagaRow.status, SagaRow.attempts, SagaRow.definition)
            .where(
                runnable,
                or_(SagaRow.not_before.is_(None), SagaRow.not_before <= now),
                ~earlier_blocker,
            )
            .order_by(SagaRow.created_at, SagaRow.id)
            .limit(1)
        )
        with self.db.transaction() as s:
            if self.db.is_postgres:
                query = query.with_for_update(skip_locked=True, of=SagaRow)
            found = s.execute(query).first()
            if found is None:
                return None
            saga_id, epoch, status, attempts, definition = found
            new_status = SagaStatus.RUNNING if status == SagaStatus.PENDING else SagaStatus(status)
            result = s.execute(
                update(SagaRow)
                .where(SagaRow.id == saga_id, SagaRow.epoch == epoch, SagaRow.status == status)
                .values(
                    status=new_status.value,
                    epoch=epoch + 1,
                    attempts=attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_ttl_s),
                    not_before=None,
                    updated_at=now,
                )
            )
            if rowcount(result) != 1:
                return None
            payload: dict[str, Any] = {"owner": owner, "attempts": attempts + 1}
            if new_status.value != status:
                payload.update({"from": status, "to": new_status.value})
            _append_event(s, saga_id, epoch + 1, "claimed", None, payload)
        fault_point("saga.claimed")
        return Claim(saga_id, epoch + 1, new_status, attempts + 1, definition)

    def renew_lease(self, saga_id: str, epoch: int, owner: str, lease_ttl_s: float) -> bool:
        now = utcnow()
        with self.db.transaction() as s:
            result = s.execute(
                update(SagaRow)
                .where(
                    SagaRow.id == saga_id,
                    SagaRow.epoch == epoch,
                    SagaRow.lease_owner == owner,
                    SagaRow.status.in_([x.value for x in ACTIVE_SAGA_STATUSES]),
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_ttl_s))
            )
            return rowcount(result) == 1

    def release(self, saga_id: str, epoch: int, *, retry_after_s: float | None = None) -> None:
        """Give the lease up; with ``retry_after_s`` the saga is claimable again after that."""
        now = utcnow()
        not_before = now + timedelta(seconds=retry_after_s) if retry_after_s is not None else None
        with self.db.transaction() as s:
            s.execute(
                update(SagaRow)
                .where(SagaRow.id == saga_id, SagaRow.epoch == epoch)
                .values(lease_owner=None, lease_expires_at=None, not_before=not_before)
            )

    def ensure_owner(self, saga_id: str, epoch: int) -> None:
        with self.db.sessions() as s:
            current = s.scalar(select(SagaRow.epoch).where(SagaRow.id == saga_id))
        if current != epoch:
            raise LostOwnership(f"saga {saga_id}: epoch {epoch} superseded by {current}")

    def cancel_requested(self, saga_id: str) -> bool:
        with self.db.sessions() as s:
            return bool(s.scalar(select(SagaRow.cancel_requested).where(SagaRow.id == saga_id)))

    def transition_saga(
        self, saga_id: str, epoch: int, target: SagaStatus, *, error: str | None = None
    ) -> None:
        if not saga_sources_of(target):
            raise InvalidTransition(f"no transition leads to {target}")
        now = utcnow()
        with self.db.transaction() as s:
            current = lock_owned(s, saga_id, epoch)
            if target not in ALLOWED_SAGA_TRANSITIONS[SagaStatus(current)]:
                raise InvalidTransition(f"saga {saga_id}: {current} -> {target}")
            values: dict[str, Any] = {"status": target.value, "updated_at": now}
            if error is not None:
                values["error"] = error
            if target in (SagaStatus.SUCCEEDED, SagaStatus.COMPENSATED, SagaStatus.FAILED):
                values.update(finished_at=now, lease_owner=None, lease_expires_at=None)
            _cas(s, SagaRow, [SagaRow.id == saga_id, SagaRow.epoch == epoch,
                              SagaRow.status == current], values, saga_id)
            payload: dict[str, Any] = {"from": current, "to": target.value}
            if error:
                payload["error"] = error
            _append_event(s, saga_id, epoch, "status", None, payload)
        fault_point(f"saga.{target.value}")

    def update_step(
        self,
        saga_id: str,
        epoch: int,
        step: str,
        target: StepStatus,
        *,
        kind: str,
        values: dict[str, Any],
        payload: dict[str, Any] | None = None,
    ) -> None:
        """Move a step to ``target`` (compare-and-set on its current status and the epoch)."""
        with self.db.transaction() as s:
            lock_owned(s, saga_id, epoch)
            _cas(
                s,
                SagaStepRow,
                [SagaStepRow.saga_id == saga_id, SagaStepRow.step == step,
                 SagaStepRow.status.in_(sources_of(target))],
                {"status": target.value, **values},
                f"{saga_id}/{step} -> {target}",
                error=InvalidTransition,
            )
            _append_event(s, saga_id, epoch, kind, step, {"to": target.value, **(payload or {})})

    def save_checkpoint(self, saga_id: str, epoch: int, step: str, data: dict[str, Any]) -> None:
        with self.db.transaction() as s:
            lock_owned(s, saga_id, epoch)
            s.execute(
                update(SagaStepRow)
                .where(SagaStepRow.saga_id == saga_id, SagaStepRow.step == step)
                .values(checkpoint=data)
            )
            _append_event(s, saga_id, epoch, "checkpoint", step, data)
        fault_point(f"{step}.after_checkpoint")

    def skip_pending_steps(self, saga_id: str, epoch: int, steps: Iterable[str]) -> None:
        names = list(steps)
        if not names:
            return
        with self.db.transaction() as s:
            lock_owned(s, saga_id, epoch)
            result = s.execute(
                update(SagaStepRow)
                .where(SagaStepRow.saga_id == saga_id, SagaStepRow.step.in_(names),
                       SagaStepRow.status == StepStatus.PENDING.value)
                .values(status=StepStatus.SKIPPED.value)
            )
            if rowcount(result):
                _append_event(s, saga_id, epoch, "steps_skipped", None, {"steps": names})

    def record_event(
        self, saga_id: str, epoch: int, kind: str, step: str | None, payload: dict[str, Any]
    ) -> None:
        with self.db.transaction() as s:
            lock_owned(s, saga_id, epoch)
            _append_event(s, saga_id, epoch, kind, step, payload)

    def retry_failed(self, saga_id: str) -> bool:
        """Send a ``failed`` saga back to ``compensating`` with a fresh attempt budget.

        An operator action: no epoch is held, the next claim fences off anything older.
        False when the saga is not ``failed``.
        """
        now = utcnow()
        with self.db.transaction() as s:
            earlier = s.scalar(select(SagaRow.error).where(SagaRow.id == saga_id))
            row = s.execute(
                update(SagaRow)
                .where(SagaRow.id == saga_id, SagaRow.status == SagaStatus.FAILED.value)
                .values(status=SagaStatus.COMPENSATING.value, attempts=0, lease_owner=None,
                        lease_expires_at=None, not_before=None, finished_at=None,
                        updated_at=now,
                        error=f"retried by an operator after: {earlier}"[:4000])
                .returning(SagaRow.epoch)
            ).first()
            if row is None:
                return False
            _append_event(s, saga_id, row[0], "status", None,
                          {"from": SagaStatus.FAILED.value, "to": SagaStatus.COMPENSATING.value,
                           "reason": "retry requested"})
        return True

    def request_cancel(self, saga_id: str) -> SagaRow | None:
        """Flag a saga for cancellation; its owner compensates it at the next step boundary."""
        with self.db.transaction() as s:
            row = s.get(SagaRow, saga_id, with_for_update=True)
            if row is None:
                return None
            if not row.cancel_requested:
                row.cancel_requested = True
                row.updated_at = utcnow()
                s.flush()
                _append_event(s, saga_id, row.epoch, "cancel_requested", None, {})
            return row


def lock_owned(s: Session, saga_id: str, epoch: int) -> str:
    """Touch the saga row under the caller's epoch (locking it) and return its status.

    Raises LostOwnership when a newer claim has superseded the epoch.
    """
    result = s.execute(
        update(SagaRow)
        .where(SagaRow.id == saga_id, SagaRow.epoch == epoch)
        .values(updated_at=utcnow())
        .returning(SagaRow.status)
    )
    status = result.scalar_one_or_none()
    if status is None:
        raise LostOwnership(f"saga {saga_id}: epoch {epoch} is no longer the owner")
    return str(status)


def _cas(
    s: Session,
    model: type,
    conditions: list[Any],
    values: dict[str, Any],
    what: str,
    error: type[Exception] = LostOwnership,
) -> None:
    result = s.execute(update(model).where(*conditions).values(**values))
    if rowcount(result) != 1:
        raise error(f"compare-and-set failed: {what}")


def _append_event(
    s: Session, saga_id: str, epoch: int, kind: str, step: str | None, payload: dict[str, Any]
) -> None:
    seq = s.scalar(
        select(func.coalesce(func.max(SagaEventRow.seq), 0)).where(SagaEventRow.saga_id == saga_id)
    )
    s.add(
        SagaEventRow(
            saga_id=saga_id,
            seq=int(seq or 0) + 1,
            kind=kind,
            step=step,
            epoch=epoch,
            payload=payload,
            created_at=utcnow(),
        )
    )
    s.flush()
