"""``lakesaga serve --processes N``: several API processes share one port, each with its own
database pool and executor; every one of them answers and authenticates against the database (a
revoked key is refused by all of them), and their executors run sagas. The supervisor exits
non-zero when its processes cannot start, and they do not outlive it, even when it is SIGKILLed.

Each process is shown to serve on its own by SIGSTOPping the others: a connection waits in the
shared accept queue until a running process takes it. A server told to stop answers its long
polls at once instead of letting them hold the shutdown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.auth import create_key, revoke_key
from app.db.migrate import upgrade
from app.db.session import Database
from app.lakehouse.generator import generate_clickstream

pytestmark = pytest.mark.timeout(300)

PARTITION = "2026-01-06"
SAGA_REQUEST = {"dataset": "clickstream", "partition_date": PARTITION,
                "source": {"path": f"clickstream/{PARTITION}/*.ndjson", "format": "json"}}


def _lakesaga() -> str:
    return str(Path(sys.executable).parent / "lakesaga")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


@dataclass
class Served:
    """A ``lakesaga serve --processes N`` supervisor and what it was started with."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path
    env: dict[str, str]

    def api_processes(self) -> list[int]:
        """The supervisor's API processes (multiprocessing also starts a resource tracker)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        pids = [int(p) for p in children.split()]
        return [p for p in pids
                if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes() and _alive(p)]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start ``lakesaga serve`` with extra arguments; every process is gone at teardown."""
    started: list[Served] = []

    def start(env: dict[str, str], *args: str, wait: int = 2) -> Served:
        port = _free_port()
        log = tmp_path / f"serve-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([_lakesaga(), "serve", "--port", str(port), *args], env=env,
                                    cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        served = Served(proc, f"http://127.0.0.1:{port}", log, env)
        started.append(served)
        deadline = time.monotonic() + 90
        while log.read_text(errors="replace").count("Application startup complete") < wait:
            assert proc.poll() is None, f"lakesaga serve exited {proc.returncode}\n{served.tail()}"
            assert time.monotonic() < deadline, f"not started after 90 s\n{served.tail()}"
            time.sleep(0.1)
        return served

    yield start
    for served in started:
        stragglers = served.api_processes() if served.proc.poll() is None else []
        if served.proc.poll() is None:
            served.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                served.proc.wait(timeout=30)
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(timeout=10)


@pytest.fixture
def deployment(tmp_path: Path, database_url: str) -> tuple[dict[str, str], str]:
    """The environment of a deployment on a migrated database with a small source, and an
    admin token."""
    root = tmp_path / "raw"
    generate_clickstream(root / "clickstream" / PARTITION, records=500, files=2, seed=7)
    upgrade(database_url)
    db = Database(database_url)
    try:
        token = create_key(db, "processes-test", ["admin"])[0]
    finally:
        db.dispose()
    return _env(database_url, root, tmp_path / "lake"), token


