"""Failure handling with real ``lakesaga serve`` processes on PostgreSQL, driven over HTTP:
poison sagas, compensation that fails (transiently, then for good), operator retry of a
``failed`` saga, and cancellation. Every scenario ends with the invariant checker (I1-I6)."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from lakesaga_procs import Deployment, Server
from procs_failures import (
    assert_problem,
    check_invariants,
    events,
    generate_partitions,
    get_saga,
    is_terminal,
    lake_counts,
    lake_of,
    show,
    steps,
    submit,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(300)]

Launch = Callable[[str, dict[str, str]], Server]
DAYS = ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04", "2026-03-05", "2026-03-06"]
RECORDS = 2000
EMPTY = {"bronze": 0, "silver": 0, "gold": 0}


@pytest.fixture(scope="module")
def source_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw-failures")
    generate_partitions(root, DAYS, records=RECORDS)
    return root


@pytest.fixture
def deployment(pg_database_factory: Callable[[], str], source_root: Path,
               tmp_path: Path) -> Deployment:
    return Deployment(pg_database_factory(), source_root, tmp_path / "home")


def _env(deployment: Deployment, faults: str = "", **extra: str) -> dict[str, str]:
    env = deployment.env(faults=faults)
    env["LAKESAGA_STEP_BACKOFF_S"] = "0.05"
    env.update({f"LAKESAGA_{k.upper()}": v for k, v in extra.items()})
    return env


def _kinds(saga_events: list[dict], kind: str, step: str | None = None) -> list[dict]:
    return [e for e in saga_events if e["kind"] == kind and (step is None or e["step"] == step)]


def _assert_invariants(deployment: Deployment) -> None:
    report = check_invariants(deployment)
    assert report.ok, show(report)


# -- a. poison --------------------------------------------------------------------------------


def test_poison__saga_killing_its_worker_is_compensated_other_partition_succeeds(
        deployment: Deployment, launch: Launch) -> None:
    """Saga A's worker dies (SIGKILL at ``process_to_silver``) on each of its 2 allowed claims;
    its 3rd claim compensates it as poison. Saga B (another partition) is submitted meanwhile
    and succeeds.

    Choice of faults: fault points are not saga-specific and ``@N`` counts hits per process, so
    with the kill armed the first saga to reach ``process_to_silver`` in *any* process dies —
    a process with the kill armed would also kill B (and B, claimed 3 times, would rightly be
    poison too). So the kill stays armed exactly while A still runs forward (claims 1 and 2,
    with one worker thread so A — the oldest runnable saga — is the one claimed); the process
    that makes the 3rd claim runs without it. That changes nothing for A: a poisoned saga is
    turned back at the claim and never reaches ``process_to_silver`` again (asserted from its
    events), while B, only ever claimed by the healthy process, must flow past it.
    """
    day_a, day_b = DAYS[0], DAYS[1]
    poison = {"max_saga_attempts": "2", "lease_ttl_s": "1"}
    kill = "process_to_silver=kill"

    first = launch("p1-kill", _env(deployment, kill, worker_concurrency="1", **poison))
    first.wait_healthy()
    a = submit(first, day_a)
    b = submit(first, day_b)  # submitted meanwhile: pending behind A on the only worker thread
    assert first.wait_exit(60) == -signal.SIGKILL, first.tail()

    time.sleep(1.5)  # A's 1 s lease has expired: the next process claims A (oldest) first
    second = launch("p2-kill", _env(deployment, kill, worker_concurrency="1", **poison))
    assert second.wait_exit(60) == -signal.SIGKILL, second.tail()

    time.sleep(1.5)
    third = launch("p3", _env(deployment, worker_concurrency="2", **poison))
    third.wait_healthy()
    saga_a = third.wait_terminal(a, 60)
    saga_b = third.wait_terminal(b, 60)

    assert saga_a["status"] == "compensated", f"{saga_a}\n{third.tail()}"
    assert saga_a["error"].startswith("poison: claimed 3 times"), saga_a["error"]
    assert "limit 2" in saga_a["error"], saga_a["error"]
    assert saga_a["attempts"] == 3
    sa = steps(saga_a)
    assert sa["ingest_to_bronze"]["status"] == "compensated", sa
    assert sa["ingest_to_bronze"]["compensation"]["metrics"]["records_removed"] == RECORDS
    assert sa["process_to_silver"]["status"] == "compensated", sa  # interrupted, then undone
    assert sa["process_to_silver"]["attempt"] == 2, sa
    for name in ("aggregate_to_gold", "update_catalog", "notify_downstream"):
        assert sa[name]["status"] == "skipped", sa[name]

    ev = events(third, a)
    claims = _kinds(ev, "claimed")
    assert [c["payload"]["attempts"] for c in claims] == [1, 2, 3], claims
    assert len({c["payload"]["owner"] for c in claims}) == 3, claims
    assert [c["epoch"] for c in claims] == sorted({c["epoch"] for c in claims}), claims
    assert len(_kinds(ev, "step_started", "process_to_silver")) == 2, ev
    assert not [e for e in ev if e["kind"] == "step_started" and e["epoch"] == claims[-1]["epoch"]], (
        "the poison claim ran a forward step")

    assert saga_b["status"] == "succeeded", f"{saga_b}\n{third.tail()}"
    assert saga_b["attempts"] == 1, saga_b
    assert steps(saga_b)["ingest_to_bronze"]["metrics"]["records"] == RECORDS

    with third.client() as api:
        assert_problem(api.get(f"/datasets/clickstream/partitions/{day_a}"), 404)
        assert api.get(f"/datasets/clickstream/partitions/{day_b}").status_code == 200
    third.stop()
    assert lake_counts(deployment, day_a) == EMPTY
    counts_b = lake_counts(deployment, day_b)
    assert counts_b["bronze"] == RECORDS and counts_b["silver"] > 0 and counts_b["gold"] > 0
    _assert_invariants(deployment)


# -- b. compensation fails twice, then succeeds ------------------------------------------------


def test_compensation__fails_twice_then_succeeds(deployment: Deployment, launch: Launch) -> None:
    day = DAYS[2]
    server = launch("comp-retry", _env(
        deployment, "aggregate_to_gold=raise,delete_silver_partition=raise@1-2"))
    server.wait_healthy()
    saga_id = submit(server, day)

    saga = server.wait_terminal(saga_id, 60)

    assert saga["status"] == "compensated", f"{saga}\n{server.tail()}"
    assert "aggregate_to_gold failed" in saga["error"], saga["error"]
    silver = steps(saga)["process_to_silver"]
    assert silver["status"] == "compensated", silver
    assert silver["compensation"]["attempt"] == 3, silver
    assert silver["compensation"]["status"] == "compensated"
    assert silver["compensation"]["error"] is None, silver
    for name in ("ingest_to_bronze", "aggregate_to_gold"):
        assert steps(saga)[name]["status"] == "compensated", steps(saga)[name]
    ev = events(server, saga_id)
    failed = _kinds(ev, "compensation_failed", "process_to_silver")
    assert len(failed) == 2, failed
    assert all("fault injected at delete_silver_partition" in e["payload"]["error"] for e in failed)
    assert len(_kinds(ev, "compensation_started", "process_to_silver")) == 3
    assert len(_kinds(ev, "compensation_succeeded", "process_to_silver")) == 1
    assert not _kinds(ev, "compensation_failed", "ingest_to_bronze")
    assert _kinds(ev, "claimed") and len(_kinds(ev, "claimed")) == 1  # all within one claim

    server.stop()
    assert lake_counts(deployment, day) == EMPTY
    _assert_invariants(deployment)


# -- c. compensation always fails: failed, blocked partition, operator retry -------------------


def test_compensation__exhausted_is_failed_blocks_partition_until_retry(
        deployment: Deployment, launch: Launch) -> None:
    day = DAYS[3]
    faulty = launch("comp-fails", _env(
        deployment, "aggregate_to_gold=raise,delete_silver_partition=raise"))
    faulty.wait_healthy()
    first = submit(faulty, day)

    saga = faulty.wait_terminal(first, 60)

    assert saga["status"] == "failed", f"{saga}\n{faulty.tail()}"
    error = saga["error"]
    assert error.startswith("compensation of process_to_silver failed"), error
    assert "FaultInjected" in error, error
    left = error.split("not rolled back:", 1)[1]
    assert {s.strip() for s in left.split(",")} == {"ingest_to_bronze", "process_to_silver"}, error
    s = steps(saga)
    assert s["process_to_silver"]["status"] == "compensating", s["process_to_silver"]
    assert s["process_to_silver"]["compensation"]["attempt"] == 4  # LAKESAGA_STEP_MAX_ATTEMPTS
    assert "fault injected at delete_silver_partition" in (
        s["process_to_silver"]["compensation"]["error"] or ""), s["process_to_silver"]
    assert s["ingest_to_bronze"]["status"] == "succeeded", s["ingest_to_bronze"]
    assert s["ingest_to_bronze"]["compensation"] is None  # never reached
    assert s["aggregate_to_gold"]["status"] == "compensated", s["aggregate_to_gold"]
    ev = events(faulty, first)
    assert len(_kinds(ev, "compensation_failed", "process_to_silver")) == 4
    assert _kinds(ev, "status")[-1]["payload"]["to"] == "failed"

    # What is left behind really is there: bronze and silver, no gold.
    counts = lake_counts(deployment, day)
    assert counts["bronze"] == RECORDS and counts["silver"] > 0 and counts["gold"] == 0, counts

    # A later saga for the same partition waits behind the failed one.
    second = submit(faulty, day)
    time.sleep(2.0)  # 20 poll intervals
    blocked = get_saga(faulty, second)
    assert blocked["status"] == "pending" and blocked["attempts"] == 0, blocked
    with faulty.client() as api:
        assert_problem(api.post(f"/sagas/{second}/retry"), 409, "pending")
        assert_problem(api.post(f"/sagas/{uuid.uuid4()}/retry"), 404)
    report = check_invariants(deployment, allow_failed=True)
    assert {v.invariant for v in report.violations} <= {"I1", "I2"}, show(report)

    # The operator fixes the cause (restart without faults) and retries.
    faulty.stop()
    healthy = launch("healthy", _env(deployment))
    healthy.wait_healthy()
    with healthy.client() as api:
        resp = api.post(f"/sagas/{first}/retry")
    assert resp.status_code == 202, f"{resp.status_code} {resp.text}\n{healthy.tail()}"
    assert resp.json()["status"] in ("compensating", "compensated"), resp.json()

    retried = healthy.wait_terminal(first, 60)
    assert retried["status"] == "compensated", f"{retried}\n{healthy.tail()}"
    rs = steps(retried)
    for name in ("ingest_to_bronze", "process_to_silver", "aggregate_to_gold"):
        assert rs[name]["status"] == "compensated", rs[name]
    assert rs["process_to_silver"]["compensation"]["error"] is None
    assert rs["ingest_to_bronze"]["compensation"]["metrics"]["records_removed"] == RECORDS
    retried_events = events(healthy, first)
    statuses = [(e["payload"]["from"], e["payload"]["to"])
                for e in _kinds(retried_events, "status")]
    assert statuses[-2:] == [("failed", "compensating"), ("compensating", "compensated")], statuses

    unblocked = healthy.wait_terminal(second, 60)
    assert unblocked["status"] == "succeeded", f"{unblocked}\n{healthy.tail()}"
    with healthy.client() as api:
        assert_problem(api.post(f"/sagas/{first}/retry"), 409, "compensated")
        assert_problem(api.post(f"/sagas/{second}/retry"), 409, "succeeded")
    healthy.stop()

    # The partition holds the second saga's data only: the first one left nothing behind.
    with lake_of(deployment) as lake:
        cur = lake.cursor()
        batches = cur.execute("SELECT _batch_id, count(*) FROM lake.bronze.raw_clickstream "
                              "WHERE partition_date = CAST(? AS DATE) GROUP BY ALL",
                              [day]).fetchall()
        writers = cur.execute("SELECT DISTINCT _saga_id FROM lake.silver.cleaned_clickstream "
                              "WHERE partition_date = CAST(? AS DATE)", [day]).fetchall()
    assert batches == [(second, RECORDS)], batches
    assert writers == [(second,)], writers
    _assert_invariants(deployment)


# -- d. cancel ------------------------------------------------------------------------------------


def test_cancel__running_saga_is_compensated(deployment: Deployment, launch: Launch) -> None:
    day = DAYS[4]
    server = launch("cancel", _env(deployment, "process_to_silver=sleep:3000"))
    server.wait_healthy()
    saga_id = submit(server, day)
    wait_for(server, saga_id, lambda s: steps(s)["process_to_silver"]["status"] == "running",
             30, "process_to_silver running")

    with server.client() as api:
        resp = api.post(f"/sagas/{saga_id}/cancel")
    assert resp.status_code == 202, resp.text
    assert resp.json()["cancel_requested"] is True
    assert resp.json()["status"] == "running"

    saga = server.wait_terminal(saga_id, 60)
    assert saga["status"] == "compensated", f"{saga}\n{server.tail()}"
    assert saga["error"] == "cancelled by request"
    s = steps(saga)
    assert s["aggregate_to_gold"]["status"] == "skipped", s  # stopped at the next boundary
    for name in ("ingest_to_bronze", "process_to_silver"):
        assert s[name]["status"] == "compensated", s[name]
    assert _kinds(events(server, saga_id), "cancel_requested")

    with server.client() as api:
        assert_problem(api.post(f"/sagas/{saga_id}/cancel"), 409, "compensated")
        assert_problem(api.post(f"/sagas/{uuid.uuid4()}/cancel"), 404)
        assert_problem(api.get(f"/datasets/clickstream/partitions/{day}"), 404)
    assert is_terminal(get_saga(server, saga_id))
    server.stop()
    assert lake_counts(deployment, day) == EMPTY
    _assert_invariants(deployment)
