"""The persistent saga log: every status change is a compare-and-set that also checks the
saga's epoch, and inserts one ``saga_events`` row, numbered per saga, in the same transaction.

Each transition first *fences* the saga row ``WHERE id AND epoch`` (locking it; zero rows means
a newer claim owns the saga and the caller gets :class:`LostOwnership`), which also yields the
event number and the saga's cancel flag; then the compare-and-set against
``ALLOWED_*_TRANSITIONS``; then the event. ``app.saga.statements`` holds the statements and how
each backend runs them (one transaction on SQLite, one statement on PostgreSQL).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import SagaEventRow, SagaRow, SagaStepRow
from app.db.rows import rowcount, utcnow
from app.db.session import Database, run_on_driver
from app.faults import fault_point
from app.saga import statements as sql
from app.saga.errors import CancelRequested, InvalidTransition, LostOwnership
from app.saga.statements import SAGAS, STEPS
from app.saga.states import (
    ALLOWED_SAGA_TRANSITIONS,
    FINISHED_SAGA_STATUSES,
    SagaStatus,
    StepStatus,
    saga_sources_of,
)


@dataclass(frozen=True)
class StepRecord:
    """What the log says about one step of a claimed saga."""

    step: str
    status: StepStatus
    attempt: int
    output: dict[str, Any] | None
    checkpoint: dict[str, Any] | None
    error: str | None
    compensation_attempt: int


@dataclass(frozen=True)
class Claim:
    """A claimed saga, with everything its run needs, read in the claim's transaction."""

    saga_id: str
    epoch: int
    status: SagaStatus
    attempts: int
    definition: str
    dataset: str
    partition_date: date
    request: dict[str, Any]
    manifest: dict[str, Any]
    cancel_requested: bool
    steps: tuple[StepRecord, ...]
    #: The step this claim started (``step_started`` in the claim's own write): the first
    #: step, on a saga's first claim, unless its cancellation was requested.
    started: str | None = None


@dataclass(frozen=True)
class SagaState:
    """The saga row as a transition saw it, under the row lock, before its own change."""

    status: SagaStatus
    cancel_requested: bool


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

    def __post_init__(self) -> None:
        if not self.steps:  # nothing to run, and no step rows to insert
            raise ValueError(f"saga definition {self.definition!r} has no steps")


@dataclass(frozen=True)
class StepStart:
    """A step to start (``step_started``) in the write that records the previous one's success
    (``StepLog.advance``)."""

    step: str
    attempt: int
    #: Leave it out if the saga's cancellation was requested (a step before the pivot).
    unless_cancelled: bool = False

    def values(self, now: datetime) -> dict[str, Any]:
        """The step row's columns as a try starts."""
        return {"attempt": self.attempt, "started_at": now, "error": None}

    def event(self) -> dict[str, Any]:
        """The payload of its ``step_started`` event."""
        return {"to": StepStatus.RUNNING.value, "attempt": self.attempt}


#: The payload of the event of a saga's success.
_SAGA_SUCCEEDED_EVENT = {"from": SagaStatus.RUNNING.value, "to": SagaStatus.SUCCEEDED.value}


