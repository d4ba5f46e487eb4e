"""The saga log's hot-path statements, built once per process (SQLAlchemy Core, no ORM).

A transition is three steps under the saga's row lock: the *fence* (the saga row ``WHERE id
AND epoch``: ownership, the next event number, the saga's status and cancel flag), the
compare-and-set of a step or saga status, and the event insert. SQLite runs them as three
statements in one ``BEGIN IMMEDIATE`` transaction. PostgreSQL runs them as one statement of
data-modifying CTEs in autocommit — one round trip, atomic as any single statement — where the
fence is ``SELECT … FOR UPDATE``, and the event number is taken only if the compare-and-set
matched, so a refused transition writes nothing. A saga's creation and its last transition
(which passes its partition's queue head on) run in a transaction that first takes the
partition's advisory lock (``LOCK_PARTITION``), so that they never miss each other.
"""

from __future__ import annotations

import functools
from typing import Any, cast

from sqlalchemy import (
    CTE,
    Date,
    DateTime,
    Integer,
    Select,
    String,
    Table,
    Update,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by

from app.db.models import SagaEventRow, SagaRow, SagaStepRow
from app.saga.states import ACTIVE_SAGA_STATUSES, SagaStatus, StepStatus, saga_sources_of, sources_of

SAGAS = cast(Table, SagaRow.__table__)
STEPS = cast(Table, SagaStepRow.__table__)
EVENTS = cast(Table, SagaEventRow.__table__)

#: Statuses that hold their partition: later sagas of the same partition wait behind them.
#: ``failed`` is included because its partition may be half rolled back.
BLOCKING = [
    SagaStatus.PENDING.value,
    SagaStatus.RUNNING.value,
    SagaStatus.COMPENSATING.value,
    SagaStatus.FAILED.value,
]
ACTIVE = [s.value for s in ACTIVE_SAGA_STATUSES]
#: Statuses that release the partition: reaching one passes its queue head on.
RELEASING = frozenset({SagaStatus.SUCCEEDED, SagaStatus.COMPENSATED})
EVENT_COLUMNS = ["saga_id", "seq", "kind", "step", "epoch", "payload", "created_at"]


def _numbered(prefix: str) -> Any:
    """How many event numbers a write takes: ``<prefix>_events`` (default 1), or
    ``<prefix>_events_if_cancelled`` (default 1) if the saga's cancellation was requested (a
    step start that cancellation leaves out has no event)."""
    return case((SAGAS.c.cancel_requested.is_(True),
                 bindparam(f"{prefix}_events_if_cancelled", 1, type_=Integer)),
                else_=bindparam(f"{prefix}_events", 1, type_=Integer))


#: The fence: lock the saga row under the caller's epoch and take the numbers of the events
#: its transaction inserts (``_numbered("f")``); returns the last one.
FENCE = (
    update(SAGAS)
    .where(SAGAS.c.id == bindparam("f_id"), SAGAS.c.epoch == bindparam("f_epoch"))
    .values(event_seq=SAGAS.c.event_seq + _numbered("f"), updated_at=bindparam("f_now"))
    .returning(SAGAS.c.event_seq, SAGAS.c.status, SAGAS.c.cancel_requested)
)
#: The fence without an event (writes outside the log: catalog, outbox).
LOCK = (
    update(SAGAS)
    .where(SAGAS.c.id == bindparam("f_id"), SAGAS.c.epoch == bindparam("f_epoch"))
    .values(updated_at=bindparam("f_now"))
    .returning(SAGAS.c.status)
)
#: The next event number of a saga whose row the transaction already holds.
NEXT_SEQ = (
    update(SAGAS)
    .where(SAGAS.c.id == bindparam("f_id"))
    .values(event_seq=SAGAS.c.event_seq + 1)
    .returning(SAGAS.c.event_seq)
)
INSERT_EVENT = insert(EVENTS)


@functools.cache
def insert_events(count: int) -> Any:
    """``count`` events in one INSERT; parameters ``<column>_<i>`` for ``i < count``."""
    return insert(EVENTS).values([
        {column: bindparam(f"{column}_{i}", type_=EVENTS.c[column].type)
         for column in EVENT_COLUMNS}
        for i in range(count)])


RENEW_LEASE = (
    update(SAGAS)
    .where(SAGAS.c.id == bindparam("r_id"), SAGAS.c.epoch == bindparam("r_epoch"),
           SAGAS.c.lease_owner == bindparam("r_owner"), SAGAS.c.status.in_(ACTIVE))
    .values(lease_expires_at=bindparam("r_until"))
)
OWNER_EPOCH = select(SAGAS.c.epoch).where(SAGAS.c.id == bindparam("s_id"))
STEP_RECORD_COLUMNS = (STEPS.c.step, STEPS.c.status, STEPS.c.attempt, STEPS.c.output,
                       STEPS.c.checkpoint, STEPS.c.error, STEPS.c.compensation_attempt)
STEP_RECORDS = (
    select(*STEP_RECORD_COLUMNS)
    .where(STEPS.c.saga_id == bindparam("s_id"))
    .order_by(STEPS.c.position)
)
#: What a claim returns about the saga besides its identity.
CLAIMED_COLUMNS = [SAGAS.c.event_seq, SAGAS.c.definition, SAGAS.c.dataset,
                   SAGAS.c.partition_date, SAGAS.c.request, SAGAS.c.manifest,
                   SAGAS.c.cancel_requested]


def _constant(value: str) -> Any:
    """A name from the code written into the SQL as a string literal (never user text; the
    callers check its characters): the planners see the exact values, and nothing is bound per
    execution."""
    return literal_column(f"'{value}'", String)


def _status(value: str) -> Any:
    """A status constant (an enum value) written into the SQL."""
    assert value.isalpha(), value
    return _constant(value)


def _status_in(column: Any, values: list[str]) -> Any:
    return column.in_([_status(v) for v in values])


def _event_values(source: CTE, payload: Any, *, kind: Any, step: Any,
                  seq: Any = None) -> Select[Any]:
    """The event row of the saga ``source.id``, numbered ``seq`` (by default
    ``source.event_seq``), as a SELECT for INSERT … SELECT."""
    return select(source.c.id, source.c.event_seq if seq is None else seq, kind, step,
                  bindparam("f_epoch", type_=Integer), payload,
                  bindparam("f_now", type_=DateTime))


def _count(source: CTE) -> Any:
    """How many rows ``source`` (a data-modifying CTE's RETURNING) has, as a scalar subquery."""
    return select(func.count()).select_from(source).scalar_subquery()


def _oldest_ready(waiting: Any) -> Select[Any]:
    """The oldest saga matching ``waiting`` that may run now (``c_now``), in FIFO order."""
    now = bindparam("c_now", type_=DateTime)
    return (
        select(SAGAS.c.id, SAGAS.c.epoch, SAGAS.c.status, SAGAS.c.attempts, SAGAS.c.created_at)
        .where(waiting, or_(SAGAS.c.not_before.is_(None), SAGAS.c.not_before <= now))
        .order_by(SAGAS.c.created_at, SAGAS.c.id)
        .limit(1)
    )


def _claimable(definitions: tuple[str, ...] | None) -> tuple[Select[Any], Select[Any]]:
    """The claimable sagas in two kinds, each found in FIFO order: pending queue heads, and
    active ones whose lease has expired (their worker died; an active saga is the head of its
    partition). A claim takes the older of the two.

    With ``definitions``, only sagas of those definitions (the claiming worker's: a saga that
    only another release of lakesaga knows waits for a worker that knows it). They are names
    from the code, written into the SQL like the statuses.
    """
    known: Any = true()
    if definitions is not None:
        if not all(name.isidentifier() for name in definitions):
            raise ValueError(f"saga definition names must be identifiers: {definitions}")
        known = SAGAS.c.definition.in_([_constant(name) for name in definitions])
    # Read from ix_sagas_queue_head whatever number of sagas wait behind busy partitions.
    pending = _oldest_ready(and_(SAGAS.c.queue_head == true(),
                                 SAGAS.c.status == _status(SagaStatus.PENDING.value), known))
    # An active saga was its partition's head when first claimed and stays head until it
    # finishes: nothing else in its partition can block its resumption. (A test of "no older
    # unfinished saga" here stranded a head created, and committed, before an older-stamped
    # saga: neither could ever be claimed again.)
    abandoned = _oldest_ready(and_(
        _status_in(SAGAS.c.status, ACTIVE),
        or_(SAGAS.c.lease_expires_at.is_(None),
            SAGAS.c.lease_expires_at < bindparam("c_now", type_=DateTime)),
        known,
    ))
    return pending, abandoned


def _oldest(*arms: Any) -> Select[Any]:
    both = union_all(*(select(arm) for arm in arms)).subquery("runnable")
    return select(both).order_by(both.c.created_at, both.c.id).limit(1)


@functools.cache
def claim_candidate(definitions: tuple[str, ...] | None) -> Select[Any]:
    """SQLite: the saga to claim (``CLAIM`` then takes it under the transaction's database
    lock); ``definitions`` as in ``_claimable``."""
    pending, abandoned = _claimable(definitions)
    return _oldest(pending.subquery("pending"), abandoned.subquery("abandoned"))


#: Claim the candidate found by ``claim_candidate`` (compare-and-set on its epoch and status),
#: taking the numbers of the events its transaction inserts (``_numbered("c")``).
CLAIM = (
    update(SAGAS)
    .where(SAGAS.c.id == bindparam("c_id"), SAGAS.c.epoch == bindparam("c_epoch"),
           SAGAS.c.status == bindparam("c_status"))
    .values(status=bindparam("c_new_status"), epoch=SAGAS.c.epoch + 1,
            attempts=SAGAS.c.attempts + 1, event_seq=SAGAS.c.event_seq + _numbered("c"),
            lease_owner=bindparam("c_owner"), lease_expires_at=bindparam("c_until"),
            not_before=None, updated_at=bindparam("c_now"))
    .returning(*CLAIMED_COLUMNS)
)


@functools.cache
def pg_claim(definitions: tuple[str, ...] | None) -> Select[Any]:
    """PostgreSQL: the claim, its ``claimed`` event and the saga's steps in one statement; on
    a saga's first claim, unless its cancellation was requested, also the start of its first
    step (``step_started``), as ``StepLog.claim_next`` describes. ``definitions`` as in
    ``_claimable``.

    One row, the steps as a JSON array of ``STEP_RECORD_COLUMNS`` as they were before the
    statement, and ``started`` (the first step was started); none when nothing is claimable.
    """
    pending, abandoned = _claimable(definitions)
    candidate = _oldest(
        pending.with_for_update(skip_locked=True, of=SAGAS).cte("pending"),
        abandoned.with_for_update(skip_locked=True, of=SAGAS).cte("abandoned"),
    ).cte("candidate")
    was_pending = candidate.c.status == _status(SagaStatus.PENDING.value)
    new_status = case((was_pending, _status(SagaStatus.RUNNING.value)), else_=candidate.c.status)
    # A first claim (the candidate's own columns: RETURNING would see the new attempts).
    starts = and_(was_pending, candidate.c.attempts == 0, SAGAS.c.cancel_requested.is_(False))
    claimed = (
        update(SAGAS)
        .where(SAGAS.c.id == candidate.c.id)
        .values(status=new_status, epoch=SAGAS.c.epoch + 1, attempts=SAGAS.c.attempts + 1,
                event_seq=SAGAS.c.event_seq + 1 + case((starts, 1), else_=0),
                lease_owner=bindparam("c_owner"), lease_expires_at=bindparam("c_until"),
                not_before=None, updated_at=bindparam("c_now"))
        .returning(SAGAS.c.id, SAGAS.c.epoch, SAGAS.c.status, SAGAS.c.attempts,
                   candidate.c.status.label("previous"), starts.label("started"),
                   *CLAIMED_COLUMNS)
        .cte("claimed")
    )
    now = bindparam("c_now", type_=DateTime)
    first = (
        update(STEPS)
        .where(STEPS.c.saga_id == claimed.c.id, claimed.c.started.is_(True),
               STEPS.c.position == 0,
               _status_in(STEPS.c.status, [StepStatus.PENDING.value]))
        .values(status=StepStatus.RUNNING.value, attempt=STEPS.c.attempt + 1, started_at=now,
                error=None)
        .returning(STEPS.c.saga_id, STEPS.c.step, STEPS.c.attempt)
        .cte("first_started")
    )
    payload = func.jsonb_build_object(
        literal("owner", String), bindparam("c_owner", type_=String),
        literal("attempts", String), claimed.c.attempts, type_=JSONB,
    ).op("||", return_type=JSONB)(case(
        (claimed.c.previous != claimed.c.status,
         func.jsonb_build_object(literal("from", String), claimed.c.previous,
                                 literal("to", String), claimed.c.status, type_=JSONB)),
        else_=literal({}, JSONB),
    ))
    started_payload = func.jsonb_build_object(
        literal("to", String), literal(StepStatus.RUNNING.value, String),
        literal("attempt", String), first.c.attempt, type_=JSONB)
    logged = insert(EVENTS).from_select(EVENT_COLUMNS, union_all(
        select(claimed.c.id, claimed.c.event_seq - case((claimed.c.started, 1), else_=0),
               literal("claimed", String), literal(None, String), claimed.c.epoch, payload,
               now),
        select(claimed.c.id, claimed.c.event_seq, literal("step_started", String),
               first.c.step, claimed.c.epoch, started_payload, now)
        .where(first.c.saga_id == claimed.c.id),
    )).cte("logged")
    steps = (
        select(func.jsonb_agg(aggregate_order_by(
            func.jsonb_build_array(*STEP_RECORD_COLUMNS), STEPS.c.position), type_=JSONB))
        .where(STEPS.c.saga_id == claimed.c.id)
        .scalar_subquery()
    )
    return select(claimed, steps.label("steps")).add_cte(first).add_cte(logged)


def _owned(*columns: Any) -> CTE:
    """The fence of a one-statement PostgreSQL transition: the saga row under the caller's
    epoch (``f_id``, ``f_epoch``), locked, with its id, status and ``columns``."""
    return (
        select(SAGAS.c.id, SAGAS.c.status, *columns)
        .where(SAGAS.c.id == bindparam("f_id"), SAGAS.c.epoch == bindparam("f_epoch"))
        .with_for_update()
        .cte("owned")
    )


@functools.cache
def step_cas(target: StepStatus, columns: tuple[str, ...]) -> Update:
    """``UPDATE saga_steps SET status = target, <columns> WHERE status IN (its sources)``.

    Parameters: ``c_saga``, ``c_step``, ``v_<column>``.
    """
    return (
        update(STEPS)
        .where(STEPS.c.saga_id == bindparam("c_saga"), STEPS.c.step == bindparam("c_step"),
               _status_in(STEPS.c.status, sources_of(target)))
        .values(status=target.value, **{name: bindparam(f"v_{name}") for name in columns})
    )


@functools.cache
def pg_step_transition(target: StepStatus, columns: tuple[str, ...],
                       unless_cancelled: bool) -> Select[Any]:
    """PostgreSQL: fence, step compare-and-set and event as one statement.

    Parameters: ``f_id``, ``f_epoch``, ``f_now``, ``c_step``, ``v_<column>``, ``e_kind``,
    ``e_payload``. Returns no row when the epoch is superseded, else the saga's status and
    cancel flag and ``logged`` (0 when the step was not in a source status, or the saga was
    cancelled and ``unless_cancelled``: then nothing was written).
    """
    owned = _owned(SAGAS.c.cancel_requested)
    moved = update(STEPS).where(
        STEPS.c.saga_id == owned.c.id, STEPS.c.step == bindparam("c_step"),
        _status_in(STEPS.c.status, sources_of(target)),
    )
    if unless_cancelled:
        moved = moved.where(owned.c.cancel_requested.is_(False))
    moved_cte = (
        moved.values(status=target.value, **{name: bindparam(f"v_{name}") for name in columns})
        .returning(STEPS.c.saga_id)
        .cte("moved")
    )
    numbered = (
        update(SAGAS)
        .where(SAGAS.c.id.in_(select(moved_cte.c.saga_id)))
        .values(event_seq=SAGAS.c.event_seq + 1, updated_at=bindparam("f_now"))
        .returning(SAGAS.c.id, SAGAS.c.event_seq)
        .cte("numbered")
    )
    logged = (
        insert(EVENTS)
        .from_select(EVENT_COLUMNS, _event_values(
            numbered, bindparam("e_payload", type_=JSONB),
            kind=bindparam("e_kind", type_=String), step=bindparam("c_step", type_=String)))
        .returning(EVENTS.c.seq)
        .cte("logged")
    )
    return select(owned.c.status, owned.c.cancel_requested,
                  _count(logged).label("logged"))


def _step_succeeded(sagas: Select[Any], columns: tuple[str, ...]) -> CTE:
    """A step (``c_step``) of the saga in ``sagas`` (the fence, possibly narrowed) to
    ``succeeded``, with ``v_<column>``; RETURNING its ``saga_id`` (no row: nothing moved)."""
    return (
        update(STEPS)
        .where(STEPS.c.saga_id.in_(sagas), STEPS.c.step == bindparam("c_step"),
               _status_in(STEPS.c.status, sources_of(StepStatus.SUCCEEDED)))
        .values(status=StepStatus.SUCCEEDED.value,
                **{name: bindparam(f"v_{name}") for name in columns})
        .returning(STEPS.c.saga_id)
        .cte("done")
    )


@functools.cache
def pg_step_advance(columns: tuple[str, ...], next_columns: tuple[str, ...],
                    unless_cancelled: bool) -> Select[Any]:
    """PostgreSQL: one step to ``succeeded`` and the next one to ``running``, with both events,
    as one statement (see ``StepLog.advance``).

    Parameters: those of ``pg_step_transition`` for the first step (``c_step``, ``v_<column>``,
    ``e_kind``, ``e_payload``) and ``n_step``, ``n_v_<column>``, ``n_kind``, ``n_payload`` for
    the next. All or nothing, except that with ``unless_cancelled`` a saga whose cancellation
    was requested gets the first change only. Returns no row when the epoch is superseded, else
    the saga's status and cancel flag and ``logged``: 2, 1 (the next step was not started) or 0
    (a step was not in a source status: nothing written).
    """
    owned = _owned(SAGAS.c.cancel_requested)
    next_step = bindparam("n_step", type_=String)
    ready: Any = exists().where(STEPS.c.saga_id == owned.c.id, STEPS.c.step == next_step,
                                _status_in(STEPS.c.status, sources_of(StepStatus.RUNNING)))
    if unless_cancelled:  # a cancelled saga gets the first change whatever the next step's
        ready = or_(ready, owned.c.cancel_requested.is_(True))
    done = _step_succeeded(select(owned.c.id).where(ready), columns)
    started = update(STEPS).where(STEPS.c.saga_id.in_(select(done.c.saga_id)),
                                  STEPS.c.step == next_step)
    if unless_cancelled:
        started = started.where(exists().where(owned.c.cancel_requested.is_(False)))
    started_cte = (
        started.values(status=StepStatus.RUNNING.value,
                       **{name: bindparam(f"n_v_{name}") for name in next_columns})
        .returning(STEPS.c.saga_id)
        .cte("started")
    )
    both = _count(started_cte)
    numbered = (
        update(SAGAS)
        .where(SAGAS.c.id.in_(select(done.c.saga_id)))
        .values(event_seq=SAGAS.c.event_seq + 1 + both, updated_at=bindparam("f_now"))
        .returning(SAGAS.c.id, SAGAS.c.event_seq)
        .cte("numbered")
    )
    first = _event_values(numbered, bindparam("e_payload", type_=JSONB),
                          kind=bindparam("e_kind", type_=String),
                          step=bindparam("c_step", type_=String), seq=numbered.c.event_seq - both)
    second = _event_values(numbered, bindparam("n_payload", type_=JSONB),
                           kind=bindparam("n_kind", type_=String),
                           step=next_step).where(exists(select(started_cte.c.saga_id)))
    logged = (
        insert(EVENTS)
        .from_select(EVENT_COLUMNS, union_all(first, second))
        .returning(EVENTS.c.seq)
        .cte("logged")
    )
    return select(owned.c.status, owned.c.cancel_requested,
                  _count(logged).label("logged"))


@functools.cache
def pg_step_finish(columns: tuple[str, ...]) -> Select[Any]:
    """PostgreSQL: the last step to ``succeeded`` and its saga from ``running`` to
    ``succeeded``, with both events, as one statement (see ``StepLog.advance``).

    Parameters: those of ``pg_step_transition`` (``c_step``, ``v_<column>``, ``e_kind``,
    ``e_payload``) and ``s_payload``, the saga event's. All or nothing. Returns no row when
    the epoch is superseded, else the saga's status before and ``logged``: 2, or 0 (the step or
    the saga was not in a source status: nothing written).
    """
    owned = _owned()
    done = _step_succeeded(select(owned.c.id).where(
        _status_in(owned.c.status, saga_sources_of(SagaStatus.SUCCEEDED))), columns)
    now = bindparam("f_now", type_=DateTime)
    finished = (
        update(SAGAS)
        .where(SAGAS.c.id.in_(select(done.c.saga_id)))
        .values(status=SagaStatus.SUCCEEDED.value, event_seq=SAGAS.c.event_seq + 2,
                updated_at=now, finished_at=now, lease_owner=None, lease_expires_at=None)
        .returning(SAGAS.c.id, SAGAS.c.event_seq, SAGAS.c.dataset, SAGAS.c.partition_date,
                   SAGAS.c.queue_head)
        .cte("finished")
    )
    step_event = _event_values(finished, bindparam("e_payload", type_=JSONB),
                               kind=bindparam("e_kind", type_=String),
                               step=bindparam("c_step", type_=String),
                               seq=finished.c.event_seq - 1)
    saga_event = _event_values(finished, bindparam("s_payload", type_=JSONB),
                               kind=literal("status", String), step=literal(None, String))
    logged = (
        insert(EVENTS)
        .from_select(EVENT_COLUMNS, union_all(step_event, saga_event))
        .returning(EVENTS.c.seq)
        .cte("logged")
    )
    return select(owned.c.status,
                  _count(logged).label("logged")).add_cte(_promoted(finished))


@functools.cache
def saga_cas(target: SagaStatus, columns: tuple[str, ...]) -> Update:
    """``UPDATE sagas SET status = target, <columns> WHERE id AND epoch AND status = c_from``.

    Parameters: ``f_id``, ``f_epoch``, ``c_from``, ``v_<column>``.
    """
    return (
        update(SAGAS)
        .where(SAGAS.c.id == bindparam("f_id"), SAGAS.c.epoch == bindparam("f_epoch"),
               SAGAS.c.status == bindparam("c_from"))
        .values(status=target.value, **{name: bindparam(f"v_{name}") for name in columns})
    )


@functools.cache
def pg_saga_transition(target: SagaStatus, columns: tuple[str, ...]) -> Select[Any]:
    """PostgreSQL: fence, saga compare-and-set and event as one statement.

    Parameters: ``f_id``, ``f_epoch``, ``f_now``, ``v_<column>``, ``e_payload`` (the event
    payload without ``from``, which the statement adds). Returns no row when the epoch is
    superseded, else the saga's status before the change and ``logged`` (0: not allowed from
    that status, nothing written).
    """
    owned = _owned()
    moved = (
        update(SAGAS)
        .where(SAGAS.c.id == owned.c.id, _status_in(owned.c.status, saga_sources_of(target)))
        .values(status=target.value, event_seq=SAGAS.c.event_seq + 1,
                **{name: bindparam(f"v_{name}") for name in columns})
        .returning(SAGAS.c.id, SAGAS.c.event_seq, owned.c.status.label("previous"),
                   SAGAS.c.dataset, SAGAS.c.partition_date, SAGAS.c.queue_head)
        .cte("moved")
    )
    payload = func.jsonb_build_object(literal("from", String), moved.c.previous,
                                      type_=JSONB).op("||", return_type=JSONB)(
        bindparam("e_payload", type_=JSONB))
    logged = (
        insert(EVENTS)
        .from_select(EVENT_COLUMNS, _event_values(moved, payload,
                                                  kind=literal("status", String),
                                                  step=literal(None, String)))
        .returning(EVENTS.c.seq)
        .cte("logged")
    )
    result = select(owned.c.status, _count(logged).label("logged"))
    if target in RELEASING:
        result = result.add_cte(_promoted(moved))
    return result


# -- a new saga ------------------------------------------------------------------------------------

#: The columns a new saga is given per request; the rest start as constants or NULL.
NEW_SAGA_COLUMNS = ("id", "definition", "dataset", "partition_date", "request", "manifest",
                    "owner", "idempotency_key", "request_fingerprint", "created_at")


def _new_saga() -> dict[str, Any]:
    values: dict[str, Any] = {name: bindparam(name, type_=SAGAS.c[name].type)
                              for name in NEW_SAGA_COLUMNS}
    # The head of its partition's queue if nothing unfinished is ahead of it (on PostgreSQL
    # under the partition's lock, LOCK_PARTITION: a head finishing meanwhile would not see it).
    ahead = exists().where(SAGAS.c.dataset == values["dataset"],
                           SAGAS.c.partition_date == values["partition_date"],
                           _status_in(SAGAS.c.status, BLOCKING))
    return {**values, "updated_at": bindparam("created_at", type_=DateTime),
            "status": _status(SagaStatus.PENDING.value), "epoch": 0, "event_seq": 1,
            "attempts": 0, "cancel_requested": False, "queue_head": ~ahead}


def _created_event(saga_id: Any) -> dict[str, Any]:
    """Event 1 of a new saga, ``created``, with the saga id from ``saga_id``."""
    return {"saga_id": saga_id, "seq": 1, "kind": literal("created", String),
            "step": literal(None, String), "epoch": 0,
            "payload": bindparam("e_payload", {"status": SagaStatus.PENDING.value},
                                 type_=EVENTS.c.payload.type),
            "created_at": bindparam("created_at", type_=DateTime)}


#: Parameters: ``NEW_SAGA_COLUMNS``. An idempotency key already used raises IntegrityError.
INSERT_SAGA = insert(SAGAS).values(_new_saga())
INSERT_CREATED_EVENT = insert(EVENTS).values(_created_event(bindparam("id", type_=String)))
#: How many unfinished sagas an owner has (``o_owner``): every saga that still holds work or
#: its partition (``BLOCKING``: pending, running, compensating, and failed, which waits for an
#: operator), counted up to ``o_limit`` (the limit: reading more would not change the answer).
UNFINISHED_OF_OWNER = select(func.count()).select_from(
    select(SAGAS.c.id).where(SAGAS.c.owner == bindparam("o_owner"),
                             _status_in(SAGAS.c.status, BLOCKING))
    .limit(bindparam("o_limit", type_=Integer)).subquery("unfinished"))
#: Serializes the active-saga check of one owner (PostgreSQL; SQLite serializes all writers).
LOCK_OWNER = select(func.pg_advisory_xact_lock(func.hashtext(bindparam("o_owner", type_=String))))


def _partition_key(dataset: Any, partition_date: Any) -> Any:
    return func.hashtext(dataset.op("||")(literal("/", String)).op("||")(
        sql_cast(partition_date, String)))


#: PostgreSQL: serializes the writes that move a partition's queue head, a saga's creation
#: (``dataset``, ``partition_date``) and a head's finish (``LOCK_PARTITION_OF``, ``f_id``), so
#: that a saga created while the head finishes is either seen by the finish or sees it
#: finished (SQLite serializes all writers). Advisory locks of two int keys, which never
#: collide with LOCK_OWNER's one bigint key.
_PARTITION_LOCKS = func.hashtext(literal("lakesaga.partition", String))
LOCK_PARTITION = select(func.pg_advisory_xact_lock(_PARTITION_LOCKS, _partition_key(
    bindparam("dataset", type_=String), bindparam("partition_date", type_=Date))))
LOCK_PARTITION_OF = (
    select(func.pg_advisory_xact_lock(_PARTITION_LOCKS,
                                      _partition_key(SAGAS.c.dataset, SAGAS.c.partition_date)))
    .where(SAGAS.c.id == bindparam("f_id"))
)


def _next_head(done: Any) -> Any:
    """The id of the oldest pending saga of ``done``'s partition (``ix_sagas_partition``)."""
    waiting = SAGAS.alias("waiting")
    return (select(waiting.c.id)
            .where(waiting.c.dataset == done.c.dataset,
                   waiting.c.partition_date == done.c.partition_date,
                   waiting.c.status == _status(SagaStatus.PENDING.value))
            .order_by(waiting.c.created_at, waiting.c.id)
            .limit(1)
            .scalar_subquery())


_done = SAGAS.alias("done")
#: SQLite, in the transaction of a head's last transition (``f_id``; succeeded or
#: compensated): the next saga of its partition becomes the head.
PROMOTE_NEXT_HEAD = (
    update(SAGAS)
    .where(SAGAS.c.id == select(_next_head(_done)).where(
        _done.c.id == bindparam("f_id"), _done.c.queue_head == true()).scalar_subquery())
    .values(queue_head=True)
)


def _promoted(done: CTE) -> CTE:
    """PostgreSQL: ``PROMOTE_NEXT_HEAD`` after ``done`` (a data-modifying CTE returning the
    finished saga's ``dataset``, ``partition_date`` and ``queue_head``), in its statement."""
    return (
        update(SAGAS)
        .where(SAGAS.c.id == select(_next_head(done)).where(done.c.queue_head == true())
               .scalar_subquery())
        .values(queue_head=True)
        .returning(SAGAS.c.id)
        .cte("promoted")
    )


def _step_rows(saga_id: Any, names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"saga_id": saga_id, "step": literal(name, String), "position": literal(i, Integer),
             "status": _status(StepStatus.PENDING.value), "attempt": literal(0, Integer),
             "compensation_attempt": literal(0, Integer)} for i, name in enumerate(names)]