def _env(database_url: str, root: Path, lake_dir: Path) -> dict[str, str]:
    """Our environment without LAKESAGA_* settings, plus those of a deployment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESAGA_")}
    env.update({"LAKESAGA_DATABASE_URL": database_url, "LAKESAGA_SOURCE_ROOT": str(root),
                "LAKESAGA_LAKE_DIR": str(lake_dir), "LAKESAGA_POLL_INTERVAL_S": "0.1",
                "LAKESAGA_LOG_LEVEL": "INFO"})
    return env


@contextlib.contextmanager
def only(served: Served, pid: int) -> Iterator[None]:
    """Stop every API process but ``pid`` while the block runs."""
    others = [p for p in served.api_processes() if p != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def _get(served: Served, path: str, token: str) -> httpx.Response:
    # A new connection each time: a keep-alive connection stays with the process it reached.
    return httpx.get(f"{served.base_url}{path}", headers={"Authorization": f"Bearer {token}"},
                     timeout=30)


def test_serve_processes__each_process_serves_and_authenticates(
        serve: Callable[..., Served], deployment: tuple[dict[str, str], str]) -> None:
    # No executors: a process stopped while its executor held SQLite's write lock would block
    # the other one.
    env, token = deployment
    served = serve(env, "--processes", "2", "--no-workers")
    pids = served.api_processes()
    assert len(pids) == 2, (pids, served.tail())
    db = Database(env["LAKESAGA_DATABASE_URL"])
    try:
        doomed, listing = create_key(db, "doomed", ["read"])
        for pid in pids:
            with only(served, pid):
                assert _get(served, "/healthz", token).status_code == 200
                assert _get(served, "/sagas/nope", doomed).status_code == 404
                resp = httpx.post(f"{served.base_url}/sagas", json=SAGA_REQUEST, timeout=30,
                                  headers={"Authorization": f"Bearer {token}",
                                           "Idempotency-Key": f"from-{pid}"})
                assert resp.status_code == 202, resp.text
                assert _get(served, f"/sagas/{resp.json()['id']}", token).json() == resp.json()
        assert revoke_key(db, listing["id"])
        for pid in pids:  # the next request in every process is refused
            with only(served, pid):
                assert _get(served, "/sagas/nope", doomed).status_code == 401
    finally:
        db.dispose()

    # Killed, the supervisor takes its processes with it (they get SIGTERM from the kernel).
    served.proc.kill()
    served.proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while alive := [pid for pid in pids if _alive(pid)]:
        assert time.monotonic() < deadline, f"still running after the supervisor died: {alive}"
        time.sleep(0.1)


def test_serve_processes__run_sagas_and_stop_on_sigterm(
        serve: Callable[..., Served], deployment: tuple[dict[str, str], str]) -> None:
    env, token = deployment
    served = serve(env, "--processes", "2")
    pids = served.api_processes()
    assert len(pids) == 2, (pids, served.tail())
    headers = {"Authorization": f"Bearer {token}"}
    saga_ids = []
    for n in range(2):
        resp = httpx.post(f"{served.base_url}/sagas", json=SAGA_REQUEST, timeout=30,
                          headers={**headers, "Idempotency-Key": f"saga-{n}"})
        assert resp.status_code == 202, resp.text
        saga_ids.append(resp.json()["id"])
    deadline = time.monotonic() + 180
    for saga_id in saga_ids:  # one partition: the sagas run one after the other
        while (saga := _get(served, f"/sagas/{saga_id}", token).json())["status"] != "succeeded":
            assert saga["status"] in ("pending", "running"), saga
            assert time.monotonic() < deadline, (saga, served.tail())
            time.sleep(0.2)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0, served.tail()
    assert not [pid for pid in pids if _alive(pid)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_serve_processes__exits_non_zero_when_they_cannot_start(
        tmp_path: Path, deployment: tuple[dict[str, str], str]) -> None:
    env, _ = deployment
    (tmp_path / "not-a-directory").write_text("")
    env = {**env, "LAKESAGA_LAKE_DIR": str(tmp_path / "not-a-directory" / "lake")}
    result = subprocess.run([_lakesaga(), "serve", "--port", str(_free_port()), "--processes",
                             "2"], env=env, cwd=tmp_path, capture_output=True, timeout=120)
    assert result.returncode != 0, result.stderr.decode()[-3000:]
    assert b"Application startup failed" in result.stderr, result.stderr.decode()[-3000:]


def test_serve__without_keys_warns_and_refuses(
        serve: Callable[..., Served], tmp_path: Path, database_url: str) -> None:
    """A server started before any key exists says so in its log, and stays closed (401)."""
    upgrade(database_url)
    env = _env(database_url, tmp_path, tmp_path / "lake")
    warning = "no API keys exist yet"
    served = serve(env, "--no-workers", wait=1)
    assert warning in served.tail(), served.tail()
    assert httpx.get(f"{served.base_url}/sagas", timeout=30).status_code == 401
    assert httpx.get(f"{served.base_url}/healthz", timeout=30).status_code == 200

    db = Database(database_url)
    try:
        token = create_key(db, "first", ["read"])[0]
    finally:
        db.dispose()
    keyed = serve(env, "--no-workers", wait=1)
    assert _get(keyed, "/sagas", token).status_code == 200
    assert warning not in keyed.tail(), keyed.tail()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_serve__sigterm_ends_a_long_poll_at_once(
        serve: Callable[..., Served], deployment: tuple[dict[str, str], str],
        processes: str) -> None:
    """uvicorn lets open requests finish before it exits: a ``GET ?wait=60`` on a saga that
    cannot change (no executor) is answered at once when the server is told to stop."""
    env, token = deployment
    served = serve(env, "--processes", processes, "--no-workers", wait=int(processes))
    headers = {"Authorization": f"Bearer {token}"}
    saga = httpx.post(f"{served.base_url}/sagas", json=SAGA_REQUEST, headers=headers,
                      timeout=30).json()
    answers: list[httpx.Response | BaseException] = []

    def long_poll() -> None:
        try:  # far below the wait: only an answer at the SIGTERM makes it in time
            answers.append(httpx.get(f"{served.base_url}/sagas/{saga['id']}?wait=60",
                                     headers=headers, timeout=20))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            answers.append(exc)

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(1.0)
    assert not answers, answers  # still waiting: the saga is pending
    served.proc.send_signal(signal.SIGTERM)
    poller.join(timeout=30)
    # One process: uvicorn re-raises the SIGTERM once it has shut down; a supervisor exits 0.
    assert served.proc.wait(timeout=30) in (0, -signal.SIGTERM), served.tail()
    assert len(answers) == 1 and isinstance(answers[0], httpx.Response), answers
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json() == saga
