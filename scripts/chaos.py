#!/usr/bin/env python3
"""Chaos run (``make chaos``): real ``lakesaga worker`` processes SIGKILLed again and again on one
PostgreSQL deployment, with the invariant checker (I1-I6) as the judge. docs/RELIABILITY.md
records a run.

Scenarios, in order:
  trace   one succeeded and one compensated saga with LAKESAGA_FAULT_TRACE: every point of
          ``fault_points()`` is reached (the registry matches the code) and the trace order is
          what the double crashes pick their second point from
  matrix  the crash matrix (every fault point: kill there, recover, check) x ``--matrix-rounds``
  random  ``--workers`` workers, ~``--inflight`` sagas in flight on fresh and shared partitions,
          one worker SIGKILLed every 0.05-1.5 s (preferring one that holds a lease) and
          restarted, until ``--random-kills``; quiesce + check every ``--check-every`` kills
  double  ``--double`` trials: kill at fault point A, kill the recovering worker at a point B
          that comes after A (or at a random time), recover with a clean worker, check

Needs PostgreSQL at ``--pg`` (default postgresql://postgres@127.0.0.1:5432); creates and drops
its own database. Prints a summary table; exits 1 on any invariant violation or failed case.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "acceptance")]

import psycopg  # noqa: E402
from cluster import (  # noqa: E402
    TURN_BACK,
    CaseFailure,
    Cluster,
    NotQuiescent,
    Worker,
    crash_case,
    finish_case,
)

from app.lakehouse.ingestion import fault_points  # noqa: E402

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


@dataclass
class Row:
    scenario: str
    trials: int = 0
    kills: int = 0
    sagas: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)
        say(f"  FAILURE in {self.scenario}: {text[:6000]}")

    def violated(self, items: list[str], context: str) -> None:
        for item in items:
            with self.lock:
                self.violations.append(item)
            say(f"  VIOLATION in {self.scenario} ({context}): {item}")

    def add(self, *, trials: int = 0, kills: int = 0, saga: str | None = None) -> None:
        with self.lock:
            self.trials += trials
            self.kills += kills
            if saga:
                self.sagas.append(saga)


class Days:
    """Fresh partition dates, one per call."""

    def __init__(self, start: date) -> None:
        self.day = start
        self.lock = threading.Lock()

    def __call__(self) -> date:
        with self.lock:
            self.day += timedelta(days=1)
            return self.day


def tally(clusters: list[Cluster], row: Row) -> None:
    statuses: dict[str, str] = {}
    for cluster in clusters:
        statuses.update(cluster.statuses(row.sagas) if row.sagas else {})
    row.counts = {s: sum(1 for v in statuses.values() if v == s)
                  for s in ("succeeded", "compensated", "failed")}


def check_now(cluster: Cluster, row: Row, context: str) -> None:
    report = cluster.check(allow_failed=True)
    new = [str(v) for v in report.violations if str(v) not in cluster.known]
    cluster.known.update(str(v) for v in report.violations)
    row.violated(new, context)


def in_lanes(lanes: list[Cluster], work: Callable[[Cluster, list[int]], None],
             trials: int) -> None:
    """Split trial numbers 1..trials over the lanes; each lane runs its share in a thread."""
    numbers = list(range(1, trials + 1))
    with ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(work, lane, numbers[i::len(lanes)])
                       for i, lane in enumerate(lanes)]:
            future.result()


# -- scenario: trace (coverage + order) -------------------------------------------------------

def scenario_trace(cluster: Cluster, days: Days, home: Path) -> tuple[Row, list[str]]:
    row = Row("trace (coverage)")
    started = time.monotonic()
    trace = home / "trace.txt"
    order: list[str] = []
    for name, faults in (("trace-ok", ""), ("trace-back", TURN_BACK)):
        saga_id = cluster.submit(days())
        row.add(trials=1, saga=saga_id)
        worker = cluster.start_worker(name, faults, trace=trace)
        try:
            cluster.wait_quiescent(120, saga_ids=[saga_id], workers=[worker])
        except NotQuiescent as exc:
            row.fail(f"{name}: {exc}")
        worker.stop()
    for point in trace.read_text().split():
        if point not in order:
            order.append(point)
    registered = {p for group in fault_points().values() for p in group}
    missing = sorted(registered - set(order))
    if missing:
        row.fail(f"registered fault points never reached: {missing}")
    extra = sorted(set(order) - registered - {"create.before_commit", "create.after_commit"})
    if extra:
        row.notes = f"unregistered points reached: {extra}"
    check_now(cluster, row, "trace")
    row.seconds = time.monotonic() - started
    tally([cluster], row)
    return row, order


# -- scenario: the crash matrix ---------------------------------------------------------------

def scenario_matrix(lanes: list[Cluster], days: Days, rounds: int) -> Row:
    row = Row(f"matrix x{rounds}")
    started = time.monotonic()
    cases = [(g, p) for g, points in fault_points().items() for p in points] * rounds
    done = [0]

    def work(cluster: Cluster, numbers: list[int]) -> None:
        for n in numbers:
            group, point = cases[n - 1]
            rnd = (n - 1) // (len(cases) // rounds) + 1
            row.add(trials=1)
            try:
                result = crash_case(cluster, group, point, days(), known=cluster.known)
            except CaseFailure as exc:
                row.fail(f"round {rnd} {point}: {exc}")
                continue
            row.add(kills=1, saga=result.saga_id)
            if result.new_violations:
                row.violated(result.new_violations, f"round {rnd} kill at {point}")
                say(result.detail)
            if result.problems:
                row.fail(f"round {rnd} {point}: {result.problems}\n{result.detail}")
            with row.lock:
                done[0] += 1
                if done[0] % 25 == 0:
                    say(f"matrix: {done[0]}/{len(cases)} cases, {len(row.violations)} "
                        f"violations, {len(row.problems)} failures "
                        f"({time.monotonic() - started:.0f} s)")

    in_lanes(lanes, work, len(cases))
    row.seconds = time.monotonic() - started
    tally(lanes, row)
    return row


# -- scenario: random-time kills across concurrent sagas --------------------------------------

def lease_pids(cluster: Cluster) -> set[int]:
    from sqlalchemy import select

    from app.db.models import SagaRow

    with cluster.service.db.sessions() as s:
        owners = s.scalars(select(SagaRow.lease_owner).where(
            SagaRow.status.in_(["running", "compensating"]), SagaRow.lease_owner.is_not(None)))
        pids = set()
        for owner in owners:
            with contextlib.suppress(IndexError, ValueError):
                pids.add(int(str(owner).split(":")[-2]))
        return pids


def unblock_failed(cluster: Cluster, row: Row, waiting: dict[str, str]) -> None:
    """A ``failed`` saga blocks its partition until an operator retries it (by design); do
    what the operator would so that the sagas queued behind it can run."""
    from sqlalchemy import select

    from app.db.models import SagaRow

    with cluster.service.db.sessions() as s:
        failed = list(s.execute(select(SagaRow.id, SagaRow.partition_date, SagaRow.error)
                                .where(SagaRow.status == "failed")))
    busy_days = {cluster.saga(i)["partition_date"] for i in waiting}
    for saga_id, day, error in failed:
        if day.isoformat() in busy_days:
            say(f"  operator retry of failed saga {saga_id} ({day}): {error}")
            row.notes += f"retried failed {saga_id[:8]}; "
            cluster.service.retry(saga_id)


def scenario_random(cluster: Cluster, days: Days, kills_target: int, workers: int,
                    inflight: int, check_every: int, seed: int) -> Row:
    rng = random.Random(seed)
    row = Row(f"random kills ({workers} workers)")
    started = time.monotonic()
    shared = [days() for _ in range(2)]
    # The last slot fails the first catalog update of each of its lives, so some sagas
    # compensate; the others only ever die by SIGKILL.
    faults = ["" for _ in range(workers)]
    faults[-1] = TURN_BACK + "@1"
    slots: list[Worker] = [cluster.start_worker(f"random-w{i}", faults[i])
                           for i in range(workers)]
    mine: set[str] = set()

    def top_up() -> None:
        active = [i for i, st in cluster.statuses(list(mine)).items()
                  if st not in ("succeeded", "compensated", "failed")] if mine else []
        for _ in range(inflight - len(active)):
            day = rng.choice(shared) if rng.random() < 0.3 else days()
            saga_id = cluster.submit(day)
            mine.add(saga_id)
            row.sagas.append(saga_id)

    def quiesce(context: str) -> None:
        deadline = time.monotonic() + 300
        while True:
            try:
                cluster.wait_quiescent(30, saga_ids=list(mine), workers=slots)
                break
            except NotQuiescent as exc:
                if time.monotonic() > deadline:
                    row.fail(f"{context}: {exc}")
                    return
                waiting = {i: s for i, s in cluster.statuses(list(mine)).items()
                           if s not in ("succeeded", "compensated", "failed")}
                unblock_failed(cluster, row, waiting)
                for i, worker in enumerate(slots):
                    if not worker.alive():
                        row.fail(f"worker {worker.name} exited on its own: {worker.tail()}")
                        slots[i] = cluster.start_worker(f"random-w{i}", faults[i])
        check_now(cluster, row, context)

    checked_at = 0
    while row.kills < kills_target:
        top_up()
        time.sleep(rng.uniform(0.05, 1.5))
        busy = lease_pids(cluster)
        candidates = [i for i, w in enumerate(slots) if w.proc.pid in busy]
        index = rng.choice(candidates) if candidates and rng.random() < 0.75 \
            else rng.randrange(workers)
        victim = slots[index]
        if victim.alive():
            victim.kill()
            row.kills += 1
        else:
            row.fail(f"worker {victim.name} had exited on its own "
                     f"(code {victim.proc.returncode}):\n{victim.tail()}")
        slots[index] = cluster.start_worker(f"random-w{index}", faults[index])
        if row.kills - checked_at >= check_every:
            checked_at = row.kills
            say(f"random: {row.kills} kills, {len(row.sagas)} sagas; quiescing and checking")
            quiesce(f"after {row.kills} kills")
            tally([cluster], row)
            say(f"random: checked ({row.counts}, {len(row.violations)} violations so far)")
    quiesce("final")
    for worker in slots:
        worker.stop()
    row.trials = len(row.sagas)
    row.seconds = time.monotonic() - started
    tally([cluster], row)
    return row


# -- scenario: double crashes -----------------------------------------------------------------

def scenario_double(lanes: list[Cluster], days: Days, trials: int, order: list[str],
                    seed: int) -> Row:
    row = Row("double crashes")
    started = time.monotonic()
    groups = fault_points()
    forward = [p for p in order if p in groups["forward"]]  # saga.succeeded last
    backward = [p for p in order if p in groups["compensation"]]  # saga.compensated last
    delivery = list(groups["delivery"])
    enqueued = forward.index("notify_downstream.before_commit")
    done = [0]

    def trial_run(cluster: Cluster, trial: int) -> None:
        rng = random.Random(seed * 1000 + trial)
        kind = "delivery" if trial % 5 == 0 else ("back" if trial % 2 == 0 else "forward")
        back = kind == "back"
        # The second point must be one the recovering worker is sure to reach: a later point of
        # the same path, its own claim, or (forward, before the outbox row exists) a delivery;
        # after a kill mid-delivery the webhook is always sent again.
        if kind == "delivery":
            first = rng.choice(delivery)
            later = ["webhook.before_send"]
        else:
            chain = backward if back else forward
            first = rng.choice(chain[:-1])
            later = chain[chain.index(first) + 1:] + ["saga.claimed"]
            if not back and forward.index(first) < enqueued:
                later += delivery
        second = None if rng.random() < 0.25 else rng.choice(later)
        base = TURN_BACK if back else ""
        expected = "compensated" if back else "succeeded"
        saga_id = cluster.submit(days())
        row.add(trials=1, saga=saga_id)
        t_started = time.monotonic()
        label = f"double {trial}: {first} then {second or 'random time'}"
        dying = cluster.start_worker(f"double{trial}-a", ",".join(
            filter(None, [base, f"{first}=kill"])))
        if dying.wait_exit(60) != -signal.SIGKILL:
            dying.kill()
            row.fail(f"{label}: first point not reached\n{dying.tail()}")
            return
        row.add(kills=1)
        again = cluster.start_worker(f"double{trial}-b", ",".join(
            filter(None, [base, f"{second}=kill" if second else ""])))
        if second is None:
            # a random moment of the recovery (start-up included)
            code = again.wait_exit(rng.uniform(0.05, 1.5) + 1.0)
            if code is None and cluster.statuses([saga_id])[saga_id] not in (
                    "succeeded", "compensated", "failed"):
                again.kill()
                row.add(kills=1)
        else:
            code = again.wait_exit(60)
            if code == -signal.SIGKILL:
                row.add(kills=1)
            else:
                row.fail(f"{label}: second point not reached (code {code})\n"
                         f"{cluster.describe(saga_id)}\n{again.tail()}")
        again.kill()
        clean = cluster.start_worker(f"double{trial}-c", base)
        try:
            cluster.wait_quiescent(120, saga_ids=[saga_id], workers=[clean])
        except NotQuiescent as exc:
            row.fail(f"{label}: {exc}\n{cluster.describe(saga_id)}")
            clean.kill()
            return
        clean.stop()
        result = finish_case(cluster, label, saga_id, expected, t_started, cluster.known,
                             logs=[dying, again, clean])
        if result.new_violations:
            row.violated(result.new_violations, label)
            say(result.detail)
        if result.problems:
            row.fail(f"{label}: {result.problems}\n{result.detail}")

    def work(cluster: Cluster, numbers: list[int]) -> None:
        for trial in numbers:
            trial_run(cluster, trial)
            with row.lock:
                done[0] += 1
                if done[0] % 10 == 0:
                    say(f"double: {done[0]}/{trials} trials, {row.kills} kills, "
                        f"{len(row.violations)} violations, {len(row.problems)} failures "
                        f"({time.monotonic() - started:.0f} s)")

    in_lanes(lanes, work, trials)
    row.seconds = time.monotonic() - started
    tally(lanes, row)
    return row


# -- main ---------------------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    head = ("scenario", "trials", "kills", "sagas", "succeeded", "compensated", "failed",
            "violations", "other failures", "wall time")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in (
            r.scenario, r.trials, r.kills, len(r.sagas), r.counts.get("succeeded", 0),
            r.counts.get("compensated", 0), r.counts.get("failed", 0), len(r.violations),
            len(r.problems), f"{r.seconds:.0f} s")) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def database(pg: str) -> Iterator[str]:
    name = f"lakesaga_chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{pg}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg}/{name}"
    finally:
        with psycopg.connect(f"{pg}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pg", default=os.environ.get("LAKESAGA_TEST_PG",
                                                   "postgresql://postgres@127.0.0.1:5432"))
    ap.add_argument("--matrix-rounds", type=int, default=3)
    ap.add_argument("--random-kills", type=int, default=300)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--inflight", type=int, default=6)
    ap.add_argument("--check-every", type=int, default=50)
    ap.add_argument("--double", type=int, default=50)
    ap.add_argument("--records", type=int, default=2000, help="records per partition")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--lanes", type=int, default=2,
                    help="independent deployments the matrix and double crashes run on")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="lakesaga-chaos-"))
    say(f"chaos: seed {args.seed}, {args.lanes} lane(s), work directory {home}, "
        f"PostgreSQL {args.pg}")
    rows: list[Row] = []
    days = Days(date(2030, 1, 1))
    try:
        with contextlib.ExitStack() as stack:
            lanes = [stack.enter_context(Cluster(home / f"lane{i}", stack.enter_context(
                database(args.pg)), records=args.records)) for i in range(args.lanes)]
            cluster = lanes[0]
            row, order = scenario_trace(cluster, days, home)
            rows.append(row)
            say(f"trace: {len(order)} points in order; {row.notes or 'registry matches'}")
            if args.matrix_rounds:
                rows.append(scenario_matrix(lanes, days, args.matrix_rounds))
                say(f"matrix done in {rows[-1].seconds:.0f} s")
            if args.random_kills:
                rows.append(scenario_random(cluster, days, args.random_kills, args.workers,
                                            args.inflight, args.check_every, args.seed))
                say(f"random done in {rows[-1].seconds:.0f} s")
            if args.double:
                rows.append(scenario_double(lanes, days, args.double, order, args.seed))
                say(f"double done in {rows[-1].seconds:.0f} s")
            final = Row("final check (all sagas)")
            t = time.monotonic()
            for lane in lanes:
                check_now(lane, final, "final")
                final.sagas += list(lane.statuses())
            final.trials = len(lanes)
            final.seconds = time.monotonic() - t
            tally(lanes, final)
            rows.append(final)
            for lane in lanes:
                if lane.known:
                    say(f"violations still present at the end in {lane.home.name}:\n  "
                        + "\n  ".join(sorted(lane.known)))
    finally:
        total = time.monotonic() - T0
        print("\n" + table(rows), flush=True)
        print(f"\ntotal wall time {total:.0f} s ({total / 60:.1f} min); seed {args.seed}")
        for r in rows:
            if r.notes:
                print(f"note [{r.scenario}]: {r.notes}")
        if args.keep or any(r.violations or r.problems for r in rows):
            print(f"logs kept under {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    bad = sum(len(r.violations) + len(r.problems) for r in rows)
    if bad:
        print(f"CHAOS FAILED: {sum(len(r.violations) for r in rows)} violation(s), "
              f"{sum(len(r.problems) for r in rows)} failed case(s)", file=sys.stderr)
        return 1
    print("chaos: no violations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
