"""Crash recovery with real processes: ``lakesaga serve`` is SIGKILLed at a fault point, then
restarted without the fault; the saga must finish exactly as an uninterrupted run would."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lakesaga_procs import (
    PARTITION,
    SAGA_REQUEST,
    Deployment,
    Server,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

Launch = Callable[[str, dict[str, str]], Server]
LAYERS = ("bronze", "silver", "gold")


def _submit(server: Server) -> str:
    with server.client() as api:
        resp = api.post("/sagas", json=SAGA_REQUEST)
    assert resp.status_code == 202, f"POST /sagas → {resp.status_code} {resp.text}\n{server.tail()}"
    return str(resp.json()["id"])


def _events(server: Server, saga_id: str) -> list[dict[str, Any]]:
    with server.client() as api:
        resp = api.get(f"/sagas/{saga_id}/events", params={"limit": 1000})
    assert resp.status_code == 200, f"{resp.status_code} {resp.text}\n{server.tail()}"
    return list(resp.json()["items"])


def _partition(server: Server) -> tuple[int, dict[str, Any]]:
    with server.client() as api:
        resp = api.get(f"/datasets/clickstream/partitions/{PARTITION}")
    return resp.status_code, resp.json()


def _step_metrics(saga: dict[str, Any]) -> dict[str, Any]:
    m = {s["name"]: s["metrics"] for s in saga["steps"]}
    b, s, g = m["ingest_to_bronze"], m["process_to_silver"], m["aggregate_to_gold"]
    return {
        "bronze.records": b["records"],
        "silver.duplicates_removed": s["duplicates_removed"],
        "silver.nulls_filled": s["nulls_filled"],
        "silver.invalid_removed": s["invalid_removed"],
        "silver.records": s["records"],
        "gold.aggregated_records": g["aggregated_records"],
    }


def _lake_counts(deployment: Deployment) -> dict[str, int]:
    """count(*) per layer for the partition, read straight from the lake (server stopped)."""
    from app.lakehouse.duck import Lake
    from app.lakehouse.pipeline import load_datasets
    from app.lakehouse.tables import layer_table

    spec = load_datasets(None)["clickstream"]
    lake = Lake(deployment.settings())
    try:
        cur = lake.cursor()
        counts = {}
        for layer in LAYERS:
            row = cur.execute(f"SELECT count(*) FROM {layer_table(spec, layer)} "
                              "WHERE partition_date = CAST(? AS DATE)", [PARTITION]).fetchone()
            counts[layer] = int(row[0]) if row else 0
        return counts
    finally:
        lake.close()


def _fresh_database_url(database_url: str, home: Path,
                        pg_database_factory: Callable[[], str]) -> str:
    if database_url.startswith("postgresql"):
        return pg_database_factory()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'lakesaga.db'}"


def _claims(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "claimed"]


@pytest.mark.parametrize("kill_point", ["process_to_silver", "process_to_silver.after_commit"])
def test_crash_recovery__killed_in_silver_resumes_to_same_result(
    kill_point: str, database_url: str, tmp_path: Path, clickstream_root: Path,
    launch: Launch, pg_database_factory: Callable[[], str],
) -> None:
    crashed = Deployment(database_url, clickstream_root, tmp_path / "crashed")

    # 1. The first process dies (SIGKILL) at the fault point while running the saga.
    first = launch("first", crashed.env(faults=f"{kill_point}=kill"))
    first.wait_healthy()
    saga_id = _submit(first)
    returncode = first.wait_exit(60)
    killed_at = time.monotonic()
    assert returncode == -signal.SIGKILL, (
        f"expected death by SIGKILL at {kill_point}, got returncode {returncode}\n{first.tail()}")

    # 2. A restarted process (no fault) takes the saga over once the lease expires.
    second = launch("second", crashed.env())
    healthy_after = second.wait_healthy()
    saga = second.wait_terminal(saga_id, 60)
    recovered_in = time.monotonic() - killed_at
    assert saga["status"] == "succeeded", f"{saga}\n{second.tail()}"
    assert saga["attempts"] == 2, f"attempts {saga['attempts']}\n{second.tail()}"
    assert [s["status"] for s in saga["steps"]] == ["succeeded"] * 5, saga["steps"]
    silver_step = next(s for s in saga["steps"] if s["name"] == "process_to_silver")
    assert silver_step["attempt"] == 2, silver_step  # re-run once, after the crash

    claims = _claims(_events(second, saga_id))
    assert len(claims) == 2, claims
    assert claims[1]["epoch"] > claims[0]["epoch"], claims
    assert claims[0]["payload"]["owner"] != claims[1]["payload"]["owner"], claims

    status, crashed_partition = _partition(second)
    assert status == 200, f"{crashed_partition}\n{second.tail()}"
    crashed_metrics = _step_metrics(saga)
    second.stop()
    assert second.proc.returncode is not None
    crashed_lake = _lake_counts(crashed)

    # 3. The same data through an uninterrupted deployment.
    ref_home = tmp_path / "reference"
    reference = Deployment(_fresh_database_url(database_url, ref_home, pg_database_factory),
                           clickstream_root, ref_home)
    ref_server = launch("reference", reference.env())
    ref_server.wait_healthy()
    ref_id = _submit(ref_server)
    ref_saga = ref_server.wait_terminal(ref_id, 60)
    assert ref_saga["status"] == "succeeded", f"{ref_saga}\n{ref_server.tail()}"
    assert ref_saga["attempts"] == 1
    assert len(_claims(_events(ref_server, ref_id))) == 1
    status, ref_partition = _partition(ref_server)
    assert status == 200, ref_partition
    ref_server.stop()
    ref_lake = _lake_counts(reference)

    # 4. Nothing doubled, nothing lost: metrics and every layer agree with the reference.
    ref_metrics = _step_metrics(ref_saga)
    assert crashed_metrics == ref_metrics
    api_rows = {layer: crashed_partition["layers"][layer]["rows"] for layer in LAYERS}
    ref_api_rows = {layer: ref_partition["layers"][layer]["rows"] for layer in LAYERS}
    assert api_rows == ref_api_rows
    assert crashed_lake == ref_lake
    assert crashed_lake == api_rows
    assert crashed_lake == {"bronze": ref_metrics["bronze.records"],
                            "silver": ref_metrics["silver.records"],
                            "gold": ref_metrics["gold.aggregated_records"]}
    assert ref_metrics["bronze.records"] == 20_000
    print(f"\n[{kill_point} on {database_url.split(':')[0]}] restarted server healthy in "
          f"{healthy_after:.2f} s; saga succeeded {recovered_in:.2f} s after the kill; "
          f"metrics {crashed_metrics}")


def test_crash_recovery__killed_during_compensation_finishes_rollback(
    database_url: str, tmp_path: Path, clickstream_root: Path, launch: Launch,
) -> None:
    deployment = Deployment(database_url, clickstream_root, tmp_path / "deployment")
    first = launch("first", deployment.env(
        faults="aggregate_to_gold=raise,delete_silver_partition=kill"))
    first.wait_healthy()
    saga_id = _submit(first)
    returncode = first.wait_exit(60)
    killed_at = time.monotonic()
    assert returncode == -signal.SIGKILL, (
        f"expected death by SIGKILL in delete_silver_partition, got {returncode}\n{first.tail()}")

    second = launch("second", deployment.env(faults="aggregate_to_gold=raise"))
    second.wait_healthy()
    saga = second.wait_terminal(saga_id, 60)
    recovered_in = time.monotonic() - killed_at
    assert saga["status"] == "compensated", f"{saga}\n{second.tail()}"
    assert saga["attempts"] == 2, saga
    steps = {s["name"]: s for s in saga["steps"]}
    for name in ("ingest_to_bronze", "process_to_silver", "aggregate_to_gold"):
        assert steps[name]["status"] == "compensated", steps[name]
    assert "aggregate_to_gold" in (saga["error"] or ""), saga["error"]
    assert steps["process_to_silver"]["compensation"]["attempt"] == 2, steps["process_to_silver"]
    assert steps["ingest_to_bronze"]["compensation"]["metrics"]["records_removed"] == 20_000

    claims = _claims(_events(second, saga_id))
    assert len(claims) == 2 and claims[1]["epoch"] > claims[0]["epoch"], claims

    status, body = _partition(second)
    assert status == 404, body
    second.stop()
    assert _lake_counts(deployment) == {"bronze": 0, "silver": 0, "gold": 0}
    print(f"\n[compensation on {database_url.split(':')[0]}] saga compensated "
          f"{recovered_in:.2f} s after the kill")
