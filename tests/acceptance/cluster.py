"""One lakesaga deployment driven from a test or script: ``lakesaga worker`` subprocesses, an
in-process ``Service`` to submit sagas and read the log, a webhook receiver, and the invariant
checker. Used by tests/acceptance/test_crash_matrix.py and scripts/chaos.py (no pytest import).

Workers run with a 1 s lease so a killed worker's saga is taken over within about a second.
Every process started here is SIGKILLed by ``close()`` whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select

from app.lakehouse.ingestion import LakehouseIngestionSaga

#: In-process invariant checks attach their own DuckDB lake: one at a time in this process.
_CHECK_LOCK = threading.Lock()
TERMINAL = frozenset({"succeeded", "compensated", "failed"})
DATASET = "clickstream"


def lakesaga_bin() -> str:
    candidate = Path(sys.executable).parent / "lakesaga"
    if candidate.exists():
        return str(candidate)
    import shutil

    found = shutil.which("lakesaga")
    if found is None:
        raise RuntimeError("the lakesaga console script is not installed next to this interpreter")
    return found


def stop_process(proc: subprocess.Popen[Any], timeout_s: float, *, resume: bool = False) -> int:
    """Graceful stop (SIGTERM, as an orchestrator would), SIGKILL if it hangs; ``resume`` first
    sends SIGCONT, for a process that may be paused."""
    if proc.poll() is None:
        if resume:
            proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return int(proc.wait(timeout=30))


def tail_of(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path.name}: missing>"
    return f"--- {path} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that answers 200 and records every ``webhook-id`` it gets."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                with receiver._lock:
                    receiver.ids.append(self.headers.get("webhook-id") or "")
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhooks",
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.ids)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Worker:
    """A ``lakesaga worker`` subprocess whose stdout+stderr go to ``log``."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    faults: str
    handle: IO[bytes]
    started_at: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        return (f"[worker {self.name}: pid {self.proc.pid}, faults {self.faults!r}, "
                f"returncode {self.proc.returncode}]\n{tail_of(self.log, lines)}")

    def wait_exit(self, timeout_s: float) -> int | None:
        """The return code, or None if still running after ``timeout_s``."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int:
        if self.alive():
            self.proc.kill()
        code = self.proc.wait(timeout=30)
        self.handle.close()
        return code

    def stop(self, timeout_s: float = 20) -> int:
        code = stop_process(self.proc, timeout_s)
        self.handle.close()
        return code


class NotQuiescent(AssertionError):
    pass


class Cluster:
    """One deployment: saga database ``database_url``, source root and lake under ``home``."""

    def __init__(self, home: Path, database_url: str, *, consumer: bool = True,
                 records: int = 2000, files: int = 3, worker_env: dict[str, str] | None = None,
                 ) -> None:
        self.home = home
        self.database_url = database_url
        self.source_root = home / "raw"
        self.lake_dir = home / "lake"
        self.logs = home / "logs"
        for d in (self.source_root, self.lake_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.records, self.files = records, files
        self.worker_env = dict(worker_env or {})
        self.workers: list[Worker] = []
        #: Violations already reported for this deployment (callers blame only new ones).
        self.known: set[str] = set()
        self._names: Counter[str] = Counter()
        from app.service import Service

        self.service = Service(self.settings())
        self.receiver: WebhookReceiver | None = None
        if consumer:
            self.receiver = WebhookReceiver()
            self.service.add_consumer({"name": "receiver", "dataset": DATASET,
                                       "url": self.receiver.url})

    # -- configuration -----------------------------------------------------------------------

    def settings(self) -> Any:
        from app.settings import Settings

        return Settings(database_url=self.database_url, source_root=self.source_root,
                        lake_dir=self.lake_dir, faults="", fault_trace=None,
                        webhook_allow_hosts=["127.0.0.1"], auto_migrate=True)

    def env(self, faults: str = "", trace: Path | str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESAGA_")}
        env.update({
            "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1",
            "LAKESAGA_DATABASE_URL": self.database_url,
            "LAKESAGA_SOURCE_ROOT": str(self.source_root),
            "LAKESAGA_LAKE_DIR": str(self.lake_dir),
            "LAKESAGA_LEASE_TTL_S": "1",
            "LAKESAGA_POLL_INTERVAL_S": "0.05",
            "LAKESAGA_STEP_BACKOFF_S": "0.01",
            "LAKESAGA_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
            # The dispatcher leases a row for the deadline plus 2x the timeout: a kill mid-send
            # delays the retry by that much (3 s here), so keep both short for a local receiver.
            "LAKESAGA_WEBHOOK_TIMEOUT_S": "1",
            "LAKESAGA_WEBHOOK_DEADLINE_S": "1",
            "LAKESAGA_FAULTS": faults,
            "LAKESAGA_LOG_LEVEL": "INFO",
            # The in-process Service migrated the database already; saves a worker start-up.
            "LAKESAGA_AUTO_MIGRATE": "false",
        })
        if trace:
            env["LAKESAGA_FAULT_TRACE"] = str(trace)
        env.update(self.worker_env)
        return env

    # -- workers -----------------------------------------------------------------------------

    def start_worker(self, name: str, faults: str = "", trace: Path | str | None = None) -> Worker:
        """Start ``lakesaga worker``; its log is logs/<name>.log (appended when a name repeats)."""
        self._names[name] += 1
        log = self.logs / f"{name}.log"
        handle = log.open("ab")
        handle.write(f"==== start #{self._names[name]} faults={faults!r} at {time.time():.3f}\n"
                     .encode())
        handle.flush()
        proc = subprocess.Popen([lakesaga_bin(), "worker"], env=self.env(faults, trace),
                                cwd=self.home, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        worker = Worker(name, proc, log, faults, handle)
        self.workers.append(worker)
        return worker

    def tails(self, lines: int = 30, last: int = 3) -> str:
        return "\n".join(w.tail(lines) for w in self.workers[-last:])

    # -- data and sagas ----------------------------------------------------------------------

    def generate(self, day: date) -> dict[str, Any]:
        """Raw clickstream for ``day`` (once); returns the saga request ingesting it."""
        from app.lakehouse.generator import generate_clickstream

        directory = self.source_root / DATASET / day.isoformat()
        if not any(directory.glob("*.ndjson")):
            generate_clickstream(directory, records=self.records, files=self.files,
                                 partition_date=day)
        return {"dataset": DATASET, "partition_date": day.isoformat(),
                "source": {"path": f"{DATASET}/{day.isoformat()}/*.ndjson", "format": "json"}}

    def submit(self, day: date, idempotency_key: str | None = None) -> str:
        saga, created = self.service.submit(self.generate(day), idempotency_key)
        assert created or idempotency_key, saga
        return str(saga["id"])

    def saga(self, saga_id: str) -> dict[str, Any]:
        return self.service.saga(saga_id)

    def events(self, saga_id: str) -> list[dict[str, Any]]:
        return list(self.service.events(saga_id, 0, 10_000)["items"])

    def describe(self, saga_id: str) -> str:
        """The saga's status, steps and full event history, for failure messages."""
        saga = self.saga(saga_id)
        lines = [f"saga {saga_id} {saga['partition_date']}: {saga['status']} "
                 f"attempts={saga['attempts']} error={saga.get('error')!r}"]
        lines += [f"  step {s['name']}: {s['status']} (attempt {s.get('attempt')}; "
                  f"compensation {(s.get('compensation') or {}).get('status')})"
                  for s in saga["steps"]]
        lines += [f"  #{e['seq']} e{e['epoch']} {e['kind']} {e.get('step') or ''} "
                  f"{e.get('payload')}" for e in self.events(saga_id)]
        return "\n".join(lines)

    def outbox(self, saga_id: str | None = None) -> list[dict[str, Any]]:
        from app.db.models import OutboxRow

        with self.service.db.sessions() as s:
            query = select(OutboxRow.saga_id, OutboxRow.idempotency_key, OutboxRow.status,
                           OutboxRow.attempts)
            if saga_id is not None:
                query = query.where(OutboxRow.saga_id == saga_id)
            return [dict(r._mapping) for r in s.execute(query)]

    def statuses(self, saga_ids: list[str] | None = None) -> dict[str, str]:
        from app.db.models import SagaRow

        with self.service.db.sessions() as s:
            query = select(SagaRow.id, SagaRow.status)
            if saga_ids is not None:
                query = query.where(SagaRow.id.in_(saga_ids))
            return {str(i): str(st) for i, st in s.execute(query)}

    def quiescent(self, saga_ids: list[str] | None = None) -> tuple[bool, str]:
        statuses = self.statuses(saga_ids)
        busy = {i: st for i, st in statuses.items() if st not in TERMINAL}
        rows = [r for r in self.outbox()
                if saga_ids is None or r["saga_id"] in saga_ids]
        pending = [r for r in rows if r["status"] not in ("delivered", "dead")]
        return (not busy and not pending,
                f"{len(busy)} saga(s) not terminal {dict(list(busy.items())[:6])}; "
                f"{len(pending)} outbox row(s) pending")

    def wait_quiescent(self, timeout_s: float, saga_ids: list[str] | None = None,
                       workers: list[Worker] | None = None) -> float:
        """Wait until every saga (of ``saga_ids``) is terminal and its outbox rows delivered or
        dead; returns the seconds waited. Fails early if all ``workers`` have exited."""
        start = time.monotonic()
        deadline = start + timeout_s
        state = ""
        while time.monotonic() < deadline:
            done, state = self.quiescent(saga_ids)
            if done:
                return time.monotonic() - start
            if workers and not any(w.alive() for w in workers):
                raise NotQuiescent(f"every worker exited before quiescence: {state}\n"
                                   + "\n".join(w.tail() for w in workers))
            time.sleep(0.1)
        raise NotQuiescent(f"not quiescent after {timeout_s} s: {state}\n{self.tails()}")

    # -- invariants --------------------------------------------------------------------------

    def check(self, *, allow_failed: bool = False, cleanup: bool = True) -> Any:
        """Run the invariant checker in this process; the lake is attached only meanwhile."""
        with _CHECK_LOCK:
            return self._check(allow_failed, cleanup)

    def _check(self, allow_failed: bool, cleanup: bool) -> Any:
        from app.invariants import InvariantChecker
        from app.lakehouse.duck import Lake

        lake = Lake(self.settings())
        try:
            return InvariantChecker(self.service.db, lake, self.service.datasets,
                                    self.source_root).check(allow_failed=allow_failed,
                                                            cleanup=cleanup)
        finally:
            lake.close()

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")

    # -- teardown ----------------------------------------------------------------------------

    def kill_all(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.kill()

    def close(self) -> None:
        self.kill_all()
        if self.receiver is not None:
            self.receiver.close()
        with contextlib.suppress(Exception):
            self.service.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# -- the crash matrix, shared by tests/acceptance/test_crash_matrix.py and scripts/chaos.py ------

#: update_catalog fails after writing, so every compensation has something to undo.
TURN_BACK = "update_catalog.before_record=raise"


def crash_plan(group: str, point: str) -> tuple[str, str, str]:
    """(faults of the worker that dies, faults of the recovering worker, expected status).

    Compensation points: the recovering worker keeps the ``raise``: if the kill came before the
    saga turned back (``saga.compensating`` fires after its commit, but a kill in between
    re-runs ``update_catalog``), a re-run must fail again rather than go forward. A saga already
    compensating never re-runs the forward path, so the extra fault is harmless there.
    Forward and delivery points: the recovering worker has no fault and the saga must succeed.
    """
    if group == "compensation":
        return f"{TURN_BACK},{point}=kill", TURN_BACK, "compensated"
    return f"{point}=kill", "", "succeeded"


class CaseFailure(AssertionError):
    """The case could not run as planned (point never reached, no quiescence, ...)."""


@dataclass
class CaseResult:
    point: str
    saga_id: str
    status: str
    expected: str
    new_violations: list[str]
    problems: list[str]
    seconds: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.new_violations and not self.problems


#: Points reached once the saga is finished: the dying worker leaves nothing to recover. The
#: last step's success is recorded in the same write as the saga's (``StepLog.advance``).
FINISHED_POINTS = ("saga.succeeded", "saga.compensated",
                   f"{LakehouseIngestionSaga.steps[-1].name}.after_record")


def crash_case(cluster: Cluster, group: str, point: str, day: date, *,
               known: set[str] | None = None, reach_timeout_s: float = 60,
               quiesce_timeout_s: float = 90) -> CaseResult:
    """Submit a saga for ``day``; a worker with ``<point>=kill`` must die by SIGKILL; a clean
    worker recovers; then the invariant checker runs. ``known`` holds violations already seen
    (they are not blamed on this case; the new ones are added to it)."""
    started = time.monotonic()
    dying_faults, recovery_faults, expected = crash_plan(group, point)
    saga_id = cluster.submit(day)
    tag = point.replace(".", "_")
    dying = cluster.start_worker(f"{tag}-dies", dying_faults)
    code = dying.wait_exit(reach_timeout_s)
    if code is None:
        dying.kill()
        raise CaseFailure(f"fault point {point!r} was never reached: the worker with "
                          f"LAKESAGA_FAULTS={dying_faults!r} did not die in {reach_timeout_s} s\n"
                          f"{cluster.describe(saga_id)}\n{dying.tail()}")
    if code != -signal.SIGKILL:
        raise CaseFailure(f"expected death by SIGKILL at {point}, got returncode {code}\n"
                          f"{dying.tail()}")
    recovering = cluster.start_worker(f"{tag}-recovers", recovery_faults)
    try:
        cluster.wait_quiescent(quiesce_timeout_s, saga_ids=[saga_id], workers=[recovering])
    except AssertionError as exc:
        raise CaseFailure(f"{exc}\n{cluster.describe(saga_id)}\n{dying.tail()}") from None
    finally:
        recovering.stop()
    return finish_case(cluster, point, saga_id, expected, started, known,
                       logs=[dying, recovering],
                       require_reclaim=group != "delivery" and point not in FINISHED_POINTS)


def finish_case(cluster: Cluster, point: str, saga_id: str, expected: str, started: float,
                known: set[str] | None, logs: list[Worker], require_reclaim: bool = False,
                ) -> CaseResult:
    """Check invariants and the saga's outcome (and, if it succeeded, its delivery)."""
    report = cluster.check()
    seen = known if known is not None else set()
    new = [str(v) for v in report.violations if str(v) not in seen]
    seen.update(str(v) for v in report.violations)
    saga = cluster.saga(saga_id)
    problems: list[str] = []
    if saga["status"] != expected:
        problems.append(f"saga ended {saga['status']}, expected {expected}")
    if require_reclaim and saga["attempts"] < 2:
        problems.append(f"attempts {saga['attempts']}: the recovering worker never claimed it")
    rows = cluster.outbox(saga_id)
    if saga["status"] == "succeeded" and cluster.receiver is not None:
        got = cluster.receiver.counts()
        if len(rows) != 1:
            problems.append(f"expected one outbox row, found {rows}")
        for row in rows:
            if row["status"] != "delivered":
                problems.append(f"outbox row {row['idempotency_key']} is {row['status']}")
            if got[row["idempotency_key"]] < 1:
                problems.append(f"receiver never got webhook-id {row['idempotency_key']}")
    elif saga["status"] != "succeeded" and rows:
        problems.append(f"outbox rows for a saga that did not succeed: {rows}")
    detail = ""
    if new or problems:
        detail = (f"{cluster.describe(saga_id)}\n" + "\n".join(w.tail() for w in logs))
    return CaseResult(point, saga_id, saga["status"], expected, new, problems,
                      time.monotonic() - started, detail)