class ActiveLimitReached(Exception):
    """The owner already has as many unfinished sagas as it may."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _announces(method: Callable[Concatenate[StepLog, str, _P], _R],
               ) -> Callable[Concatenate[StepLog, str, _P], _R]:
    """Tell ``StepLog.on_change`` about the saga (the first argument) once ``method`` returned:
    its change is committed."""
    @functools.wraps(method)
    def announcing(self: StepLog, saga_id: str, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        result = method(self, saga_id, *args, **kwargs)
        self._announce(saga_id)
        return result
    return announcing


class StepLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        #: Called with a saga's id after each change to it this log commits (see SagaWatch).
        self.on_change: Callable[[str], None] | None = None

    def _announce(self, saga_id: str) -> None:
        if self.on_change is not None:
            self.on_change(saga_id)

    def create_saga(self, new: NewSaga, max_active: int = 0) -> tuple[SagaRow, bool]:
        """Insert the saga, its steps and its first event. Returns (row, created).

        With an idempotency key already used, returns the existing saga (created=False); the
        caller compares fingerprints. With ``max_active``, raises ActiveLimitReached if the
        owner already has that many unfinished sagas (checked under a per-owner lock). The
        saga is its partition's queue head if nothing unfinished is ahead of it.
        PostgreSQL writes it all in one statement, in a transaction that holds the partition's
        lock (``LOCK_PARTITION``); SQLite in one ``BEGIN IMMEDIATE`` transaction of three
        inserts.
        """
        now = utcnow()
        params = {"id": new.id, "definition": new.definition, "dataset": new.dataset,
                  "partition_date": new.partition_date, "request": new.request,
                  "manifest": new.manifest, "owner": new.owner,
                  "idempotency_key": new.idempotency_key,
                  "request_fingerprint": new.request_fingerprint, "created_at": now}
        names = tuple(new.steps)
        conflict: IntegrityError | None = None
        try:
            if self.db.is_postgres:
                with self.db.writing() as conn:
                    if max_active:
                        self._check_active(conn, new.owner, max_active)
                    run_on_driver(conn, sql.LOCK_PARTITION, params)
                    created = run_on_driver(conn, sql.pg_create_saga(names), params).first()
            else:
                with self.db.writing() as conn:
                    if max_active:
                        self._check_active(conn, new.owner, max_active)
                    run_on_driver(conn, sql.INSERT_SAGA, params)
                    run_on_driver(conn, sql.insert_steps(names), {"id": new.id})
                    run_on_driver(conn, sql.INSERT_CREATED_EVENT, {"id": new.id,
                                                                   "created_at": now})
                created = True
        except IntegrityError as exc:
            if new.idempotency_key is None:
                raise
            conflict, created = exc, None
        if created:
            return SagaRow(**params, status=SagaStatus.PENDING.value, epoch=0, event_seq=1,
                           attempts=0, cancel_requested=False, updated_at=now), True
        existing = self.find_by_idempotency_key(new.owner, new.idempotency_key or "")
        if existing is None:
            # Not a clash of idempotency keys after all: the insert failed for another reason.
            raise RuntimeError(f"saga {new.id} was neither created nor found by its "
                               "idempotency key") from conflict
        return existing, False

    def check_active_limit(self, owner: str, max_active: int) -> None:
        """Raise ActiveLimitReached if ``owner`` has ``max_active`` unfinished sagas (pending,
        running, compensating or failed). A read without a lock: the admission check before any
        costly work; ``create_saga`` checks again under the owner's lock."""
        with self.db.reading() as conn:
            _refuse_over_limit(conn, owner, max_active)

    def _check_active(self, conn: Connection, owner: str, max_active: int) -> None:
        if self.db.is_postgres:  # SQLite already serializes writers (BEGIN IMMEDIATE)
            run_on_driver(conn, sql.LOCK_OWNER, {"o_owner": owner})
        _refuse_over_limit(conn, owner, max_active)

    @contextlib.contextmanager
    def _holding_partition(self, saga_id: str, releasing: bool) -> Iterator[Connection]:
        """PostgreSQL: where a one-statement transition runs. One that finishes the saga
        (``releasing``) passes its partition's queue head on, in a transaction that first takes
        the partition's lock (``LOCK_PARTITION_OF``); any other runs in autocommit."""
        if not releasing:
            with self.db.autocommit() as conn:
                yield conn
            return
        with self.db.writing() as conn:
            run_on_driver(conn, sql.LOCK_PARTITION_OF, {"f_id": saga_id})
            yield conn

    def find_by_idempotency_key(self, owner: str, key: str) -> SagaRow | None:
        with self.db.read_sessions() as s:
            return s.scalars(select(SagaRow).where(SagaRow.owner == owner,
                                                   SagaRow.idempotency_key == key)).first()

    def get(self, saga_id: str) -> SagaRow | None:
        with self.db.read_sessions() as s:
            return s.get(SagaRow, saga_id)

    def steps(self, saga_id: str) -> list[SagaStepRow]:
        with self.db.read_sessions() as s:
            return list(
                s.scalars(
                    select(SagaStepRow)
                    .where(SagaStepRow.saga_id == saga_id)
                    .order_by(SagaStepRow.position)
                )
            )

    def step_records(self, saga_id: str) -> list[StepRecord]:
        """The steps as the executor sees them (a read-only transaction, no ORM objects)."""
        with self.db.reading() as conn:
            return _step_records(conn, saga_id)

    def events(self, saga_id: str, after_seq: int = 0, limit: int = 1000) -> list[SagaEventRow]:
        with self.db.read_sessions() as s:
            return list(
                s.scalars(
                    select(SagaEventRow)
                    .where(SagaEventRow.saga_id == saga_id, SagaEventRow.seq > after_seq)
                    .order_by(SagaEventRow.seq)
                    .limit(limit)
                )
            )

    def claim_next(self, owner: str, lease_ttl_s: float,
                   definitions: tuple[str, ...] | None = None) -> Claim | None:
        """Claim one runnable saga: pending, or active with an expired lease (crash recovery).

        With ``definitions``, only a saga of one of them: the claiming worker's (a saga of a
        definition it does not know is left to a worker that knows it, unclaimed and not
        counted as an attempt). The oldest non-terminal saga of a partition goes first; the
        others wait behind it, whatever their definitions.
        The claim also reads the saga and its steps, so running it needs no other read. On a
        saga's first claim (pending, never claimed), unless its cancellation was requested, its
        first step is started in the same write (``Claim.started``): what its runner would
        write next (a first claim never turns the saga back: ``max_saga_attempts`` >= 1).
        """
        now = utcnow()
        params = {"c_now": now, "c_owner": owner,
                  "c_until": now + timedelta(seconds=lease_ttl_s)}
        claim = (self._claim_pg(params, definitions) if self.db.is_postgres
                 else self._claim(params, definitions))
        if claim is not None:
            self._announce(claim.saga_id)
            fault_point("saga.claimed")
        return claim

    def _claim(self, params: dict[str, Any],
               definitions: tuple[str, ...] | None) -> Claim | None:
        with self.db.writing() as conn:
            found = run_on_driver(conn, sql.claim_candidate(definitions), params).first()
            if found is None:
                return None
            saga_id, epoch, status, attempts = found.id, found.epoch, found.status, found.attempts
            new_status = SagaStatus.RUNNING if status == SagaStatus.PENDING else SagaStatus(status)
            # A first claim starts the first step too (every saga has one: NewSaga).
            first = status == SagaStatus.PENDING and attempts == 0
            claimed = run_on_driver(conn, sql.CLAIM, {
                **params, "c_id": saga_id, "c_epoch": epoch, "c_status": status,
                "c_new_status": new_status.value, "c_events": 2 if first else 1,
                "c_events_if_cancelled": 1,
            }).first()
            if claimed is None:
                return None
            payload: dict[str, Any] = {"owner": params["c_owner"], "attempts": attempts + 1}
            if new_status.value != status:
                payload.update({"from": status, "to": new_status.value})
            events = [_Event("claimed", None, payload)]
            steps = _step_records(conn, saga_id)
            started = None
            if first and not claimed.cancel_requested:
                start = StepStart(steps[0].step, steps[0].attempt + 1)
                events.append(_start_step(conn, saga_id, start, params["c_now"]))
                steps[0] = _started(steps[0])
                started = start.step
            _insert_events(conn, saga_id, claimed.event_seq, epoch + 1, params["c_now"], events)
        return Claim(saga_id, epoch + 1, new_status, attempts + 1, claimed.definition,
                     claimed.dataset, claimed.partition_date, claimed.request, claimed.manifest,
                     bool(claimed.cancel_requested), tuple(steps), started)

    def _claim_pg(self, params: dict[str, Any],
                  definitions: tuple[str, ...] | None) -> Claim | None:
        with self.db.autocommit() as conn:
            row = run_on_driver(conn, sql.pg_claim(definitions), params).first()
        if row is None:
            return None
        steps = [StepRecord(step, StepStatus(status), *rest)
                 for step, status, *rest in row.steps or ()]
        started = None
        if row.started and steps:  # the steps are as they were before the statement
            steps[0] = _started(steps[0])
            started = steps[0].step
        return Claim(row.id, row.epoch, SagaStatus(row.status), row.attempts, row.definition,
                     row.dataset, row.partition_date, row.request, row.manifest,
                     bool(row.cancel_requested), tuple(steps), started)

    def renew_lease(self, saga_id: str, epoch: int, owner: str, lease_ttl_s: float) -> bool:
        until = utcnow() + timedelta(seconds=lease_ttl_s)
        with self.db.writing() as conn:
            result = conn.execute(sql.RENEW_LEASE, {"r_id": saga_id, "r_epoch": epoch,
                                                    "r_owner": owner, "r_until": until})
            return rowcount(result) == 1

    def release(self, saga_id: str, epoch: int, *, retry_after_s: float | None = None) -> None:
        """Give the lease up; with ``retry_after_s`` the saga is claimable again after that."""
        now = utcnow()
        not_before = now + timedelta(seconds=retry_after_s) if retry_after_s is not None else None
        with self.db.writing() as conn:
            conn.execute(
                update(SAGAS)
                .where(SAGAS.c.id == saga_id, SAGAS.c.epoch == epoch)
                .values(lease_owner=None, lease_expires_at=None, not_before=not_before)
            )

    def ensure_owner(self, saga_id: str, epoch: int) -> None:
        """Raise LostOwnership unless ``epoch`` is still the saga's (fencing of external writes)."""
        with self.db.reading() as conn:
            row = run_on_driver(conn, sql.OWNER_EPOCH, {"s_id": saga_id}).first()
        current = None if row is None else row.epoch
        if current != epoch:
            raise LostOwnership(f"saga {saga_id}: epoch {epoch} superseded by {current}")

    def cancel_requested(self, saga_id: str) -> bool:
        with self.db.reading() as conn:
            return bool(conn.scalar(select(SAGAS.c.cancel_requested)
                                    .where(SAGAS.c.id == saga_id)))

    @_announces
    def transition_saga(
        self, saga_id: str, epoch: int, target: SagaStatus, *, error: str | None = None
    ) -> None:
        if not saga_sources_of(target):
            raise InvalidTransition(f"no transition leads to {target}")
        now = utcnow()
        values = _saga_values(target, now, error)
        payload: dict[str, Any] = {"to": target.value}
        if error:
            payload["error"] = error
        names = tuple(sorted(values))
        params = {"f_id": saga_id, "f_epoch": epoch, "f_now": now,
                  **{f"v_{name}": values[name] for name in names}}
        if self.db.is_postgres:
            with self._holding_partition(saga_id, target in sql.RELEASING) as conn:
                row = run_on_driver(conn, sql.pg_saga_transition(target, names),
                                    {**params, "e_payload": payload}).first()
            if row is None:
                raise LostOwnership(f"saga {saga_id}: epoch {epoch} is no longer the owner")
            if not row.logged:
                raise InvalidTransition(f"saga {saga_id}: {row.status} -> {target}")
        else:
            with self.db.writing() as conn:
                seq, current = _fence(conn, saga_id, epoch, now)
                if target not in ALLOWED_SAGA_TRANSITIONS[current.status]:
                    raise InvalidTransition(f"saga {saga_id}: {current.status} -> {target}")
                cas = run_on_driver(conn, sql.saga_cas(target, names),
                                    {**params, "c_from": current.status.value})
                if cas.rowcount != 1:
                    raise LostOwnership(f"compare-and-set failed: {saga_id}")
                if target in sql.RELEASING:
                    run_on_driver(conn, sql.PROMOTE_NEXT_HEAD, {"f_id": saga_id})
                _insert_event(conn, saga_id, seq, epoch, "status", None,
                              {"from": current.status.value, **payload}, now)
        fault_point(f"saga.{target.value}")

    @_announces
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
        unless_cancelled: bool = False,
    ) -> SagaState:
        """Move a step to ``target`` (compare-and-set on its current status and the epoch).

        Returns the saga as the transition saw it. With ``unless_cancelled``, a saga whose
        cancellation was requested is left unchanged and :class:`CancelRequested` is raised,
        so a step never starts after its saga was cancelled.
        """
        now = utcnow()
        names = tuple(sorted(values))
        params = {"f_id": saga_id, "f_epoch": epoch, "f_now": now, "c_step": step,
                  **{f"v_{name}": values[name] for name in names}}
        event = {"to": target.value, **(payload or {})}
        if self.db.is_postgres:
            with self.db.autocommit() as conn:
                row = run_on_driver(
                    conn, sql.pg_step_transition(target, names, unless_cancelled),
                    {**params, "e_kind": kind, "e_payload": event}).first()
            if row is None:
                raise LostOwnership(f"saga {saga_id}: epoch {epoch} is no longer the owner")
            saga = SagaState(SagaStatus(row.status), bool(row.cancel_requested))
            if unless_cancelled and saga.cancel_requested:
                raise CancelRequested(f"saga {saga_id}: cancelled by request")
            if not row.logged:
                raise InvalidTransition(f"compare-and-set failed: {saga_id}/{step} -> {target}")
            return saga
        with self.db.writing() as conn:
            seq, saga = _fence(conn, saga_id, epoch, now)
            if unless_cancelled and saga.cancel_requested:
                raise CancelRequested(f"saga {saga_id}: cancelled by request")
            cas = run_on_driver(conn, sql.step_cas(target, names), {**params, "c_saga": saga_id})
            if cas.rowcount != 1:
                raise InvalidTransition(f"compare-and-set failed: {saga_id}/{step} -> {target}")
            _insert_event(conn, saga_id, seq, epoch, kind, step, event, now)
        return saga

    @_announces
    def advance(
        self,
        saga_id: str,
        epoch: int,
        step: str,
        *,
        values: dict[str, Any],
        payload: dict[str, Any],
        start: StepStart | None,
    ) -> bool:
        """Record ``step`` as succeeded and, in the same transaction, what follows it: the
        ``start`` of the next step, or (``None``: it was the last) the saga's success. The
        transitions and events of ``update_step`` and ``transition_saga``, in one write.

        All or nothing, except that a ``start`` with ``unless_cancelled`` in a saga whose
        cancellation was requested is left out: then False is returned.
        """
        now = utcnow()
        names = tuple(sorted(values))
        event = {"to": StepStatus.SUCCEEDED.value, **payload}
        params = {"f_id": saga_id, "f_epoch": epoch, "f_now": now, "c_step": step,
                  **{f"v_{name}": values[name] for name in names}}
        if self.db.is_postgres:
            params.update(e_kind="step_succeeded", e_payload=event)
            if start is None:
                statement = sql.pg_step_finish(names)
                params["s_payload"] = _SAGA_SUCCEEDED_EVENT
            else:
                next_values = start.values(now)
                statement = sql.pg_step_advance(names, tuple(sorted(next_values)),
                                                start.unless_cancelled)
                params.update(n_step=start.step, n_kind="step_started", n_payload=start.event(),
                              **{f"n_v_{name}": value for name, value in next_values.items()})
            with self._holding_partition(saga_id, start is None) as conn:
                row = run_on_driver(conn, statement, params).first()
            if row is None:
                raise LostOwnership(f"saga {saga_id}: epoch {epoch} is no longer the owner")
            if not row.logged:
                then = "saga -> succeeded" if start is None else f"{start.step} -> running"
                raise InvalidTransition(f"compare-and-set failed: {saga_id}/{step} -> "
                                        f"succeeded, {then} (saga {row.status})")
            started = start is not None and row.logged == 2
        else:
            with self.db.writing() as conn:
                # Two events, unless cancellation leaves the start out.
                last, saga = _fence(conn, saga_id, epoch, now, events=2, events_if_cancelled=(
                    1 if start is not None and start.unless_cancelled else 2))
                if start is None and saga.status != SagaStatus.RUNNING:
                    raise InvalidTransition(f"saga {saga_id}: {saga.status} -> succeeded")
                cas = run_on_driver(conn, sql.step_cas(StepStatus.SUCCEEDED, names),
                                    {**params, "c_saga": saga_id})
                if cas.rowcount != 1:
                    raise InvalidTransition(f"compare-and-set failed: {saga_id}/{step} -> "
                                            "succeeded")
                following = _start_or_finish(conn, saga_id, epoch, saga, start, now)
                _insert_events(conn, saga_id, last, epoch, now, [
                    _Event("step_succeeded", step, event), *([following] if following else [])])
                started = start is not None and following is not None
        if start is None:
            fault_point(f"saga.{SagaStatus.SUCCEEDED.value}")
        return started

    @_announces
    def save_checkpoint(self, saga_id: str, epoch: int, step: str, data: dict[str, Any]) -> None:
        now = utcnow()
        with self.db.writing() as conn:
            seq, _ = _fence(conn, saga_id, epoch, now)
            conn.execute(
                update(STEPS)
                .where(STEPS.c.saga_id == saga_id, STEPS.c.step == step)
                .values(checkpoint=data)
            )
            _insert_event(conn, saga_id, seq, epoch, "checkpoint", step, data, now)
        fault_point(f"{step}.after_checkpoint")

    @_announces
    def skip_pending_steps(self, saga_id: str, epoch: int, steps: Iterable[str]) -> None:
        names = list(steps)
        if not names:
            return
        now = utcnow()
        with self.db.writing() as conn:
            _lock(conn, saga_id, epoch, now)
            result = conn.execute(
                update(STEPS)
                .where(STEPS.c.saga_id == saga_id, STEPS.c.step.in_(names),
                       STEPS.c.status == StepStatus.PENDING.value)
                .values(status=StepStatus.SKIPPED.value)
            )
            if rowcount(result):
                _append_event(conn, saga_id, epoch, "steps_skipped", None, {"steps": names}, now)

    @_announces
    def record_event(
        self, saga_id: str, epoch: int, kind: str, step: str | None, payload: dict[str, Any]
    ) -> None:
        now = utcnow()
        with self.db.writing() as conn:
            seq, _ = _fence(conn, saga_id, epoch, now)
            _insert_event(conn, saga_id, seq, epoch, kind, step, payload, now)

    @_announces
    def retry_failed(self, saga_id: str, by: str = "") -> bool:
        """Send a ``failed`` saga back to ``compensating`` with a fresh attempt budget.

        An operator action (``by``: the API key id asking, recorded in the event): no epoch is
        held, the next claim fences off anything older. False when the saga is not ``failed``.
        """
        now = utcnow()
        with self.db.writing() as conn:
            earlier = conn.scalar(select(SAGAS.c.error).where(SAGAS.c.id == saga_id))
            row = conn.execute(
                update(SAGAS)
                .where(SAGAS.c.id == saga_id, SAGAS.c.status == SagaStatus.FAILED.value)
                .values(status=SagaStatus.COMPENSATING.value, attempts=0, lease_owner=None,
                        lease_expires_at=None, not_before=None, finished_at=None,
                        updated_at=now, event_seq=SAGAS.c.event_seq + 1,
                        error=f"retried by an operator after: {earlier}"[:4000])
                .returning(SAGAS.c.epoch, SAGAS.c.event_seq)
            ).first()
            if row is None:
                return False
            _insert_event(conn, saga_id, row.event_seq, row.epoch, "status", None,
                          {"from": SagaStatus.FAILED.value, "to": SagaStatus.COMPENSATING.value,
                           "reason": "retry requested", "by": by}, now)
        return True

    @_announces
    def request_cancel(self, saga_id: str, by: str = "") -> SagaRow | None:
        """Flag a saga for cancellation; its owner compensates it at the next step boundary.
        ``by`` (the API key id asking) is recorded in the ``cancel_requested`` event."""
        now = utcnow()
        with self.db.transaction() as s:
            flagged = s.execute(
                update(SAGAS)
                .where(SAGAS.c.id == saga_id, SAGAS.c.cancel_requested.is_(False))
                .values(cancel_requested=True, updated_at=now, event_seq=SAGAS.c.event_seq + 1)
                .returning(SAGAS.c.epoch, SAGAS.c.event_seq)
            ).first()
            if flagged is not None:
                _insert_event(s, saga_id, flagged.event_seq, flagged.epoch, "cancel_requested",
                              None, {"by": by}, now)
            return s.get(SagaRow, saga_id)


