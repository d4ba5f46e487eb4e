"""Claim cost with sagas queued behind a busy partition: ``StepLog.claim_next`` with 0 and with
10,000 pending sagas waiting behind one running saga of the same partition, on SQLite and
PostgreSQL. A claim must cost the same either way (it reads only partition queue heads).

    python bench/claim.py                 # 0 and 10,000 queued, both backends
    python bench/claim.py --quick         # 0 and 1,000 queued (smoke)
    python bench/claim.py --backends sqlite --queued 0 2000 10000

For each backend and queue length: a fresh saga log; saga H of partition P is created and
claimed (running, its lease live), then N sagas of P are created behind it (pending, blocked).
Two claims are timed, each ``--rounds`` times, in one process and one thread:

- *idle*: nothing is claimable (every pending saga waits behind H): ``claim_next`` -> None.
- *take*: a saga of a fresh partition was just created (untimed): ``claim_next`` takes it, and
  its first step's start, in the claim's write.

PostgreSQL gets ``ANALYZE sagas`` after seeding (what autovacuum would do). Needs only the app
and psycopg, so it runs under the project's ``.venv`` as well as ``.venv-bench``. To measure
another commit's claim with this script, put its ``app`` first on the path and name the result:

    git archive <commit> app migrations alembic.ini | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old:.venv/lib/python3.11/site-packages .venv/bin/python -S bench/claim.py \
        --name claim-before --label "before (<commit>)"
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

DEFINITION = "noop"
STEPS = ["a", "b", "c"]
BLOCKED = date(2000, 1, 1)


def _new(partition: date) -> Any:
    from app.saga.step_log import NewSaga

    return NewSaga(id=str(uuid.uuid4()), definition=DEFINITION, dataset="noop",
                   partition_date=partition, request={}, manifest={"files": []},
                   request_fingerprint="", idempotency_key=None, steps=STEPS)


def measure(backend: str, queued: int, rounds: int) -> dict[str, Any]:
    from sqlalchemy import text

    from app.db.session import Database
    from app.saga.step_log import StepLog

    url = harness.migrated_saga_log(backend, "claim")
    db = Database(url)
    log = StepLog(db)
    try:
        log.create_saga(_new(BLOCKED))
        head = log.claim_next("bench-head", lease_ttl_s=3600)
        assert head is not None
        t = time.perf_counter()
        for _ in range(queued):
            log.create_saga(_new(BLOCKED))
        seed_s = time.perf_counter() - t
        if db.is_postgres:
            with db.engine.connect() as conn:
                conn.execute(text("ANALYZE sagas"))
                conn.commit()
        idle, take = [], []
        for i in range(rounds):
            t = time.perf_counter()
            found = log.claim_next("bench", lease_ttl_s=3600)
            idle.append(time.perf_counter() - t)
            assert found is None, found
            log.create_saga(_new(date(3000, 1, 1) + timedelta(days=i)))
            t = time.perf_counter()
            found = log.claim_next("bench", lease_ttl_s=3600)
            take.append(time.perf_counter() - t)
            assert found is not None
    finally:
        db.dispose()
        if backend == "postgres":
            harness.drop_pg_database("bench_claim")
    return {"backend": backend, "queued": queued, "rounds": rounds, "seed_s": round(seed_s, 2),
            "idle": harness.latency_summary(idle), "take": harness.latency_summary(take)}


def render(result: dict[str, Any]) -> str:
    """The runs as a table: p50/p99 of each claim, and p50 over the p50 with nothing queued."""
    runs = result["runs"]
    rows = []
    for run in runs:
        base = next(r for r in runs if r["backend"] == run["backend"])
        rows.append([run["backend"], f"{run['queued']:,}",
                     *(harness.fmt(run[kind][q], 3) for kind in ("idle", "take")
                       for q in ("p50_ms", "p99_ms")),
                     f"{run['idle']['p50_ms'] / base['idle']['p50_ms']:.2f}x",
                     f"{run['take']['p50_ms'] / base['take']['p50_ms']:.2f}x"])
    return harness.table(["saga db", "queued", "idle p50 ms", "idle p99 ms", "take p50 ms",
                          "take p99 ms", "idle ratio", "take ratio"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"],
                        choices=["sqlite", "postgres"])
    parser.add_argument("--queued", nargs="+", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--name", default="claim", help="result file name (bench/results/)")
    parser.add_argument("--label", default="this commit", help="what the result measures")
    a = parser.parse_args()
    queued = a.queued or ([0, 1_000] if a.quick else [0, 10_000])
    rounds = a.rounds or (50 if a.quick else 300)
    import app

    result = {"machine": harness.machine_info(), "command": harness.command_line(),
              "label": a.label, "app": str(Path(app.__file__).parent),
              "runs": [measure(backend, n, rounds) for backend in a.backends for n in queued]}
    print(render(result))
    print(f"wrote {harness.write_result(a.name, a.quick, result)}")


if __name__ == "__main__":
    main()
