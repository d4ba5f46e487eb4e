"""Helpers for the concurrency acceptance tests: ``lakesaga worker`` subprocesses (which can be
paused and resumed), an in-process deployment (saga database + lake + source root), the
``claim_next`` race driver run in spawned processes, and a webhook receiver thread."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cluster import stop_process
from lakesaga_procs import TERMINAL, clean_env, lakesaga_bin, tail_of

BASE_DAY = date(2026, 1, 6)


def saga_request(day: date) -> dict[str, Any]:
    return {
        "dataset": "clickstream",
        "partition_date": day.isoformat(),
        "source": {"path": f"clickstream/{day.isoformat()}/*.ndjson", "format": "json"},
    }


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
              detail: Callable[[], str] = lambda: "", interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{detail()}")
        time.sleep(interval_s)


# --------------------------------------------------------------------------- worker processes

def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (``T`` = stopped), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
    return stat[stat.rindex(")") + 2]


@dataclass
class Worker:
    """A ``lakesaga worker`` subprocess with its output in files."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        parts = []
        for path in (self.stdout, self.stderr):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def tail(self, lines: int = 40) -> str:
        return (f"[{self.name}: pid {self.pid}, state {process_state(self.pid)}, "
                f"returncode {self.proc.poll()}]\n"
                f"{tail_of(self.stdout, lines)}\n{tail_of(self.stderr, lines)}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stopped(self) -> bool:
        return process_state(self.pid) == "T"

    def wait_stopped(self, timeout_s: float) -> None:
        def check() -> bool:
            if not self.alive():
                pytest.fail(f"{self.name} exited instead of stopping\n{self.tail()}")
            return self.stopped()

        wait_for(check, timeout_s, f"{self.name} to SIGSTOP itself", self.tail)

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def wait_log(self, text: str, timeout_s: float) -> None:
        wait_for(lambda: text in self.log_text(), timeout_s, f"{text!r} in {self.name}'s log",
                 self.tail)

    def stop(self, timeout_s: float = 30) -> int:
        return stop_process(self.proc, timeout_s, resume=True)


#: ``lakesaga worker`` with one change to the fault mechanism: ``stop`` stops the *calling
#: thread* synchronously. app/faults.py sends SIGSTOP with ``os.kill(os.getpid(), ...)``, a
#: process-directed signal: the kernel hands it to the main thread (idle in ``stop.wait()``),
#: which only then stops the group, so the executor thread that reached the fault point runs on
#: for a moment, long enough to send its COMMIT (observed: the fault trace of a worker paused at
#: ``update_catalog.before_commit`` ends at ``update_catalog.after_commit``). A thread-directed
#: SIGSTOP (``pthread_kill`` to the caller) is handled before ``pthread_kill`` returns.



class WorkerPool:
    """Starts ``lakesaga worker`` processes; ``close`` SIGKILLs whatever is still running."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.workers: list[Worker] = []
        self._handles: list[Any] = []

    def start(self, name: str, env: dict[str, str]) -> Worker:
        """Start ``lakesaga worker``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        out, err = self.logs / f"{name}.stdout.log", self.logs / f"{name}.stderr.log"
        out_f, err_f = out.open("wb"), err.open("wb")
        self._handles += [out_f, err_f]
        command = [lakesaga_bin(), "worker"]
        proc = subprocess.Popen(command, env=env, cwd=self.logs,
                                stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL)
        worker = Worker(name, proc, out, err)
        self.workers.append(worker)
        return worker

    def tails(self) -> str:
        return "\n".join(w.tail() for w in self.workers)

    def close(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()  # SIGKILL works on a stopped process too
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(timeout=10)
        for handle in self._handles:
            handle.close()


# --------------------------------------------------------------------------- deployments

@dataclass
class Site:
    """A saga database (PostgreSQL), a lake directory and a source root, plus a ``Service`` in
    the test process for submitting sagas and reading the log (it never runs workers)."""

    database_url: str
    home: Path
    service: Any = None

    @property
    def source_root(self) -> Path:
        return self.home / "raw"

    @property
    def lake_dir(self) -> Path:
        return self.home / "lake"

    def settings(self) -> Any:
        from app.settings import Settings

        return Settings(database_url=self.database_url, source_root=self.source_root,
                        lake_dir=self.lake_dir, faults="", webhook_allow_hosts=["127.0.0.1"])

    def open(self) -> Site:
        from app.service import Service

        self.source_root.mkdir(parents=True, exist_ok=True)
        self.service = Service(self.settings())  # runs the migrations once, before any worker
        return self

    def close(self) -> None:
        if self.service is not None:
            self.service.close()

    def generate(self, day: date, records: int, files: int) -> None:
        from app.lakehouse.generator import generate_clickstream

        generate_clickstream(self.source_root / "clickstream" / day.isoformat(), records=records,
                             files=files, partition_date=day)

    def submit(self, day: date) -> str:
        saga, created = self.service.submit(saga_request(day), None)
        assert created
        return str(saga["id"])

    def worker_env(self, **extra: str) -> dict[str, str]:
        """The environment of a worker: only this site's LAKESAGA_* settings plus ``extra``."""
        self.lake_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "LAKESAGA_DATABASE_URL": self.database_url,
            "LAKESAGA_SOURCE_ROOT": str(self.source_root),
            "LAKESAGA_LAKE_DIR": str(self.lake_dir),
            "LAKESAGA_POLL_INTERVAL_S": "0.05",
            "LAKESAGA_STEP_BACKOFF_S": "0.01",
            "LAKESAGA_LOG_LEVEL": "INFO",
        }
        env.update(extra)
        return clean_env(**env)

    # -- reading the log (the test process's own connections)

    def saga(self, saga_id: str) -> Any:
        row = self.service.log.get(saga_id)
        assert row is not None, saga_id
        return row

    def events(self, saga_id: str) -> list[Any]:
        return list(self.service.log.events(saga_id))

    def steps(self, saga_id: str) -> dict[str, Any]:
        return {row.step: row for row in self.service.log.steps(saga_id)}

    def wait_terminal(self, saga_id: str, timeout_s: float, detail: Callable[[], str]) -> Any:
        def done() -> Any:
            row = self.saga(saga_id)
            return row if row.status in TERMINAL else None

        return wait_for(done, timeout_s, f"saga {saga_id} to finish",
                        lambda: f"saga: {self.describe(saga_id)}\n{detail()}", interval_s=0.1)

    def describe(self, saga_id: str) -> str:
        row = self.saga(saga_id)
        steps = [(s.step, s.status, s.attempt) for s in self.steps(saga_id).values()]
        return (f"{row.status} epoch={row.epoch} attempts={row.attempts} owner={row.lease_owner} "
                f"error={row.error!r} steps={steps}")

    @contextlib.contextmanager
    def lake(self) -> Iterator[Any]:
        """A lake connection in the test process (PostgreSQL catalog: workers may be running)."""
        from app.lakehouse.duck import Lake

        lake = Lake(self.settings())
        try:
            yield lake
        finally:
            lake.close()

    def create_lake_tables(self) -> None:
        """Create the lake's tables from the test process, as one worker's start would."""
        from app.lakehouse.tables import ensure_tables

        with self.lake() as lake:
            for spec in self.service.datasets.values():
                ensure_tables(lake.cursor(), spec)

    def check_invariants(self) -> Any:
        from app.invariants import InvariantChecker

        with self.lake() as lake:
            return InvariantChecker(self.service.db, lake, self.service.datasets,
                                    self.source_root).check()


def lake_counts(lake: Any, saga_id: str, day: date) -> dict[str, int]:
    """Rows of ``saga_id``'s bronze batch, and the partition's silver and gold rows."""
    from app.lakehouse.pipeline import load_datasets
    from app.lakehouse.tables import bronze_table, gold_table, silver_table

    spec = load_datasets(None)["clickstream"]
    cur = lake.cursor()

    def count(sql: str, params: list[Any]) -> int:
        row = cur.execute(sql, params).fetchone()
        return int(row[0]) if row else 0

    return {
        "bronze": count(f"SELECT count(*) FROM {bronze_table(spec)} WHERE _batch_id = ?",
                        [saga_id]),
        "bronze_partition": count(f"SELECT count(*) FROM {bronze_table(spec)} "
                                  "WHERE partition_date = ?", [day]),
        "silver": count(f"SELECT count(*) FROM {silver_table(spec)} WHERE partition_date = ?",
                        [day]),
        "gold": count(f"SELECT count(*) FROM {gold_table(spec)} WHERE partition_date = ?", [day]),
    }


# --------------------------------------------------------------------------- claim race

def new_pending_saga(step_log: Any, day: date) -> str:
    """A pending ``lakehouse_ingestion`` saga straight through the log (no source needed)."""
    from app.lakehouse.ingestion import LakehouseIngestionSaga
    from app.saga.step_log import NewSaga

    saga_id = str(uuid.uuid4())
    step_log.create_saga(NewSaga(
        id=saga_id, definition="lakehouse_ingestion", dataset="clickstream", partition_date=day,
        request=saga_request(day), manifest={"files": [], "total_bytes": 0, "format": "json"},
        request_fingerprint=uuid.uuid4().hex, idempotency_key=None,
        steps=LakehouseIngestionSaga.step_names(),
    ))
    return saga_id


def race_claimer(url: str, owner: str, rounds: int, barrier: Any, results: Any) -> None:
    """Body of one racing process: its own engine; each round, wait at the barrier and then
    ``claim_next`` once; report (owner, round, claimed saga id or None, epoch or None)."""
    from app.db.session import Database
    from app.saga.step_log import StepLog

    db = Database(url)
    step_log = StepLog(db)
    try:
        step_log.claim_next(owner, 300)  # warm the pool: nothing is pending yet
        barrier.wait(timeout=60)
        for round_no in range(rounds):
            barrier.wait(timeout=60)
            try:
                claim = step_log.claim_next(owner, 300)
            except Exception as exc:  # reported, so the test fails with the reason
                results.put((owner, round_no, "error", f"{type(exc).__name__}: {exc}"))
                continue
            results.put((owner, round_no, claim.saga_id if claim else None,
                         claim.epoch if claim else None))
    finally:
        db.dispose()


def day_of_round(round_no: int) -> date:
    """A distinct partition per round, so that no earlier saga blocks the round's saga."""
    return BASE_DAY + timedelta(days=round_no)


# --------------------------------------------------------------------------- webhooks

class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every POST and answers 204."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append({"headers": dict(self.headers.items()),
                                              "body": json.loads(body or b"{}")})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.received)