def _refuse_over_limit(conn: Connection, owner: str, max_active: int) -> None:
    unfinished = run_on_driver(conn, sql.UNFINISHED_OF_OWNER,
                               {"o_owner": owner, "o_limit": max_active}).rows[0][0]
    if unfinished >= max_active:
        raise ActiveLimitReached(f"this key has reached its limit of {max_active} unfinished "
                                 "sagas (LAKESAGA_MAX_ACTIVE_SAGAS_PER_KEY)")


def lock_owned(s: Session | Connection, saga_id: str, epoch: int) -> str:
    """Touch the saga row under the caller's epoch (locking it) and return its status.

    Raises LostOwnership when a newer claim has superseded the epoch.
    """
    return _lock(s, saga_id, epoch, utcnow())


def _lock(s: Session | Connection, saga_id: str, epoch: int, now: datetime) -> str:
    status = s.execute(sql.LOCK, {"f_id": saga_id, "f_epoch": epoch, "f_now": now}).scalar()
    if status is None:
        raise LostOwnership(f"saga {saga_id}: epoch {epoch} is no longer the owner")
    return str(status)


def _fence(conn: Connection, saga_id: str, epoch: int, now: datetime, *, events: int = 1,
           events_if_cancelled: int = 1) -> tuple[int, SagaState]:
    """Lock the saga row under the caller's epoch and take the numbers of the next ``events``
    events (``events_if_cancelled`` if the saga's cancellation was requested).

    Returns the last number and the saga's state; raises LostOwnership when a newer claim has
    superseded the epoch. The caller's transaction must insert the events or roll back.
    """
    row = run_on_driver(conn, sql.FENCE, {
        "f_id": saga_id, "f_epoch": epoch, "f_now": now, "f_events": events,
        "f_events_if_cancelled": events_if_cancelled}).first()
    if row is None:
        raise LostOwnership(f"saga {saga_id}: epoch {epoch} is no longer the owner")
    return row.event_seq, SagaState(SagaStatus(row.status), bool(row.cancel_requested))


