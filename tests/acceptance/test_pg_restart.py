"""PostgreSQL restarts under load: the real cluster is stopped (``-m immediate``, like a crash)
and started again three times while a ``lakesaga serve`` process runs ~10 sagas. During each
outage the API answers 503 problem+json (or 200 where no database is needed), never a 500 or a
stack trace; afterwards every saga finishes, the process is still alive, and the invariants hold.

Needs ``pg_ctlcluster`` (Debian/Ubuntu postgresql-common), root, and the cluster behind
LAKESAGA_TEST_PG: ``main`` by default, or LAKESAGA_TEST_PG_CLUSTER (e.g. a throwaway cluster made
with ``pg_createcluster 15 lsrestart -p 5434 -- -A trust``, with
``LAKESAGA_TEST_PG=postgresql://postgres@127.0.0.1:5434``, so that restarting it does not break
other test runs sharing ``main``). Skipped otherwise, unless CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from lakesaga_procs import TERMINAL, Deployment, Server
from procs_failures import PROBLEM, check_invariants, generate_partitions, saga_body, show
from sqlalchemy.engine import make_url

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(600)]

Launch = Callable[[str, dict[str, str]], Server]
IN_CI = os.environ.get("CI", "").lower() == "true"
PG_BASE = os.environ.get("LAKESAGA_TEST_PG", "postgresql://postgres@127.0.0.1:5432")  # as conftest
OUTAGES = 3
OUTAGE_S = 2.0
DAYS = [f"2026-04-{d:02d}" for d in range(1, 11)]
BATCHES = [DAYS[:4], DAYS[4:6], DAYS[6:8], DAYS[8:]]  # before the 1st outage, after each one


@dataclass
class Cluster:
    version: str
    name: str
    port: int
    log: list[str] = field(default_factory=list)

    def ctl(self, action: str, *extra: str) -> None:
        cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action,
               *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        self.log.append(f"{' '.join(cmd)} -> {result.returncode} {result.stderr.strip()}")
        assert result.returncode == 0, self.log[-1]

    def ready(self) -> bool:
        return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                              timeout=30).returncode == 0

    def stop_immediate(self) -> None:
        self.ctl("stop", "-m", "immediate")
        assert not self.ready()

    def start(self, timeout_s: float = 60) -> None:
        if not self.ready():
            self.ctl("start")
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            assert time.monotonic() < deadline, f"PostgreSQL not ready after start: {self.log}"
            time.sleep(0.1)


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but the PostgreSQL restart test cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """The local PostgreSQL cluster; always running again when the test ends, pass or fail."""
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_isready") is None:
        _unavailable("pg_ctlcluster/pg_isready not installed (postgresql-common)")
    versions = sorted(os.listdir("/etc/postgresql")) if Path("/etc/postgresql").is_dir() else []
    if len(versions) != 1:
        _unavailable(f"expected one cluster version under /etc/postgresql, found {versions}")
    if os.geteuid() != 0:
        _unavailable("restarting the cluster with pg_ctlcluster needs root")
    name = os.environ.get("LAKESAGA_TEST_PG_CLUSTER", "main")
    port = make_url(PG_BASE).port or 5432
    config = Path("/etc/postgresql") / versions[0] / name / "postgresql.conf"
    if not config.is_file() or not re.search(rf"^\s*port\s*=\s*{port}\b", config.read_text(),
                                             re.MULTILINE):
        _unavailable(f"cluster {versions[0]}/{name} is not the one on port {port} "
                     "(LAKESAGA_TEST_PG)")
    handle = Cluster(versions[0], name, port)
    if not handle.ready():
        _unavailable("the local PostgreSQL cluster is not running")
    try:
        yield handle
    finally:
        handle.start()


@dataclass
class Probe:
    """Every API response seen while PostgreSQL was down."""

    responses: list[tuple[str, int, str]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)

    def check(self, what: str, resp: httpx.Response) -> None:
        kind = resp.headers.get("content-type", "")
        self.responses.append((what, resp.status_code, kind))
        if "Traceback" in resp.text:
            self.bad.append(f"{what}: stack trace in body: {resp.text[:300]}")
        if resp.status_code == 200:
            return
        if resp.status_code != 503:
            self.bad.append(f"{what}: {resp.status_code} {resp.text[:300]}")
        elif not kind.startswith(PROBLEM) or resp.json().get("status") != 503:
            self.bad.append(f"{what}: 503 without problem+json: {kind} {resp.text[:300]}")


def _poll_during_outage(api: httpx.Client, saga_ids: list[str], probe: Probe,
                        seconds: float, round_no: int) -> None:
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        requests: list[tuple[str, str, str, dict[str, Any]]] = [
            ("GET /sagas", "GET", "/sagas", {"params": {"limit": 50}}),
            ("GET /sagas/{id}", "GET", f"/sagas/{saga_ids[i % len(saga_ids)]}", {}),
            ("GET /sagas/{id}/events", "GET", f"/sagas/{saga_ids[0]}/events", {}),
            ("GET /readyz", "GET", "/readyz", {}),
            ("GET /healthz", "GET", "/healthz", {}),
            ("GET /datasets/…/partitions", "GET", f"/datasets/clickstream/partitions/{DAYS[0]}",
             {}),
            ("POST /sagas", "POST", "/sagas", {
                "json": saga_body(DAYS[0]), "headers": {"Idempotency-Key": f"outage-{round_no}"}}),
        ]
        for what, method, url, kwargs in requests:
            try:
                probe.check(what, api.request(method, url, **kwargs))
            except httpx.HTTPError as exc:
                probe.bad.append(f"{what}: no HTTP response: {type(exc).__name__}: {exc}")
        i += 1
        time.sleep(0.1)


def _submit_retrying(api: httpx.Client, server: Server, day: str,
                     timeout_s: float = 20) -> tuple[str, int]:
    """POST a saga, retrying 503s (stale pooled connections right after a restart).
    Returns (saga id, number of 503s seen)."""
    deadline = time.monotonic() + timeout_s
    unavailable = 0
    while True:
        try:
            resp = api.post("/sagas", json=saga_body(day),
                            headers={"Idempotency-Key": f"load-{day}"})
        except httpx.TransportError as exc:
            server.proc.poll()
            pytest.fail(f"POST /sagas for {day}: no HTTP response ({exc})\n{server.tail()}")
        if resp.status_code == 202:
            return str(resp.json()["id"]), unavailable
        assert resp.status_code == 503 and time.monotonic() < deadline, (
            f"POST /sagas for {day}: {resp.status_code} {resp.text}")
        unavailable += 1
        time.sleep(0.2)


def _errors_in_log(server: Server, limit: int = 15) -> str:
    lines = [line for path in (server.stdout, server.stderr)
             for line in path.read_text(errors="replace").splitlines()
             if any(w in line for w in ("Error", "error", "WARNING", "Exception"))]
    unique = list(dict.fromkeys(line.split(" ", 3)[-1][:400] for line in lines))
    return "\n".join(unique[-limit:])


def test_pg_restart__sagas_finish_and_api_degrades_to_503(
        cluster: Cluster, pg_database_factory: Callable[[], str], tmp_path: Path,
        launch: Launch) -> None:
    root = tmp_path / "raw"
    generate_partitions(root, DAYS, records=2000, files=2)
    deployment = Deployment(pg_database_factory(), root, tmp_path / "home")
    server = launch("server", {**deployment.env(faults="process_to_silver=sleep:500"),
                               "LAKESAGA_STEP_BACKOFF_S": "0.1"})
    server.wait_healthy()
    probe = Probe()
    saga_ids: list[str] = []
    stale_503s = 0
    states_at_outage: list[dict[str, int]] = []

    with server.client() as api:
        for day in BATCHES[0]:
            saga_ids.append(_submit_retrying(api, server, day)[0])
        for round_no in range(1, OUTAGES + 1):
            time.sleep(1.0)  # let the sagas get into their steps
            states = [api.get(f"/sagas/{sid}").json()["status"] for sid in saga_ids]
            states_at_outage.append({s: states.count(s) for s in set(states)})
            cluster.stop_immediate()
            try:
                _poll_during_outage(api, saga_ids, probe, OUTAGE_S, round_no)
                assert server.proc.poll() is None, f"server died during outage\n{server.tail()}"
            finally:
                cluster.start()
            for day in BATCHES[round_no]:
                saga_id, unavailable = _submit_retrying(api, server, day)
                saga_ids.append(saga_id)
                stale_503s += unavailable

        deadline = time.monotonic() + 240
        finals: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline and len(finals) < len(saga_ids):
            assert server.proc.poll() is None, f"server died after the restarts\n{server.tail()}"
            for saga_id in saga_ids:
                if saga_id in finals:
                    continue
                resp = api.get(f"/sagas/{saga_id}")
                if resp.status_code == 200 and resp.json()["status"] in TERMINAL:
                    finals[saga_id] = resp.json()
            time.sleep(0.25)
        listed = api.get("/sagas", params={"limit": 200})
        assert listed.status_code == 200, listed.text
        total_sagas = len(listed.json()["items"])

    summary = (f"outage responses: {len(probe.responses)} "
               f"({sorted({(w, s) for w, s, _ in probe.responses})}); "
               f"503s right after restarts: {stale_503s}; sagas per status at each outage: "
               f"{states_at_outage}; final: "
               f"{ {s: sum(f['status'] == s for f in finals.values()) for s in TERMINAL} }; "
               f"attempts: {sorted(f['attempts'] for f in finals.values())}")
    print(summary)
    assert not probe.bad, "\n".join(probe.bad[:20]) + f"\n{summary}\n{server.tail()}"
    assert probe.responses and any(s == 503 for _, s, _ in probe.responses), summary
    unfinished = [sid for sid in saga_ids if sid not in finals]
    assert not unfinished, (f"{len(unfinished)} of {len(saga_ids)} sagas not terminal after the "
                            f"restarts\n{summary}\nserver log errors:\n{_errors_in_log(server)}")
    assert total_sagas == len(saga_ids), "a POST during an outage created a saga"
    for saga in finals.values():
        if saga["status"] == "compensated":
            assert any(m in (saga["error"] or "") for m in (
                "OperationalError", "connection", "server closed", "terminating")), (
                f"compensated without a database-outage reason: {saga['error']}\n{summary}")
        else:
            assert saga["status"] == "succeeded", f"{saga}\n{summary}\n{_errors_in_log(server)}"
    assert server.proc.poll() is None, f"server died\n{server.tail()}"

    server.stop()
    report = check_invariants(deployment)
    assert report.ok, f"{show(report)}\n{summary}"
