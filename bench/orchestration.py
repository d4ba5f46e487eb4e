"""Orchestration overhead: a 5-step saga whose steps do nothing, every transition persisted, on
lakesaga's own engine (SQLite and PostgreSQL, 1 and 4 worker processes), beside the peers a user
would otherwise pick, in the same run: sagaz (declarative saga, its SQLite storage) and dbos
(a 5-step durable workflow on the same PostgreSQL).

    python bench/orchestration.py --quick        # 200 sagas per configuration (smoke)
    python bench/orchestration.py                # 3,000 sagas per configuration
    python bench/orchestration.py --profile      # also a pyinstrument profile of one lakesaga worker

lakesaga: N pending sagas are created first (timed: the creation rate), then W worker processes
with C threads each call ``Executor.run_once`` until nothing is claimable; sagas/s = N / (last
``finished_at`` - go). Every StepLog call is timed in the workers (a StepLog subclass), so the
per-transition latency is that of one persisted write (the claim with the first step's start,
a step's success with the next step's start or the saga's success), each its own transaction. sagaz and dbos:
each of W processes runs N/W sagas (C in flight: asyncio tasks for sagaz, threads for dbos);
sagas/s = N / (last end - go).

The floor (SQLite, one saga in flight): the statements and transactions one lakesaga worker ran,
recorded as its driver got them (SQL and bound values) in an unmeasured run, then replayed on a
copy of the same database with Python's sqlite3 alone (its prepared-statement cache; no
SQLAlchemy, no engine): what lakesaga's writes cost SQLite itself on this machine. The engine's
rate over the floor's is the share of its time that is the database's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

STEPS = ["s1", "s2", "s3", "s4", "s5"]
DEFINITION = "bench_noop"
#: StepLog methods that persist a transition (each one transaction with its saga_events rows).
WRITES = ("claim_next", "update_step", "advance", "transition_saga")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------------
# Worker processes (``orchestration.py _worker ENGINE ...``): set up, print "ready", wait for
# "go" on stdin, run, print one JSON line of measurements.
# ---------------------------------------------------------------------------------------------


def _copy(fn: Any) -> Any:
    """A distinct function object, so that each decorator marks its own."""
    import types

    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


def _await_go() -> float:
    print("ready", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        sys.exit(f"expected go, got {line!r}")
    return time.time()


def record_statements(recorded: list[tuple[str, Any]]) -> None:
    """Append every saga-log statement this process runs, as its driver gets it (SQL and bound
    values), to ``recorded``, with ``BEGIN IMMEDIATE``/``COMMIT`` around each write."""
    from contextlib import contextmanager

    from app.db import session
    from app.db.session import Database
    from app.saga import step_log

    run = session.run_on_driver

    def recording(connection: Any, statement: Any, params: dict[str, Any]) -> Any:
        result = run(connection, statement, params)
        compiled = session._driver_statements[(statement, connection.dialect.name)]
        recorded.append((compiled.sql, compiled.arguments(params)))
        return result

    writing = Database.writing

    @contextmanager
    def recorded_writing(self: Database) -> Any:
        recorded.append(("BEGIN IMMEDIATE", ()))
        with writing(self) as connection:
            yield connection
        recorded.append(("COMMIT", ()))

    step_log.run_on_driver = recording
    Database.writing = recorded_writing  # type: ignore[method-assign]


def lakesaga_worker(a: argparse.Namespace) -> dict[str, Any]:
    from app.db.session import Database
    from app.saga import Saga, StepContext, action, compensate
    from app.saga.executor import Executor, ExecutorConfig
    from app.saga.step_log import StepLog

    def noop(self: Saga, ctx: StepContext) -> dict[str, Any]:
        return {}

    members: dict[str, Any] = {"name": DEFINITION}
    for i, step in enumerate(STEPS):  # s1 -> s2 -> ... -> s5, each with a compensation
        members[f"do_{step}"] = action(step, depends_on=STEPS[i - 1:i])(_copy(noop))
        members[f"undo_{step}"] = compensate(step)(_copy(noop))
    NoopSaga: Any = type("NoopSaga", (Saga,), members)

    timings: dict[str, list[float]] = {}
    saga_latency: list[float] = []
    started: dict[str, float] = {}

    class TimedStepLog(StepLog):
        """Times every call; the claim-to-terminal time of each saga too."""

    def timed(name: str) -> Any:
        original = getattr(StepLog, name)

        def wrapper(self: StepLog, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                end = time.perf_counter()
                timings.setdefault(name, []).append(end - t)
                # The saga's last write: a transition, or the last step's success (advance)
                if name == "transition_saga" or (name == "advance" and kwargs["start"] is None):
                    begun = started.pop(args[0], None)
                    if begun is not None:
                        saga_latency.append(end - begun)

        return wrapper

    for name in ("claim_next", "update_step", "advance", "transition_saga", "get", "steps",
                 "ensure_owner",
                 "cancel_requested", "renew_lease", "release", "save_checkpoint"):
        setattr(TimedStepLog, name, timed(name))
    original_claim = TimedStepLog.claim_next

    def claim_and_mark(self: StepLog, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        claim = original_claim(self, *args, **kwargs)
        if claim is not None:
            started[claim.saga_id] = t
        return claim

    TimedStepLog.claim_next = claim_and_mark  # type: ignore[method-assign]

    recorded: list[tuple[str, Any]] = []
    if a.record:
        record_statements(recorded)
    db = Database(a.url, idle_in_transaction_timeout_s=30.0)
    step_log = TimedStepLog(db)
    executor = Executor(step_log, {DEFINITION: NoopSaga},
                        ExecutorConfig(concurrency=a.concurrency, poll_interval_s=0.05))
    step_log.get("warm-up")  # open a pooled connection before the clock starts

    def drain() -> None:
        while executor.run_once():
            pass

    profile_text = None
    go = _await_go()
    if a.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
        drain()
        profiler.stop()
        profile_text = profiler.output_text(unicode=False, color=False, show_all=False)
    else:
        threads = [threading.Thread(target=drain) for _ in range(a.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    end = time.time()
    db.dispose()
    if a.record:
        Path(a.record).write_bytes(pickle.dumps(recorded))
    return {"go": go, "end": end, "timings": timings, "saga_latency": saga_latency,
            "profile": profile_text}


def floor_worker(a: argparse.Namespace) -> dict[str, Any]:
    """Replay recorded statements (``--statements``) on the SQLite file ``--url`` with sqlite3
    alone, set up as the saga log sets up its connections (``app.db.session``)."""
    recorded: list[tuple[str, Any]] = pickle.loads(Path(a.statements).read_bytes())  # noqa: S301
    connection = sqlite3.connect(a.url, isolation_level=None, cached_statements=256)
    for pragma in ("journal_mode=WAL", "busy_timeout=60000", "foreign_keys=ON",
                   "synchronous=NORMAL"):
        connection.execute(f"PRAGMA {pragma}")
    cursor = connection.cursor()
    transactions: list[float] = []
    go = _await_go()
    began = 0.0
    for sql, args in recorded:
        if sql == "BEGIN IMMEDIATE":
            began = time.perf_counter()
        cursor.execute(sql, args)
        if cursor.description:
            cursor.fetchall()
        if sql == "COMMIT":
            transactions.append(time.perf_counter() - began)
    end = time.time()
    connection.close()
    return {"go": go, "end": end, "timings": {"transaction": transactions}, "saga_latency": []}


def sagaz_worker(a: argparse.Namespace) -> dict[str, Any]:
    from sagaz import Saga, SagaConfig, action, compensate
    from sagaz.core.listeners import SagaListener
    from sagaz.core.storage.backends.sqlite import SQLiteSagaStorage
    from sagaz.core.types import SagaStatus

    writes: list[float] = []

    class TimedStorage(SQLiteSagaStorage):
        async def save_saga_state(self, *args: Any, **kwargs: Any) -> None:
            t = time.perf_counter()
            try:
                await super().save_saga_state(*args, **kwargs)
            finally:
                writes.append(time.perf_counter() - t)

    class PersistEachStep(SagaListener):
        """Upserts the saga row with the steps done so far after each step (sagaz's declarative
        saga itself persists only its start and its end)."""

        def __init__(self, storage: SQLiteSagaStorage) -> None:
            self.storage = storage

        async def on_step_success(self, saga_name: str, step_name: str, ctx: dict[str, Any],
                                  result: Any) -> None:
            done = [*ctx.get("steps_done", []), step_name]
            ctx["steps_done"] = done
            await self.storage.save_saga_state(
                ctx["saga_id"], saga_name, SagaStatus.EXECUTING,
                [{"name": s, "status": "completed"} for s in done], ctx)

    async def noop(self: Saga, ctx: dict[str, Any]) -> None:
        return None

    members: dict[str, Any] = {"saga_name": DEFINITION}
    for i, step in enumerate(STEPS):
        members[f"do_{step}"] = action(step, depends_on=STEPS[i - 1:i])(_copy(noop))
        members[f"undo_{step}"] = compensate(step)(_copy(noop))
    NoopSaga: Any = type("NoopSaga", (Saga,), members)

    latency: list[float] = []

    async def run() -> tuple[float, float]:
        storage = TimedStorage(a.url)
        await storage.initialize()
        # Metrics and logging listeners off: lakesaga's bench logs nothing either.
        config = SagaConfig(storage=storage, metrics=False, logging=False)
        if a.variant == "per-step":
            NoopSaga.listeners = [PersistEachStep(storage)]
        go = await asyncio.get_running_loop().run_in_executor(None, _await_go)
        gate = asyncio.Semaphore(a.concurrency)

        async def one(i: int) -> None:
            async with gate:
                t = time.perf_counter()
                await NoopSaga(config=config).run({"i": i})
                latency.append(time.perf_counter() - t)

        await asyncio.gather(*(one(i) for i in range(a.count)))
        end = time.time()
        await storage.close()
        return go, end

    go, end = asyncio.run(run())
    return {"go": go, "end": end, "timings": {"save_saga_state": writes}, "saga_latency": latency}


def dbos_worker(a: argparse.Namespace) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from dbos import DBOS

    step_times: list[float] = []
    latency: list[float] = []
    DBOS(config={"name": "lakesaga-bench", "system_database_url": a.url, "log_level": "WARNING",
                 "executor_id": f"bench-{os.getpid()}"})

    @DBOS.step()
    def s1() -> None:
        return None

    @DBOS.step()
    def s2() -> None:
        return None

    @DBOS.step()
    def s3() -> None:
        return None

    @DBOS.step()
    def s4() -> None:
        return None

    @DBOS.step()
    def s5() -> None:
        return None

    @DBOS.workflow()
    def noop(i: int) -> int:
        for step in (s1, s2, s3, s4, s5):
            t = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - t)
        return i

    DBOS.launch()
    if a.setup_only:  # migrate the system database once, before the measured processes start
        DBOS.destroy()
        return {}

    def one(i: int) -> None:
        t = time.perf_counter()
        noop(i)
        latency.append(time.perf_counter() - t)

    go = _await_go()
    with ThreadPoolExecutor(a.concurrency) as pool:
        list(pool.map(one, range(a.count)))
    end = time.time()
    DBOS.destroy()
    return {"go": go, "end": end, "timings": {"step": step_times}, "saga_latency": latency}


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="orchestration.py _worker")
    p.add_argument("engine", choices=("lakesaga", "sagaz", "dbos", "floor"))
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--variant", default="")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--setup-only", action="store_true")
    p.add_argument("--record", help="lakesaga: write the statements it ran to this file")
    p.add_argument("--statements", help="floor: the recorded statements to replay")
    a = p.parse_args(argv)
    fn = {"lakesaga": lakesaga_worker, "sagaz": sagaz_worker, "dbos": dbos_worker,
          "floor": floor_worker}[a.engine]
    print(json.dumps(fn(a)), flush=True)


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------


def run_workers(engine: str, url: str, procs: int, counts: list[int], concurrency: int,
                variant: str = "", profile: bool = False, extra: tuple[str, ...] = (),
                ) -> list[dict[str, Any]]:
    """Start the workers, release them together, collect their JSON."""
    children = []
    for count in counts:
        cmd = [sys.executable, __file__, "_worker", engine, "--url", url, "--count", str(count),
               "--concurrency", str(concurrency), "--variant", variant, *extra]
        if profile:
            cmd.append("--profile")
        children.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # noqa: S603
                                         stderr=subprocess.PIPE, text=True, cwd=harness.ROOT))
    assert len(children) == procs
    for child in children:
        assert child.stdout is not None
        line = child.stdout.readline()
        if line.strip() != "ready":
            err = child.stderr.read() if child.stderr else ""
            raise RuntimeError(f"{engine} worker did not start: {line!r} {err[-3000:]}")
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    results = []
    for child in children:
        out, err = child.communicate(timeout=3600)
        if child.returncode != 0:
            raise RuntimeError(f"{engine} worker failed ({child.returncode}): {err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def summarize(engine: str, storage: str, procs: int, concurrency: int, n: int, elapsed: float,
              results: list[dict[str, Any]], write_keys: tuple[str, ...], writes_per_saga: float,
              **extra: Any) -> dict[str, Any]:
    merged: dict[str, list[float]] = {}
    for r in results:
        for k, v in r["timings"].items():
            merged.setdefault(k, []).extend(v)
    writes = [v for k in write_keys for v in merged.get(k, [])]
    latency = [v for r in results for v in r["saga_latency"]]
    return {
        "engine": engine, "storage": storage, "procs": procs, "concurrency": concurrency,
        "sagas": n, "elapsed_s": elapsed, "sagas_per_s": n / elapsed if elapsed > 0 else None,
        "transition": harness.latency_summary(writes), "saga": harness.latency_summary(latency),
        "writes_per_saga": writes_per_saga,
        "calls": {k: harness.latency_summary(v) for k, v in sorted(merged.items())},
        **extra,
    }


def saga_log(backend: str) -> str:
    """A new, migrated saga log for lakesaga's workers; its URL."""
    return harness.migrated_saga_log(backend, "orchestration")


