"""A claim reads only the heads of the partitions' FIFO queues: what it costs the database does
not grow with the sagas queued behind a busy partition. Asserted on the work the database does
(SQLite: virtual-machine instructions; PostgreSQL: rows its plan reads) and on SQLite's plan,
never on time; ``bench/claim.py`` measures the time."""

from __future__ import annotations

import json
import uuid
from datetime import date, timedelta
from typing import Any

from sqlalchemy import text

from app.db.rows import utcnow
from app.db.session import Database
from app.saga import statements as sql
from app.saga.step_log import NewSaga, StepLog

BUSY, IDLE = date(2026, 1, 6), date(2026, 1, 7)
QUEUED = 1000


def _create(step_log: StepLog, partition: date) -> str:
    saga_id = str(uuid.uuid4())
    step_log.create_saga(NewSaga(id=saga_id, definition="noop", dataset="clicks",
                                 partition_date=partition, request={}, manifest={"files": []},
                                 request_fingerprint="", idempotency_key=None, steps=["a"]))
    return saga_id


def _params() -> dict[str, Any]:
    now = utcnow()
    return {"c_now": now, "c_owner": "probe", "c_until": now + timedelta(seconds=30)}


def _sqlite_instructions(db: Database) -> int:
    """Virtual-machine instructions SQLite runs to find the claim's candidate."""
    compiled = sql.claim_candidate(None).compile(dialect=db.engine.dialect)
    values = compiled.construct_params(_params())
    args = [str(values[name]) if name in ("c_now", "c_until") else values[name]
            for name in compiled.positiontup or ()]
    raw = db.engine.raw_connection()
    try:
        driver: Any = raw.driver_connection
        counted = [0]

        def count() -> int:
            counted[0] += 1
            return 0

        driver.set_progress_handler(count, 1)
        try:
            assert driver.execute(str(compiled), args).fetchall()
        finally:
            driver.set_progress_handler(None, 1)
        return counted[0]
    finally:
        raw.close()


def _postgres_rows_read(db: Database) -> int:
    """Rows of ``sagas`` that PostgreSQL's plan of the claim reads (kept or filtered out), from
    ``EXPLAIN ANALYZE`` of the claim in a transaction that is rolled back."""
    from psycopg.types.json import Jsonb

    compiled = sql.pg_claim(None).compile(dialect=db.engine.dialect)
    values = {k: Jsonb(v) if isinstance(v, dict) else v
              for k, v in compiled.construct_params(_params()).items()}
    with db.engine.connect() as conn:
        conn.execute(text("ANALYZE sagas"))
        plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + str(compiled),
                                    values).scalar()
        conn.rollback()
    nodes = [json.loads(plan)[0]["Plan"] if isinstance(plan, str) else plan[0]["Plan"]]
    read = 0
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        if node.get("Relation Name") == "sagas":
            loops = node.get("Actual Loops", 1)
            read += loops * (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
                             + node.get("Rows Removed by Index Recheck", 0))
    return read


def _claim_cost(db: Database) -> int:
    return _postgres_rows_read(db) if db.is_postgres else _sqlite_instructions(db)


def test_claim__costs_the_same_with_1000_sagas_queued_behind_a_busy_partition(
        db: Database, step_log: StepLog) -> None:
    _create(step_log, BUSY)
    head = step_log.claim_next("w", lease_ttl_s=30)
    assert head is not None  # BUSY is busy: what is created in it now waits
    _create(step_log, IDLE)
    unqueued = _claim_cost(db)
    assert step_log.claim_next("w", lease_ttl_s=30) is not None  # the IDLE saga
    for _ in range(QUEUED):
        _create(step_log, BUSY)
    runnable = _create(step_log, IDLE + timedelta(days=1))  # newer than every queued saga

    queued = _claim_cost(db)

    assert queued <= unqueued * 1.5 + 50, (unqueued, queued)
    claim = step_log.claim_next("w", lease_ttl_s=30)
    assert claim is not None and claim.saga_id == runnable
    assert step_log.claim_next("w", lease_ttl_s=30) is None


def test_claim__sqlite_plan_reads_pending_sagas_from_the_queue_head_index(
        db: Database) -> None:
    if db.is_postgres:
        return  # PostgreSQL: the rows its plan reads are asserted above
    compiled = sql.claim_candidate(None).compile(dialect=db.engine.dialect)
    with db.engine.connect() as conn:
        plan = [row[3] for row in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + str(compiled),
            tuple(None for _ in compiled.positiontup or ())).fetchall()]
    assert "SEARCH sagas USING INDEX ix_sagas_queue_head (queue_head=? AND status=?)" in plan, plan


def test_queue_head__a_saga_created_while_the_head_finishes_is_never_stranded(
        db: Database, step_log: StepLog) -> None:
    # The head's last transition and a new saga's creation race; whichever commits first, the
    # partition ends with one head (its oldest unfinished saga), or none if nothing is left.
    import threading

    from sqlalchemy import select

    from app.db.models import SagaRow
    from app.saga.states import SagaStatus

    _create(step_log, BUSY)
    for _ in range(15):
        claim = step_log.claim_next("w", lease_ttl_s=30)
        assert claim is not None and claim.partition_date == BUSY
        barrier = threading.Barrier(2)

        def finish(epoch: int = claim.epoch, saga_id: str = claim.saga_id,
                   barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            step_log.transition_saga(saga_id, epoch, SagaStatus.SUCCEEDED)

        racer = threading.Thread(target=finish)
        racer.start()
        barrier.wait()
        _create(step_log, BUSY)
        racer.join()
        with db.read_sessions() as s:
            waiting = list(s.execute(
                select(SagaRow.id, SagaRow.queue_head)
                .where(SagaRow.status == SagaStatus.PENDING.value)
                .order_by(SagaRow.created_at, SagaRow.id)))
        assert [head for _, head in waiting] == [True], waiting


def test_queue_head__resumes_a_head_stamped_after_a_saga_queued_behind_it(
        db: Database, step_log: StepLog, monkeypatch: Any) -> None:
    # Two POSTs to one partition can commit in the opposite order to their created_at (the
    # time is taken before the write lock; or hosts' clocks differ): the later-stamped saga
    # committed first is the head. Its resumption after a lost lease must not wait for the
    # older-stamped saga queued behind it, which waits for the head: neither would ever run.
    from sqlalchemy import update

    import app.saga.step_log as step_log_module
    from app.db.models import SagaRow

    stamped = utcnow()
    monkeypatch.setattr(step_log_module, "utcnow", lambda: stamped + timedelta(milliseconds=5))
    head = _create(step_log, BUSY)
    monkeypatch.setattr(step_log_module, "utcnow", lambda: stamped)
    behind = _create(step_log, BUSY)
    monkeypatch.undo()

    claim = step_log.claim_next("w", lease_ttl_s=30)
    assert claim is not None and claim.saga_id == head
    assert step_log.claim_next("w", lease_ttl_s=30) is None  # behind waits for the head
    with db.transaction() as s:
        s.execute(update(SagaRow).where(SagaRow.id == head)
                  .values(lease_expires_at=utcnow() - timedelta(minutes=5)))

    resumed = step_log.claim_next("w2", lease_ttl_s=30)
    assert resumed is not None and resumed.saga_id == head
    assert step_log.claim_next("w2", lease_ttl_s=30) is None  # still one at a time
    assert behind != head
