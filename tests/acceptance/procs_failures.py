"""Helpers for the failure and PostgreSQL-restart acceptance tests: small multi-partition source
data, HTTP assertions, and reading the lake / running the invariant checker from the test
process (DuckLake on a PostgreSQL catalog allows several processes at once)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from lakesaga_procs import TERMINAL, Deployment, Server

PROBLEM = "application/problem+json"
LAYERS = ("bronze", "silver", "gold")


def generate_partitions(root: Path, days: list[str], *, records: int = 2000,
                        files: int = 2) -> None:
    """Generate ``clickstream/<day>/*.ndjson`` under ``root`` for every day (distinct seeds)."""
    from app.lakehouse.generator import generate_clickstream

    for i, day in enumerate(days):
        generate_clickstream(root / "clickstream" / day, records=records, files=files,
                             seed=100 + i, partition_date=date.fromisoformat(day))


def saga_body(day: str) -> dict[str, Any]:
    return {"dataset": "clickstream", "partition_date": day,
            "source": {"path": f"clickstream/{day}/*.ndjson", "format": "json"}}


def submit(server: Server, day: str) -> str:
    with server.client() as api:
        resp = api.post("/sagas", json=saga_body(day))
    assert resp.status_code == 202, f"POST /sagas → {resp.status_code} {resp.text}\n{server.tail()}"
    return str(resp.json()["id"])


def get_saga(server: Server, saga_id: str) -> dict[str, Any]:
    with server.client() as api:
        resp = api.get(f"/sagas/{saga_id}")
    assert resp.status_code == 200, f"{resp.status_code} {resp.text}\n{server.tail()}"
    return dict(resp.json())


def events(server: Server, saga_id: str) -> list[dict[str, Any]]:
    with server.client() as api:
        resp = api.get(f"/sagas/{saga_id}/events", params={"limit": 1000})
    assert resp.status_code == 200, f"{resp.status_code} {resp.text}\n{server.tail()}"
    return list(resp.json()["items"])


def steps(saga: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in saga["steps"]}


def assert_problem(resp: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert resp.status_code == status, f"{resp.status_code} {resp.text}"
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
    assert "Traceback" not in resp.text, resp.text
    body = dict(resp.json())
    assert body["status"] == status, body
    assert body.get("title") and body.get("detail"), body
    for needle in needles:
        assert needle.lower() in str(body["detail"]).lower(), body
    return body


def wait_for(server: Server, saga_id: str, predicate: Callable[[dict[str, Any]], bool],
             timeout_s: float = 30, what: str = "condition") -> dict[str, Any]:
    """Poll GET /sagas/{id} until ``predicate(saga)``; fail with the server's log tail."""
    deadline = time.monotonic() + timeout_s
    saga: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"{server.name} died waiting for {what} of {saga_id}\n{server.tail()}")
        saga = get_saga(server, saga_id)
        if predicate(saga):
            return saga
        time.sleep(0.05)
    pytest.fail(f"saga {saga_id}: no {what} after {timeout_s} s: {saga.get('status')} "
                f"{[(s['name'], s['status']) for s in saga.get('steps', [])]}\n{server.tail()}")


def is_terminal(saga: dict[str, Any]) -> bool:
    return saga["status"] in TERMINAL


@contextmanager
def lake_of(deployment: Deployment) -> Iterator[Any]:
    """The deployment's lake attached in this process (closed on exit)."""
    from app.lakehouse.duck import Lake

    lake = Lake(deployment.settings())
    try:
        yield lake
    finally:
        lake.close()


def lake_counts(deployment: Deployment, day: str) -> dict[str, int]:
    """count(*) per layer for one partition, read straight from the lake."""
    from app.lakehouse.pipeline import load_datasets
    from app.lakehouse.tables import layer_table

    spec = load_datasets(None)["clickstream"]
    with lake_of(deployment) as lake:
        cur = lake.cursor()
        counts = {}
        for layer in LAYERS:
            row = cur.execute(f"SELECT count(*) FROM {layer_table(spec, layer)} "
                              "WHERE partition_date = CAST(? AS DATE)", [day]).fetchone()
            counts[layer] = int(row[0]) if row else 0
        return counts


def check_invariants(deployment: Deployment, *, allow_failed: bool = False) -> Any:
    """Run the invariant checker (I1-I6) on a quiescent deployment; returns its Report."""
    from app.db.session import Database
    from app.invariants import InvariantChecker
    from app.lakehouse.pipeline import load_datasets

    settings = deployment.settings()
    db = Database(settings.database_url)
    try:
        with lake_of(deployment) as lake:
            checker = InvariantChecker(db, lake, load_datasets(None), settings.source_root)
            return checker.check(allow_failed=allow_failed)
    finally:
        db.dispose()


def show(report: Any) -> str:
    return "\n".join(str(v) for v in report.violations) or "<no violations>"