@functools.cache
def insert_steps(names: tuple[str, ...]) -> Any:
    """The pending steps of a new saga (``id``), one multi-row INSERT."""
    return insert(STEPS).values(_step_rows(bindparam("id", type_=String), names))


@functools.cache
def pg_create_saga(names: tuple[str, ...]) -> Select[Any]:
    """PostgreSQL: the saga, its steps and its first event as one statement (one round trip).

    Parameters: ``NEW_SAGA_COLUMNS``. Returns the saga's id, or no row when the owner already
    used the idempotency key (then nothing was written).
    """
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    new = (pg_insert(SAGAS).values(_new_saga())
           .on_conflict_do_nothing(constraint="uq_sagas_owner_idempotency_key")
           .returning(SAGAS.c.id).cte("new_saga"))
    rows = _step_rows(new.c.id, names)
    steps = (insert(STEPS)
             .from_select(list(rows[0]), union_all(*(select(*row.values()) for row in rows)))
             .returning(STEPS.c.step).cte("new_steps"))
    event = _created_event(new.c.id)
    logged = (insert(EVENTS).from_select(list(event), select(*event.values()))
              .returning(EVENTS.c.seq).cte("new_event"))
    return select(new.c.id,
                  _count(steps).label("steps"), _count(logged).label("events"))
