"""Concurrency with real processes ("Crash safety, proven", items 4-6):

1. a paused worker (zombie) resuming after another worker took its saga over cannot write;
2. two processes racing ``claim_next`` on one pending saga: exactly one wins, every time;
3. many workers, many sagas (some sharing a partition): all succeed, FIFO per partition,
   invariants hold.

The zombie tests run on PostgreSQL only. With the embedded SQLite DuckLake catalog, lake work
is serialized by a file lock (``WriteGuard`` on ``<lake_dir>/.write.lock``: a SQLite catalog
allows one writer) held across the whole lake step, COMMIT included; a worker SIGSTOPped right
before that COMMIT keeps the lock, so the new owner would block on its first lake step until the
zombie resumes: there would be no takeover to test, only a wait. The claim race runs on both.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from procs_concurrency import (
    BASE_DAY,
    Site,
    WebhookReceiver,
    WorkerPool,
    day_of_round,
    lake_counts,
    new_pending_saga,
    race_claimer,
    wait_for,
)

pytestmark = [pytest.mark.slow]

PgFactory = Callable[[], str]


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[WorkerPool]:
    workers = WorkerPool(tmp_path / "logs")
    yield workers
    workers.close()


@pytest.fixture
def pg_site(tmp_path: Path, pg_database_factory: PgFactory) -> Iterator[Site]:
    site = Site(pg_database_factory(), tmp_path / "site").open()
    yield site
    site.close()


# --------------------------------------------------------------------------- 1. zombies

class NoTakeover(AssertionError):
    """The successor could not claim the saga while the zombie was paused."""


#: The zombie pauses (SIGSTOP) right before the COMMIT of: a lake transaction (bronze, silver,
#: gold), the catalog transaction of the saga database (the pivot), and a compensation.
ZOMBIE_CASES = [
    pytest.param("ingest_to_bronze.before_commit", "", "succeeded", id="bronze"),
    pytest.param("process_to_silver.before_commit", "", "succeeded", id="silver"),
    pytest.param("aggregate_to_gold.before_commit", "", "succeeded", id="gold"),
    # The zombie holds the saga row lock inside the catalog transaction, and claims skip locked
    # rows: the successor can claim only once the server has ended the zombie's session, which
    # the saga database engine asks for at the lease TTL (idle_in_transaction_session_timeout).
    pytest.param("update_catalog.before_commit", "", "succeeded", id="catalog"),
    # Gold fails for good in the zombie's run, so its saga turns to compensation, and the zombie
    # pauses right before committing the silver restore. The new owner resumes compensation (a
    # saga found `compensating` never goes forward again), so it needs no fault of its own.
    pytest.param("delete_silver_partition.before_commit", "aggregate_to_gold=raise",
                 "compensated", id="compensation-silver"),
]


@pytest.mark.postgres
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("point", "extra_faults", "expected"), ZOMBIE_CASES)
def test_concurrency__zombie_resuming_after_takeover_writes_nothing(
    point: str, extra_faults: str, expected: str, pg_site: Site, pool: WorkerPool,
) -> None:
    site = pg_site
    day = BASE_DAY
    site.generate(day, records=2000, files=3)
    saga_id = site.submit(day)

    # A pauses itself (SIGSTOP) at the point: its heartbeat thread stops with it.
    faults = ",".join(filter(None, [extra_faults, f"{point}=stop"]))
    trace = site.home / "zombie.trace"
    zombie = pool.start("zombie", site.worker_env(
        LAKESAGA_LEASE_TTL_S="1", LAKESAGA_FAULTS=faults, LAKESAGA_FAULT_TRACE=str(trace)))
    zombie.wait_stopped(90)
    reached = trace.read_text().split()
    assert reached[-1] == point, f"the zombie ran on past {point}: {reached[-5:]}"
    paused = site.saga(saga_id)
    assert paused.epoch == 1 and paused.attempts == 1, site.describe(saga_id)
    zombie_owner = paused.lease_owner

    # Its lease runs out.
    wait_for(lambda: site.saga(saga_id).lease_expires_at < _db_now(), 10,
             "the zombie's lease to expire", lambda: site.describe(saga_id))
    time.sleep(0.2)

    # B takes the saga over (epoch 2) and finishes it while A is still paused.
    taken_at = time.monotonic()
    successor = pool.start("successor", site.worker_env())
    _wait_takeover(site, saga_id, pool)
    final = site.wait_terminal(saga_id, 90, pool.tails)
    took = time.monotonic() - taken_at
    assert zombie.stopped(), zombie.tail()
    assert final.status == expected, f"{site.describe(saga_id)}\n{pool.tails()}"
    assert final.epoch == 2, site.describe(saga_id)
    events_before = site.events(saga_id)
    claims = [e for e in events_before if e.kind == "claimed"]
    assert [c.epoch for c in claims] == [1, 2], [(c.epoch, c.payload) for c in claims]
    assert claims[0].payload["owner"] == zombie_owner
    assert claims[1].payload["owner"] != zombie_owner
    with site.lake() as lake:
        counts_before = lake_counts(lake, saga_id, day)

    # A resumes: its next write must be refused, and it must not crash or harm the saga.
    zombie.cont()
    # "stopped saga" is the executor's LostOwnership handler (lease lost, epoch superseded, or
    # a compare-and-set that matched no row); "interrupted" would mean any other failure.
    zombie.wait_log(f"stopped saga {saga_id}", 30)
    assert f"saga {saga_id} interrupted" not in zombie.log_text(), zombie.tail()
    time.sleep(1.0)  # give a misbehaving zombie the time to write anything more
    assert zombie.alive(), zombie.tail()
    assert successor.alive(), successor.tail()
    assert zombie.stop() == 0, zombie.tail()
    assert successor.stop() == 0, successor.tail()

    after = site.saga(saga_id)
    assert (after.status, after.epoch, after.attempts) == (expected, 2, 2), site.describe(saga_id)
    events_after = site.events(saga_id)
    assert [(e.seq, e.kind, e.epoch) for e in events_after] == \
        [(e.seq, e.kind, e.epoch) for e in events_before], "the zombie appended events"
    claim_seq = claims[1].seq
    assert all(e.epoch == 2 for e in events_after if e.seq >= claim_seq), \
        [(e.seq, e.kind, e.step, e.epoch) for e in events_after]

    report = site.check_invariants()
    assert report.violations == [], "\n".join(map(str, report.violations))

    steps = site.steps(saga_id)
    with site.lake() as lake:
        counts = lake_counts(lake, saga_id, day)
        writers = _commit_writers(lake, saga_id)
    assert counts == counts_before, "the zombie changed the lake after resuming"
    if expected == "succeeded":
        bronze = steps["ingest_to_bronze"].output
        assert counts == {
            "bronze": bronze["records"],
            "bronze_partition": bronze["records"],
            "silver": steps["process_to_silver"].output["records"],
            "gold": steps["aggregate_to_gold"].output["aggregated_records"],
        }, (counts, {k: v.output for k, v in steps.items()})
        assert bronze["records"] == 2000
        for name in ("ingest_to_bronze", "process_to_silver", "aggregate_to_gold"):
            assert steps[name].status == "succeeded"
        entries = site.service.partition("clickstream", day)
        assert {layer: e["rows"] for layer, e in entries["layers"].items()} == {
            "bronze": counts["bronze"], "silver": counts["silver"], "gold": counts["gold"]}
    else:
        assert counts == {"bronze": 0, "bronze_partition": 0, "silver": 0, "gold": 0}, counts
        assert "aggregate_to_gold" in (after.error or "")
    # Every lake commit of this saga after the takeover is B's (epoch 2); the zombie's commit
    # at the pause point was rolled back.
    paused_step = point.split(".")[0]
    assert (paused_step, 1) not in writers, writers
    print(f"\n[zombie at {point}] successor finished in {took:.2f} s; zombie refused; "
          f"lake {counts}; lake commits {sorted(writers)}")


def _wait_takeover(site: Site, saga_id: str, pool: WorkerPool, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if site.saga(saga_id).epoch >= 2:
            return
        time.sleep(0.1)
    raise NoTakeover(
        f"no worker claimed saga {saga_id} within {timeout_s} s of its lease expiring: "
        f"{site.describe(saga_id)}\nsessions of the saga database idle in a transaction "
        f"(a paused worker holding the saga row makes `FOR UPDATE SKIP LOCKED` skip it):\n"
        f"{_idle_in_transaction(site)}\n{pool.tails()}")


def _idle_in_transaction(site: Site) -> str:
    from sqlalchemy import text

    with site.service.db.sessions() as s:
        rows = s.execute(text(
            "SELECT pid, now() - xact_start AS age, left(query, 160) FROM pg_stat_activity "
            "WHERE datname = current_database() AND state = 'idle in transaction'")).all()
    return "\n".join(f"  pid {pid}, open {age}, last statement: {query}"
                     for pid, age, query in rows) or "  (none)"


def _db_now() -> Any:
    from app.db.rows import utcnow

    return utcnow()


def _commit_writers(lake: Any, saga_id: str) -> set[tuple[str, int]]:
    """(step, epoch) of every lake commit tagged with ``saga_id``."""
    import json

    rows = lake.cursor().execute(
        "SELECT commit_extra_info FROM lake.snapshots() "
        "WHERE commit_extra_info IS NOT NULL").fetchall()
    found = set()
    for (info,) in rows:
        try:
            tag = json.loads(info)
        except (TypeError, ValueError):
            continue
        if isinstance(tag, dict) and tag.get("saga_id") == saga_id:
            found.add((str(tag.get("step")), int(tag.get("epoch", -1))))
    return found


# --------------------------------------------------------------------------- 2. claim race

RACE_ROUNDS = 200


@pytest.mark.timeout(180)
def test_concurrency__two_processes_racing_claim_next_exactly_one_wins(database_url: str) -> None:
    from app.db.migrate import upgrade
    from app.db.session import Database
    from app.saga.step_log import StepLog

    upgrade(database_url)
    db = Database(database_url)
    step_log = StepLog(db)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    results = ctx.Queue()
    owners = ("racer-a", "racer-b")
    procs = [ctx.Process(target=race_claimer, args=(database_url, owner, RACE_ROUNDS, barrier,
                                                    results), daemon=True) for owner in owners]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=60)  # both engines are connected and warm
        wins = dict.fromkeys(owners, 0)
        for round_no in range(RACE_ROUNDS):
            saga_id = new_pending_saga(step_log, day_of_round(round_no))
            barrier.wait(timeout=60)
            got = [results.get(timeout=60) for _ in owners]
            assert {g[1] for g in got} == {round_no}, got
            errors = [g for g in got if g[2] == "error"]
            assert not errors, errors
            winners = [g for g in got if g[2] is not None]
            assert len(winners) == 1, f"round {round_no}: {got}"
            owner, _, claimed, epoch = winners[0]
            assert (claimed, epoch) == (saga_id, 1), f"round {round_no}: {got}"
            wins[owner] += 1
            row = step_log.get(saga_id)
            assert row is not None
            assert (row.status, row.epoch, row.attempts, row.lease_owner) == \
                ("running", 1, 1, owner), f"round {round_no}"
            kinds = [e.kind for e in step_log.events(saga_id)]
            # The winning (first) claim also started the first step, once.
            assert kinds == ["created", "claimed", "step_started"], f"round {round_no}: {kinds}"
            first = step_log.steps(saga_id)[0]
            assert (first.status, first.attempt) == ("running", 1), f"round {round_no}"
        for proc in procs:
            proc.join(timeout=30)
            assert proc.exitcode == 0, f"{proc.name} exit code {proc.exitcode}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        db.dispose()
    elapsed = time.monotonic() - started
    print(f"\n[claim race on {database_url.split(':')[0]}] {RACE_ROUNDS} rounds in "
          f"{elapsed:.1f} s; wins {wins}")
    assert elapsed < 90, f"{RACE_ROUNDS} rounds took {elapsed:.1f} s"


# --------------------------------------------------------------------------- 3. many workers

SINGLE_PARTITIONS = 40
SHARED_PARTITIONS = 5
WORKERS = 4


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_concurrency__fifty_sagas_four_workers_all_succeed_fifo_per_partition(
    pg_site: Site, pool: WorkerPool,
) -> None:
    from sqlalchemy import select

    from app.db.models import OutboxRow, SagaRow

    site = pg_site
    days = [BASE_DAY + timedelta(days=i) for i in range(SINGLE_PARTITIONS + SHARED_PARTITIONS)]
    for day in days:
        site.generate(day, records=500, files=2)
    shared = set(days[:: (len(days) // SHARED_PARTITIONS)][:SHARED_PARTITIONS])

    with WebhookReceiver() as receiver:
        consumer = site.service.add_consumer(
            {"name": "receiver", "dataset": "clickstream", "url": receiver.url})
        sagas: list[tuple[str, date]] = []
        pairs: list[tuple[str, str]] = []
        for day in days:
            first = site.submit(day)
            sagas.append((first, day))
            if day in shared:
                second = site.submit(day)  # right behind the first: it must wait for it
                sagas.append((second, day))
                pairs.append((first, second))
        assert len(sagas) == 50 and len(pairs) == SHARED_PARTITIONS

        # The lake's tables exist before the workers start: four workers creating them at once
        # can crash one of them (see the startup test below); this test is about the sagas.
        site.create_lake_tables()
        started = time.monotonic()
        env = site.worker_env(LAKESAGA_WEBHOOK_ALLOW_HOSTS="127.0.0.1")
        workers = [pool.start(f"worker-{i}", env) for i in range(WORKERS)]
        ids = [saga_id for saga_id, _ in sagas]

        def quiescent() -> bool:
            for worker in workers:
                if not worker.alive():
                    pytest.fail(f"{worker.name} died\n{worker.tail()}")
            with site.service.db.sessions() as s:
                rows = {r.id: r.status for r in s.scalars(select(SagaRow))}
                outbox = list(s.scalars(select(OutboxRow)))
            if any(rows[i] not in ("succeeded", "compensated", "failed") for i in ids):
                return False
            return all(o.status != "pending" for o in outbox)

        def progress() -> str:
            statuses: dict[str, int] = {}
            for saga_id in ids:
                status = site.saga(saga_id).status
                statuses[status] = statuses.get(status, 0) + 1
            return f"statuses {statuses}\n{pool.tails()}"

        wait_for(quiescent, 240, "50 sagas and their notifications to finish", progress,
                 interval_s=0.25)
        wall = time.monotonic() - started
        received = receiver.snapshot()
        for worker in workers:
            assert worker.stop() == 0, worker.tail()

    # All succeeded. A saga may be claimed more than once: a step whose lake commit keeps
    # conflicting with other sagas' commits (DuckLake's optimistic concurrency) past its retries
    # is released with a backoff and claimed again; each claim has a higher epoch.
    finals = {saga_id: site.saga(saga_id) for saga_id in ids}
    not_ok = {i: site.describe(i) for i, row in finals.items() if row.status != "succeeded"}
    assert not not_ok, not_ok
    owners: dict[str, int] = {}
    reclaimed: dict[str, int] = {}
    events = {saga_id: site.events(saga_id) for saga_id in ids}
    for saga_id, evs in events.items():
        claims = [e for e in evs if e.kind == "claimed"]
        epochs = [c.epoch for c in claims]
        assert epochs == list(range(1, len(claims) + 1)), (saga_id, epochs)
        assert finals[saga_id].epoch == len(claims)
        if len(claims) > 1:
            reclaimed[saga_id] = len(claims)
        for claim in claims:
            owner = claim.payload["owner"]
            owners[owner] = owners.get(owner, 0) + 1

    # FIFO per partition: the second saga of a pair was first claimed after the first ended.
    gaps = []
    for first, second in pairs:
        ended = next(e for e in reversed(events[first])
                     if e.kind == "status" and e.payload.get("to") == "succeeded")
        claimed = next(e for e in events[second] if e.kind == "claimed")
        assert claimed.created_at > ended.created_at, (
            f"{second} was claimed at {claimed.created_at}, before {first} ended at "
            f"{ended.created_at}")
        started_steps = [e for e in events[second] if e.kind == "step_started"]
        assert started_steps and started_steps[0].created_at > ended.created_at
        gaps.append((claimed.created_at - ended.created_at).total_seconds())

    # Every saga notified the consumer once (at least once delivered, one key per saga).
    keys: dict[str, set[str]] = {}
    for item in received:
        keys.setdefault(item["body"]["saga_id"], set()).add(item["headers"].get("webhook-id"))
    assert set(keys) == set(ids), f"no webhook for {set(ids) - set(keys)}"
    assert all(len(k) == 1 for k in keys.values()), keys

    # The partition of a pair holds the second saga's data; silver/gold once each.
    report = site.check_invariants()
    assert report.violations == [], "\n".join(map(str, report.violations))
    with site.lake() as lake:
        for saga_id, day in sagas:
            counts = lake_counts(lake, saga_id, day)
            steps = site.steps(saga_id)
            assert counts["bronze"] == steps["ingest_to_bronze"].output["records"] == 500
    for _first, second in pairs:
        day = next(d for i, d in sagas if i == second)
        with site.lake() as lake:
            counts = lake_counts(lake, second, day)
        steps = site.steps(second)
        assert counts["silver"] == steps["process_to_silver"].output["records"]
        assert counts["gold"] == steps["aggregate_to_gold"].output["aggregated_records"]
        assert counts["bronze_partition"] == 1000  # both batches are kept in bronze
    assert consumer["name"] == "receiver"
    print(f"\n[many workers] {len(ids)} sagas ({len(pairs)} pairs sharing a partition) on "
          f"{WORKERS} workers: quiescent in {wall:.1f} s; claims per worker {owners}; "
          f"sagas claimed more than once {sorted(reclaimed.values())}; "
          f"webhooks received {len(received)}; pair gaps (s) {[round(g, 3) for g in gaps]}; "
          f"stats {dict(report.stats)}")


# --------------------------------------------------------------------------- startup race

@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_concurrency__workers_started_together_on_an_empty_lake_all_come_up(
    pg_site: Site, pool: WorkerPool,
) -> None:
    workers = [pool.start(f"starter-{i}", pg_site.worker_env()) for i in range(WORKERS + 2)]

    def settled() -> bool:
        return all(not w.alive() or "running" in w.stdout.read_text(errors="replace")
                   for w in workers)

    wait_for(settled, 120, "every worker to start or exit", pool.tails, interval_s=0.1)
    dead = [w.tail() for w in workers if not w.alive()]
    assert not dead, "\n".join(dead)