def _saga_values(target: SagaStatus, now: datetime, error: str | None = None,
                 ) -> dict[str, Any]:
    """The saga row's columns a move to ``target`` sets besides its status (a finished saga
    leaves its lease)."""
    values: dict[str, Any] = {"updated_at": now}
    if error is not None:
        values["error"] = error
    if target in FINISHED_SAGA_STATUSES:
        values.update(finished_at=now, lease_owner=None, lease_expires_at=None)
    return values


def _start_or_finish(conn: Connection, saga_id: str, epoch: int, saga: SagaState,
                     start: StepStart | None, now: datetime) -> _Event | None:
    """SQLite, in ``StepLog.advance``'s transaction: start the next step or finish the saga,
    and return the event to insert for it (None: cancellation left the start out). A failed
    compare-and-set raises, which rolls the whole transaction back."""
    if start is None:
        values = _saga_values(SagaStatus.SUCCEEDED, now)
        names = tuple(sorted(values))
        cas = run_on_driver(conn, sql.saga_cas(SagaStatus.SUCCEEDED, names), {
            "f_id": saga_id, "f_epoch": epoch, "c_from": SagaStatus.RUNNING.value,
            **{f"v_{name}": values[name] for name in names}})
        if cas.rowcount != 1:
            raise LostOwnership(f"compare-and-set failed: {saga_id}")
        run_on_driver(conn, sql.PROMOTE_NEXT_HEAD, {"f_id": saga_id})
        return _Event("status", None, _SAGA_SUCCEEDED_EVENT)
    if start.unless_cancelled and saga.cancel_requested:
        return None
    return _start_step(conn, saga_id, start, now)


