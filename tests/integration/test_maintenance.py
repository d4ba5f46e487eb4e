"""``lakesaga maintenance`` (app/lakehouse/maintenance.py) next to sagas that may still roll
back: the snapshot an unfinished saga's compensation restores is never expired."""

from __future__ import annotations

import time
from collections.abc import Callable

from lakesaga_live import Live

from app.lakehouse.maintenance import expire_snapshots

DAY, OTHER_DAY = "2026-01-06", "2026-01-07"


def _submit_day(live: Live, day: str, seed: int = 42) -> str:
    live.generate(day, partition_date=day, records=300, files=1, seed=seed)
    resp = live.submit(path=f"clickstream/{day}/*.ndjson", partition_date=day)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _silver_before(saga: dict) -> int:
    silver = {s["name"]: s for s in saga["steps"]}["process_to_silver"]
    return int(silver["metrics"]["before_snapshot"])


def test_maintenance__keeps_the_snapshot_a_failed_saga_restores(
        live_factory: Callable[..., Live]) -> None:
    # Gold fails, silver's compensation fails all 4 tries: failed. The 5th try (the retry) works.
    live = live_factory(faults="aggregate_to_gold=raise@1,delete_silver_partition=raise@1-4")
    failed = live.wait(_submit_day(live, DAY))
    assert failed["status"] == "failed", failed["error"]
    pinned = _silver_before(failed)
    assert live.wait(_submit_day(live, OTHER_DAY, seed=7))["status"] == "succeeded"
    time.sleep(1.1)  # every snapshot so far is older than the interval

    # Snapshots current less than a minute ago may be about to be recorded: all are kept.
    assert expire_snapshots(live.service.db, live.service.lake, "1 second").expired == []
    result = expire_snapshots(live.service.db, live.service.lake, "1 second", margin_s=0)

    assert result.pinned == {failed["id"]: pinned} and result.floor == pinned
    assert result.expired and max(result.expired) < pinned  # older ones did go
    assert live.client.post(f"/sagas/{failed['id']}/retry").status_code == 202
    retried = live.wait(failed["id"])
    assert retried["status"] == "compensated", retried["error"]
    assert live.lake_count("silver", DAY) == 0 and live.lake_count("bronze", DAY) == 0


def test_maintenance__during_a_running_saga_keeps_its_snapshot(
        live_factory: Callable[..., Live]) -> None:
    # Silver commits and the saga pauses; maintenance runs meanwhile; then gold fails and the
    # compensation restores silver to the snapshot it started from (older than the interval).
    live = live_factory(faults="process_to_silver.after_record=sleep:2500@1,"
                               "aggregate_to_gold=raise@1")
    running = _submit_day(live, DAY)
    deadline = time.monotonic() + 10
    while not any(e["kind"] == "step_succeeded" and e["step"] == "process_to_silver"
                  for e in live.client.get(f"/sagas/{running}/events").json()["items"]):
        assert time.monotonic() < deadline, "the saga never finished silver"
        time.sleep(0.02)
    time.sleep(1.1)  # silver's starting snapshot is older than the interval, and not current

    result = expire_snapshots(live.service.db, live.service.lake, "1 second", margin_s=0)

    assert live.client.get(f"/sagas/{running}").json()["status"] == "running"
    saga = live.wait(running)
    assert saga["status"] == "compensated", saga["error"]
    assert result.pinned == {running: _silver_before(saga)}
    assert result.expired and max(result.expired) < _silver_before(saga)
    assert live.lake_count("silver", DAY) == 0