def create_sagas(url: str, n: int) -> float:
    """Create ``n`` pending no-op sagas; returns the seconds it took."""
    from app.db.session import Database
    from app.saga.step_log import NewSaga, StepLog

    db = Database(url)
    log = StepLog(db)
    base = date(2000, 1, 1)
    t = time.perf_counter()
    for i in range(n):  # one partition each: FIFO per partition would serialize them
        log.create_saga(NewSaga(id=str(uuid.uuid4()), definition=DEFINITION, dataset="noop",
                                partition_date=base + timedelta(days=i), request={"i": i},
                                manifest={"files": []}, request_fingerprint="", idempotency_key=None,
                                steps=STEPS))
    elapsed = time.perf_counter() - t
    db.dispose()
    return elapsed


def bench_lakesaga(backend: str, procs: int, a: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import func, select

    from app.db.models import SagaEventRow, SagaRow
    from app.db.session import Database

    url = saga_log(backend)
    create_s = create_sagas(url, a.sagas)
    db = Database(url)
    results = run_workers("lakesaga", url, procs, [0] * procs, a.concurrency)
    with db.sessions() as s:
        done = s.scalar(select(func.count()).where(SagaRow.status == "succeeded"))
        last = s.scalar(select(func.max(SagaRow.finished_at)))
        events = s.scalar(select(func.count()).select_from(SagaEventRow))
    db.dispose()
    if done != a.sagas or last is None:
        raise RuntimeError(f"lakesaga {backend}: {done} of {a.sagas} sagas succeeded")
    go = min(datetime.fromtimestamp(r["go"], UTC).replace(tzinfo=None) for r in results)
    elapsed = (last - go).total_seconds()
    writes = sum(len(r["timings"].get(k, [])) for r in results for k in WRITES)
    return summarize("lakesaga", backend, procs, a.concurrency, a.sagas, elapsed, results, WRITES,
                     writes / a.sagas, create_per_s=a.sagas / create_s,
                     events_per_saga=events / a.sagas)


def bench_sagaz(variant: str, procs: int, a: argparse.Namespace) -> dict[str, Any]:
    path = harness.fresh_dir(harness.WORK / "orchestration-sagaz") / "sagaz.db"
    results = run_workers("sagaz", str(path), procs, split(a.sagas, procs), a.concurrency, variant)
    elapsed = max(r["end"] for r in results) - min(r["go"] for r in results)
    writes = sum(len(r["timings"]["save_saga_state"]) for r in results)
    return summarize("sagaz", f"sqlite ({variant})", procs, a.concurrency, a.sagas, elapsed,
                     results, ("save_saga_state",), writes / a.sagas)


def bench_dbos(procs: int, a: argparse.Namespace) -> dict[str, Any]:
    url = harness.recreate_pg_database("bench_dbos")
    setup = subprocess.run([sys.executable, __file__, "_worker", "dbos", "--url", url,  # noqa: S603
                            "--setup-only"], capture_output=True, text=True, cwd=harness.ROOT)
    if setup.returncode != 0:
        raise RuntimeError(f"dbos setup failed: {setup.stderr[-3000:]}")
    results = run_workers("dbos", url, procs, split(a.sagas, procs), a.concurrency)
    elapsed = max(r["end"] for r in results) - min(r["go"] for r in results)
    return summarize("dbos", "postgres", procs, a.concurrency, a.sagas, elapsed, results,
                     ("step",), 7.0, transition_is="one step call (its output recorded)")


def bench_floor(a: argparse.Namespace) -> dict[str, Any]:
    """The SQLite floor of one lakesaga worker with one saga in flight (see the module
    docstring): record its statements in an unmeasured run, replay them on a copy of the log."""
    url = saga_log("sqlite")
    create_sagas(url, a.sagas)
    path = Path(url.removeprefix("sqlite:///"))
    replayed = path.with_name("replayed.db")
    shutil.copy(path, replayed)  # create_sagas closed every connection: no WAL is left
    statements = path.with_name("statements.pickle")
    run_workers("lakesaga", url, 1, [0], 1, extra=("--record", str(statements)))
    recorded = pickle.loads(statements.read_bytes())  # noqa: S301
    (result,) = run_workers("floor", str(replayed), 1, [0], 1,
                            extra=("--statements", str(statements)))
    with contextlib.closing(sqlite3.connect(replayed)) as check:
        done = check.execute("SELECT count(*) FROM sagas WHERE status = 'succeeded'").fetchone()[0]
    if done != a.sagas:  # the replay did not do a whole run's work
        raise RuntimeError(f"floor: {done} of {a.sagas} sagas succeeded in the replayed log")
    commits = sum(1 for sql, _ in recorded if sql == "COMMIT")
    return summarize("sqlite3", "lakesaga's SQL (floor)", 1, 1, a.sagas,
                     result["end"] - result["go"], [result], ("transaction",), commits / a.sagas,
                     statements_per_saga=(len(recorded) - 2 * commits) / a.sagas)


def profile_lakesaga(backend: str, a: argparse.Namespace, quick: bool) -> Path:
    url = saga_log(backend)
    create_sagas(url, a.sagas)
    (result,) = run_workers("lakesaga", url, 1, [0], 1, profile=True)
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    path = harness.RESULTS / f"orchestration-profile-{backend}{'.quick' if quick else ''}.txt"
    path.write_text(result["profile"])
    return path


def floor_share(result: dict[str, Any]) -> str | None:
    """A sentence on lakesaga's one-in-flight rate against its SQLite floor, if both ran."""
    configs = result["configs"]
    engine = [c for c in configs if (c["engine"], c["storage"], c["procs"], c["concurrency"])
              == ("lakesaga", "sqlite", 1, 1)]
    floor = [c for c in configs if c["engine"] == "sqlite3"]
    if not (engine and floor):
        return None
    lk, fl = engine[0], floor[0]
    return (f"lakesaga's no-op saga with one in flight ran at {lk['sagas_per_s']:,.0f} sagas/s, "
            f"{lk['sagas_per_s'] / fl['sagas_per_s']:.0%} of its SQLite floor "
            f"({fl['sagas_per_s']:,.0f} sagas/s for the same {fl['statements_per_saga']:.0f} "
            f"statements in {fl['writes_per_saga']:.0f} transactions per saga): the rest of its "
            "time per saga is Python, the engine's and SQLAlchemy's.")


def render(result: dict[str, Any]) -> str:
    rows = []
    for r in result["configs"]:
        rows.append([r["engine"], r["storage"], r["procs"], r["concurrency"], r["sagas"],
                     r["sagas_per_s"], r["saga"]["p50_ms"], r["saga"]["p99_ms"],
                     r["transition"]["p50_ms"], r["transition"]["p99_ms"],
                     r["writes_per_saga"], r.get("create_per_s")])
    return harness.table(["engine", "storage", "procs", "in flight/proc", "sagas", "sagas/s",
                          "saga p50 ms", "saga p99 ms", "transition p50 ms", "transition p99 ms",
                          "writes/saga", "lakesaga create/s"], rows)


def main() -> None:
    harness.ensure_bench_python()
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 sagas per configuration")
    p.add_argument("--sagas", type=int, help="sagas per configuration (default 3000)")
    p.add_argument("--procs", default="1,4", help="worker process counts (default 1,4)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="sagas in flight per process: executor threads, dbos threads, sagaz tasks")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--peers", default="sagaz,dbos", help="peers to run beside lakesaga ('' = none)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one lakesaga worker (1 thread) with pyinstrument")
    a = p.parse_args()
    a.sagas = a.sagas or (200 if a.quick else 3000)
    procs = [int(x) for x in a.procs.split(",")]
    peers = [x for x in a.peers.split(",") if x]
    harness.print_header("orchestration (no-op 5-step saga)", a.quick)
    configs = []

    def report(r: dict[str, Any]) -> None:
        configs.append(r)
        print(f"  {r['engine']:<8} {r['storage']:<20} procs {r['procs']}  "
              f"{r['sagas_per_s']:8.1f} sagas/s  transition p50 {r['transition']['p50_ms']} ms "
              f"p99 {r['transition']['p99_ms']} ms", flush=True)

    for n in procs:
        for backend in a.backends.split(","):
            report(bench_lakesaga(backend, n, a))
        if "sagaz" in peers:
            for variant in ("as shipped", "per-step"):
                report(bench_sagaz(variant, n, a))
        if "dbos" in peers:
            report(bench_dbos(n, a))
    if 1 in procs and a.concurrency != 1:
        # One saga in flight: no thread or task interleaving, each engine's own cost per saga.
        one = argparse.Namespace(**{**vars(a), "concurrency": 1})
        if "sqlite" in a.backends.split(","):
            report(bench_lakesaga("sqlite", 1, one))
            report(bench_floor(one))
        if "sagaz" in peers:
            report(bench_sagaz("as shipped", 1, one))
    profiles = {}
    if a.profile:
        for backend in a.backends.split(","):
            path = profile_lakesaga(backend, a, a.quick)
            profiles[backend] = str(path.relative_to(harness.ROOT))
            print(f"  profile of one lakesaga worker on {backend}: {profiles[backend]}")
    harness.drop_pg_database("bench_orchestration")
    harness.drop_pg_database("bench_dbos")
    result = {"configs": configs, "profiles": profiles}
    path = harness.write_result("orchestration", a.quick, result)
    print()
    print(render(result))
    print(f"\nwritten {path.relative_to(harness.ROOT)}")


if __name__ == "__main__":
    main()