def _start_step(conn: Connection, saga_id: str, start: StepStart, now: datetime) -> _Event:
    """SQLite, in a transaction that holds the saga row: the ``step_started`` transition, and
    its event to insert (a failed compare-and-set raises, rolling the transaction back)."""
    values = start.values(now)
    cas = run_on_driver(conn, sql.step_cas(StepStatus.RUNNING, tuple(sorted(values))),
                        {"c_saga": saga_id, "c_step": start.step,
                         **{f"v_{name}": value for name, value in values.items()}})
    if cas.rowcount != 1:
        raise InvalidTransition(f"compare-and-set failed: {saga_id}/{start.step} -> running")
    return _Event("step_started", start.step, start.event())


def _started(record: StepRecord) -> StepRecord:
    """The step record once its next try has started."""
    return replace(record, status=StepStatus.RUNNING, attempt=record.attempt + 1, error=None)


def _step_records(conn: Connection, saga_id: str) -> list[StepRecord]:
    return [
        StepRecord(r.step, StepStatus(r.status), r.attempt, r.output, r.checkpoint, r.error,
                   r.compensation_attempt)
        for r in run_on_driver(conn, sql.STEP_RECORDS, {"s_id": saga_id}).rows
    ]


def _append_event(conn: Connection, saga_id: str, epoch: int, kind: str, step: str | None,
                  payload: dict[str, Any], now: datetime) -> None:
    """Number and insert an event; the caller already holds the saga row's lock."""
    seq = run_on_driver(conn, sql.NEXT_SEQ, {"f_id": saga_id}).rows[0][0]
    _insert_event(conn, saga_id, seq, epoch, kind, step, payload, now)


