"""Real-process fixtures for acceptance tests: ``lakesaga`` subprocesses with captured logs.

Every process started through ``launch`` is killed at teardown (SIGKILL), whatever the outcome of
the test; its stdout/stderr go to files under tmp_path whose tail is attached to assertion
messages with ``Server.tail()``.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lakesaga_procs import PARTITION, Server, api_token, clean_env, free_port, lakesaga_bin


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[[str, dict[str, str]], Server]]:
    """Start ``lakesaga serve`` subprocesses; all of them are killed at teardown."""
    servers: list[Server] = []
    handles: list[Any] = []

    def start(name: str, env: dict[str, str]) -> Server:
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        out, err = logs / f"{name}.stdout.log", logs / f"{name}.stderr.log"
        out_f, err_f = out.open("wb"), err.open("wb")
        handles.extend([out_f, err_f])
        token = api_token(env["LAKESAGA_DATABASE_URL"])  # migrates before the server does
        port = free_port()
        proc = subprocess.Popen(
            [lakesaga_bin(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=tmp_path, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL,
        )
        server = Server(name, proc, port, out, err, token)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(timeout=10)
    for handle in handles:
        handle.close()


@pytest.fixture(scope="session")
def clickstream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source root holding clickstream/2026-01-06 (20,000 records in 5 files), made by
    ``lakesaga generate``; shared read-only by every deployment of the session."""
    root = tmp_path_factory.mktemp("raw")
    out = root / "clickstream" / PARTITION
    result = subprocess.run(
        [lakesaga_bin(), "generate", "--out", str(out), "--records", "20000", "--files", "5"],
        env=clean_env(), cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"generate failed:\n{result.stdout}\n{result.stderr}"
    assert len(list(out.glob("*.ndjson"))) == 5, result.stdout
    return root
