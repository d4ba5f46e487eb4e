"""Helpers for the acceptance tests: ``lakesaga`` subprocesses, deployments, log tails."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import lakesaga_bin, stop_process

__all__ = ["lakesaga_bin"]  # re-exported for the test modules

PARTITION = "2026-01-06"
SAGA_REQUEST = {
    "dataset": "clickstream",
    "partition_date": PARTITION,
    "source": {"path": f"clickstream/{PARTITION}/*.ndjson", "format": "json"},
}
TERMINAL = ("succeeded", "compensated", "failed")


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without any LAKESAGA_* setting, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESAGA_")}
    # PYTHONFAULTHANDLER: a crash in native code (DuckDB, libpq) prints every thread's stack.
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1",
                "PYTHONFAULTHANDLER": "1"})
    env.update(overrides)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail_of(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path.name}: missing>"
    kept = [line for line in text.splitlines() if '"GET /' not in line]  # drop poll access logs
    return f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(kept[-lines:])


@dataclass
class Deployment:
    """One isolated lakesaga installation: a saga database, a lake directory, a source root."""

    database_url: str
    source_root: Path
    home: Path

    @property
    def lake_dir(self) -> Path:
        return self.home / "lake"

    def env(self, faults: str = "") -> dict[str, str]:
        self.home.mkdir(parents=True, exist_ok=True)
        return clean_env(
            LAKESAGA_DATABASE_URL=self.database_url,
            LAKESAGA_SOURCE_ROOT=str(self.source_root),
            LAKESAGA_LAKE_DIR=str(self.lake_dir),
            LAKESAGA_LEASE_TTL_S="2",
            LAKESAGA_POLL_INTERVAL_S="0.1",
            LAKESAGA_FAULTS=faults,
            LAKESAGA_LOG_LEVEL="INFO",
        )

    def settings(self) -> Any:
        from app.settings import Settings

        return Settings(database_url=self.database_url, source_root=self.source_root,
                        lake_dir=self.lake_dir, faults="")


@functools.cache
def api_token(database_url: str) -> str:
    """An admin API key in the deployment's saga database (migrated first), made once."""
    from app.auth import create_key
    from app.db.migrate import upgrade
    from app.db.session import Database

    upgrade(database_url)
    db = Database(database_url)
    try:
        return create_key(db, "acceptance-tests", ["admin"])[0]
    finally:
        db.dispose()


@dataclass
class Server:
    """A ``lakesaga serve`` subprocess; ``client()`` sends an admin key of its database."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path
    token: str
    started_at: float = field(default_factory=time.monotonic)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return (f"[{self.name}: pid {self.proc.pid}, returncode {self.proc.returncode}]\n"
                f"{tail_of(self.stdout)}\n{tail_of(self.stderr)}")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=15,
                            headers={"Authorization": f"Bearer {self.token}"})

    def wait_healthy(self, timeout_s: float = 30) -> float:
        """Wait for GET /healthz; returns seconds since launch."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited before becoming healthy\n{self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - self.started_at
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        pytest.fail(f"{self.name} not healthy after {timeout_s} s\n{self.tail()}")

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout_s} s\n{self.tail()}")

    def wait_terminal(self, saga_id: str, timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        saga: dict[str, Any] = {}
        with self.client() as api:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"{self.name} died while saga {saga_id} was "
                                f"{saga.get('status')}\n{self.tail()}")
                resp = api.get(f"/sagas/{saga_id}")
                assert resp.status_code == 200, f"{resp.status_code} {resp.text}\n{self.tail()}"
                saga = resp.json()
                if saga["status"] in TERMINAL:
                    return saga
                time.sleep(0.1)
        pytest.fail(f"saga {saga_id} not terminal after {timeout_s} s: {saga.get('status')} "
                    f"(steps: {[(s['name'], s['status']) for s in saga.get('steps', [])]})\n"
                    f"{self.tail()}")

    def stop(self, timeout_s: float = 20) -> None:
        stop_process(self.proc, timeout_s)