class _Event(NamedTuple):
    """An event to insert, before it is numbered."""

    kind: str
    step: str | None
    payload: dict[str, Any]


def _insert_events(conn: Connection, saga_id: str, last_seq: int, epoch: int, now: datetime,
                   events: list[_Event]) -> None:
    """Insert ``events`` in one statement, numbered up to ``last_seq`` (the caller took the
    numbers: ``_fence`` or the claim)."""
    first = last_seq - len(events) + 1
    params: dict[str, Any] = {}
    for i, event in enumerate(events):
        params.update({f"saga_id_{i}": saga_id, f"seq_{i}": first + i, f"kind_{i}": event.kind,
                       f"step_{i}": event.step, f"epoch_{i}": epoch,
                       f"payload_{i}": event.payload, f"created_at_{i}": now})
    run_on_driver(conn, sql.insert_events(len(events)), params)


def _insert_event(conn: Session | Connection, saga_id: str, seq: int, epoch: int, kind: str,
                  step: str | None, payload: dict[str, Any], now: datetime) -> None:
    if isinstance(conn, Connection):
        _insert_events(conn, saga_id, seq, epoch, now, [_Event(kind, step, payload)])
        return
    conn.execute(sql.INSERT_EVENT, {"saga_id": saga_id, "seq": seq, "kind": kind, "step": step,
                                    "epoch": epoch, "payload": payload, "created_at": now})
