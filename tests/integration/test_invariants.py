"""The invariant checker (app/invariants.py) on both backends: it passes on a healthy system and
it can fail — each tampering of the saga log, the lake, the catalog, the outbox or the raw input
is reported under the invariant it breaks.

Baseline: one live server runs a saga that succeeds (partition 2026-01-06, one webhook consumer,
delivered) and one that is compensated (partition 2026-01-07, ``aggregate_to_gold=raise@2``),
then stops, so the checker sees a quiescent system. Each test tampers one thing and checks with a
fresh Database + Lake of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from lakesaga_live import Live, WebhookReceiver
from sqlalchemy import delete, func, select, update

from app.db.models import CatalogPartitionRow, OutboxRow, SagaEventRow, SagaRow
from app.db.rows import utcnow
from app.db.session import Database
from app.invariants import InvariantChecker, Report
from app.lakehouse.duck import Lake
from app.lakehouse.generator import GeneratedDataset
from app.lakehouse.pipeline import load_datasets

GOOD_DAY, BAD_DAY = "2026-01-06", "2026-01-07"


@dataclass
class Baseline:
    succeeded: dict[str, Any]
    compensated: dict[str, Any]
    good_data: GeneratedDataset
    db: Database
    lake: Lake
    checker: InvariantChecker

    def check(self, *, cleanup: bool = True) -> Report:
        return self.checker.check(cleanup=cleanup)


def _codes(report: Report) -> set[str]:
    return {v.invariant for v in report.violations}


def _show(report: Report) -> str:
    return "\n".join(str(v) for v in report.violations) or "<no violations>"


def _assert_detected(report: Report, code: str, *needles: str) -> None:
    hits = [v for v in report.violations if v.invariant == code]
    assert hits, f"expected an {code} violation, got:\n{_show(report)}"
    for needle in needles:
        assert any(needle in f"{v.subject} {v.message}" for v in hits), (
            f"no {code} violation mentions {needle!r}:\n{_show(report)}")


@pytest.fixture
def baseline(live_factory: Callable[..., Live],
             webhook_receiver: WebhookReceiver) -> Iterator[Baseline]:
    live = live_factory(faults="aggregate_to_gold=raise@2")
    resp = live.client.post("/consumers", json={"name": "warehouse", "dataset": "clickstream",
                                                "url": f"{webhook_receiver.url}/warehouse"})
    assert resp.status_code == 201, resp.text
    good_data = live.generate(GOOD_DAY, partition_date=GOOD_DAY)
    live.generate(BAD_DAY, partition_date=BAD_DAY, seed=7)

    good = live.wait(live.submit(path=f"clickstream/{GOOD_DAY}/*.ndjson",
                                 partition_date=GOOD_DAY).json()["id"])
    assert good["status"] == "succeeded", good
    live.wait_deliveries(good["id"], 1)
    bad = live.wait(live.submit(path=f"clickstream/{BAD_DAY}/*.ndjson",
                                partition_date=BAD_DAY).json()["id"])
    assert bad["status"] == "compensated", bad
    settings = live.settings
    live.stop()  # quiescent: no worker, no dispatcher

    db = Database(settings.database_url)
    lake = Lake(settings)
    checker = InvariantChecker(db, lake, load_datasets(settings.datasets_dir),
                               settings.source_root)
    try:
        yield Baseline(good, bad, good_data, db, lake, checker)
    finally:
        lake.close()
        db.dispose()


def test_checker__healthy_system_has_no_violations(baseline: Baseline) -> None:
    report = baseline.check(cleanup=False)

    assert report.ok, _show(report)
    assert report.stats["sagas"] == 2
    assert report.stats["succeeded"] == 1 and report.stats["compensated"] == 1
    assert report.stats["raw_files_checked"] == 6  # 3 files per saga
    assert report.stats["notifications_delivered"] == 1
    assert baseline.check(cleanup=True).ok


def test_checker__missing_bronze_row_is_I2(baseline: Baseline) -> None:
    cur = baseline.lake.cursor()
    cur.execute("DELETE FROM lake.bronze.raw_clickstream WHERE rowid = (SELECT min(rowid) FROM "
                "lake.bronze.raw_clickstream WHERE _batch_id = ?)", [baseline.succeeded["id"]])

    _assert_detected(baseline.check(), "I2", baseline.succeeded["id"], "bronze holds 1999")


def test_checker__stray_parquet_file_is_I3_and_cleanup_removes_it(baseline: Baseline) -> None:
    data = baseline.lake.data_path
    stray = data / "bronze" / "stray-not-from-ducklake.parquet"
    stray.parent.mkdir(parents=True, exist_ok=True)
    baseline.lake.cursor().execute(f"COPY (SELECT 1 AS a) TO '{stray}' (FORMAT parquet)")

    # Without cleanup the checker reports the unreferenced file ...
    _assert_detected(baseline.check(cleanup=False), "I3", "stray-not-from-ducklake.parquet",
                     "not referenced")
    assert stray.exists()

    # ... with cleanup, ducklake_delete_orphaned_files(cleanup_all) deletes every *.parquet file
    # under the data path that the catalog does not reference (whatever its name), so it is gone.
    report = baseline.check(cleanup=True)
    assert report.ok, _show(report)
    assert report.stats["orphan_files_cleaned"] == 1
    assert not stray.exists()


def test_checker__stray_non_parquet_file_survives_cleanup_and_is_I3(baseline: Baseline) -> None:
    # DuckLake only considers *.parquet files orphans: anything else stays and is reported.
    stray = baseline.lake.data_path / "leftover.tmp"
    stray.write_bytes(b"partial write")

    report = baseline.check(cleanup=True)

    _assert_detected(report, "I3", "leftover.tmp")
    assert report.stats["orphan_files_cleaned"] == 0
    assert stray.exists()


def test_checker__catalog_row_of_compensated_saga_is_I3(baseline: Baseline) -> None:

    with baseline.db.transaction() as s:
        s.add(CatalogPartitionRow(
            dataset="clickstream", layer="silver", partition_date=date.fromisoformat(BAD_DAY),
            table_name="lake.silver.cleaned_clickstream", saga_id=baseline.compensated["id"],
            rows=1, snapshot_id=1, lineage={}, registered_at=utcnow()))

    _assert_detected(baseline.check(), "I3", baseline.compensated["id"], "catalog/lineage")


def test_checker__modified_raw_file_is_I4(baseline: Baseline) -> None:
    raw: Path = baseline.good_data.files[0]
    with raw.open("ab") as fh:
        fh.write(b"\n")

    _assert_detected(baseline.check(), "I4", raw.name, "changed")


def test_checker__deleted_raw_file_is_I4(baseline: Baseline) -> None:
    raw: Path = baseline.good_data.files[1]
    raw.unlink()

    _assert_detected(baseline.check(), "I4", raw.name, "disappeared")


def test_checker__missing_outbox_row_is_I5(baseline: Baseline) -> None:
    with baseline.db.transaction() as s:
        deleted = s.execute(delete(OutboxRow).where(OutboxRow.saga_id == baseline.succeeded["id"]))
    assert deleted.rowcount == 1  # type: ignore[attr-defined]

    _assert_detected(baseline.check(), "I5", baseline.succeeded["id"], "0 of 1")


def _last_event(db: Database, saga_id: str) -> int:
    with db.sessions() as s:
        return int(s.scalar(select(func.max(SagaEventRow.seq))
                            .where(SagaEventRow.saga_id == saga_id)) or 0)


def test_checker__epoch_going_back_is_I6(baseline: Baseline) -> None:
    saga_id = baseline.succeeded["id"]
    last = _last_event(baseline.db, saga_id)
    with baseline.db.transaction() as s:
        s.execute(update(SagaEventRow).where(SagaEventRow.saga_id == saga_id,
                                             SagaEventRow.seq == last).values(epoch=0))

    _assert_detected(baseline.check(), "I6", saga_id, "epoch went back")


def test_checker__gap_in_event_seq_is_I6(baseline: Baseline) -> None:
    saga_id = baseline.compensated["id"]
    last = _last_event(baseline.db, saga_id)
    with baseline.db.transaction() as s:
        s.execute(update(SagaEventRow).where(SagaEventRow.saga_id == saga_id,
                                             SagaEventRow.seq == last).values(seq=last + 5))

    _assert_detected(baseline.check(), "I6", saga_id, f"event seq {last + 5}, expected {last}")


def test_checker__running_saga_with_expired_lease_is_I1(baseline: Baseline) -> None:
    saga_id = baseline.compensated["id"]
    with baseline.db.transaction() as s:
        s.execute(update(SagaRow).where(SagaRow.id == saga_id).values(
            status="running", lease_owner="ghost", lease_expires_at=utcnow() - timedelta(hours=1)))

    report = baseline.check()

    _assert_detected(report, "I1", saga_id, "running", "expired lease")
    # the log no longer ends where the saga row says it is
    _assert_detected(report, "I6", saga_id, "events end in compensated")


def test_checker__failed_saga_is_I1_unless_allowed(baseline: Baseline) -> None:
    saga_id = baseline.compensated["id"]
    with baseline.db.transaction() as s:
        s.execute(update(SagaRow).where(SagaRow.id == saga_id).values(status="failed"))

    _assert_detected(baseline.check(), "I1", saga_id, "failed")
    assert "I1" not in _codes(baseline.checker.check(allow_failed=True))


def test_checker__empty_ingestion_is_no_violation(live_factory: Callable[..., Live]) -> None:
    # A header-only file is a legitimate ingestion: the saga succeeds with 0 rows, and silver
    # and gold of the partition hold no row of any writer.
    live = live_factory()
    folder = live.source_root / "headers"
    folder.mkdir()
    (folder / "only-header.csv").write_text(
        "event_id,user_id,session_id,event_type,page_url,referrer,device,country,event_ts,"
        "duration_ms\n")
    resp = live.client.post("/sagas", json={"dataset": "clickstream", "partition_date": GOOD_DAY,
                                            "source": {"path": "headers/*.csv",
                                                       "format": "csv"}})
    assert resp.status_code == 202, resp.text
    saga = live.wait(resp.json()["id"])
    assert saga["status"] == "succeeded", saga["error"]
    settings = live.settings
    live.stop()
    db, lake = Database(settings.database_url), Lake(settings)
    try:
        report = InvariantChecker(db, lake, load_datasets(settings.datasets_dir),
                                  settings.source_root).check()
    finally:
        lake.close()
        db.dispose()

    assert report.ok, _show(report)
    assert report.stats["succeeded"] == 1
