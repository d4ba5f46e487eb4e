"""The invariant checker the crash tests and ``lakesaga check`` share (DESIGN.md §6).

Run it when the system is quiescent (no worker busy). It reads the saga log, the DuckLake
catalog and its files, the data catalog, the outbox and the raw input, and reports every breach:

- I1 every saga terminal; none active with an expired lease
- I2 all-or-nothing: a succeeded saga's rows are in every layer; a compensated one left nothing
- I3 no orphans: no data file the lake does not reference (after cleanup), no referenced file
  missing, no catalog/lineage row of a compensated saga
- I4 raw input unchanged (sha256 of every manifest file)
- I5 every consumer of a succeeded saga has a delivered notification with one stable key; none
  exists for a compensated saga
- I6 each saga's events are a path through the allowed state graph, epochs never decrease
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.db.models import CatalogPartitionRow, OutboxRow, SagaEventRow, SagaRow, SagaStepRow
from app.db.rows import utcnow
from app.db.session import Database
from app.lakehouse.duck import LAKE, Lake, first_row
from app.lakehouse.pinned import sha256_file
from app.lakehouse.pipeline import DatasetSpec
from app.lakehouse.tables import bronze_table, gold_table, silver_table
from app.saga.states import ALLOWED_SAGA_TRANSITIONS, SagaStatus


@dataclass(frozen=True)
class Violation:
    invariant: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.invariant} {self.subject}: {self.message}"


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, invariant: str, subject: str, message: str) -> None:
        self.violations.append(Violation(invariant, subject, message))


class InvariantChecker:
    def __init__(self, db: Database, lake: Lake, datasets: dict[str, DatasetSpec],
                 source_root: Path) -> None:
        self.db, self.lake, self.datasets, self.source_root = db, lake, datasets, source_root

    def check(self, *, allow_failed: bool = False, cleanup: bool = True) -> Report:
        report = Report()
        with self.db.sessions() as s:
            sagas = list(s.scalars(select(SagaRow).order_by(SagaRow.created_at, SagaRow.id)))
            steps: dict[str, dict[str, SagaStepRow]] = defaultdict(dict)
            for step in s.scalars(select(SagaStepRow)):
                steps[step.saga_id][step.step] = step
            events: dict[str, list[SagaEventRow]] = defaultdict(list)
            for event in s.scalars(select(SagaEventRow).order_by(SagaEventRow.saga_id,
                                                                 SagaEventRow.seq)):
                events[event.saga_id].append(event)
            outbox: dict[str, list[OutboxRow]] = defaultdict(list)
            for row in s.scalars(select(OutboxRow)):
                outbox[row.saga_id].append(row)
            catalog = list(s.scalars(select(CatalogPartitionRow)))
        report.stats["sagas"] = len(sagas)
        for saga in sagas:
            report.stats[saga.status] += 1
        self._terminal(report, sagas, allow_failed)
        self._all_or_nothing(report, sagas, steps, catalog)
        self._no_orphans(report, sagas, catalog, cleanup)
        self._raw_unchanged(report, sagas, steps)
        self._notifications(report, sagas, steps, outbox)
        self._event_paths(report, sagas, events)
        return report

    def _terminal(self, report: Report, sagas: list[SagaRow], allow_failed: bool) -> None:
        now = utcnow()
        terminal = {SagaStatus.SUCCEEDED.value, SagaStatus.COMPENSATED.value}
        if allow_failed:
            terminal.add(SagaStatus.FAILED.value)
        for saga in sagas:
            if saga.status in terminal:
                continue
            expired = saga.lease_expires_at is None or saga.lease_expires_at < now
            detail = " with an expired lease (stuck)" if expired else ""
            report.add("I1", saga.id, f"status {saga.status}{detail}")

    def _count(self, sql: str, params: list[Any]) -> int:
        row = first_row(self.lake.cursor().execute(sql, params))
        return int(row[0]) if row else 0

    def _saga_ids(self, table: str, partition_date: date) -> set[str]:
        rows = self.lake.cursor().execute(
            f"SELECT DISTINCT _saga_id FROM {table} WHERE partition_date = ?", [partition_date]
        ).fetchall()
        return {str(r[0]) for r in rows}

    def _all_or_nothing(self, report: Report, sagas: list[SagaRow],
                        steps: dict[str, dict[str, SagaStepRow]],
                        catalog: list[CatalogPartitionRow]) -> None:
        partitions: dict[tuple[str, date], list[SagaRow]] = defaultdict(list)
        for saga in sagas:
            partitions[(saga.dataset, saga.partition_date)].append(saga)
        entries: dict[tuple[str, date], dict[str, CatalogPartitionRow]] = defaultdict(dict)
        for entry in catalog:
            entries[(entry.dataset, entry.partition_date)][entry.layer] = entry
        for (dataset, day), group in partitions.items():
            spec = self.datasets.get(dataset)
            if spec is None:
                continue
            for saga in group:
                batch = self._count(f"SELECT count(*) FROM {bronze_table(spec)} "
                                    "WHERE _batch_id = ?", [saga.id])
                if saga.status == SagaStatus.SUCCEEDED:
                    recorded = (steps[saga.id]["ingest_to_bronze"].output or {}).get("records")
                    if batch != recorded:
                        report.add("I2", saga.id, f"bronze holds {batch} rows of its batch, "
                                                  f"the log recorded {recorded}")
                elif saga.status == SagaStatus.COMPENSATED and batch:
                    report.add("I2", saga.id, f"compensated but bronze still holds {batch} rows")
            self._partition_matches_last_success(report, spec, day, group, steps,
                                                 entries[(dataset, day)])

    def _partition_matches_last_success(self, report: Report, spec: DatasetSpec, day: date,
                                        group: list[SagaRow],
                                        steps: dict[str, dict[str, SagaStepRow]],
                                        entries: dict[str, CatalogPartitionRow]) -> None:
        """Silver, gold and the catalog of a partition belong to its last succeeded saga."""
        subject = f"{spec.name}/{day}"
        succeeded = [s for s in group if s.status == SagaStatus.SUCCEEDED]
        last = succeeded[-1] if succeeded else None
        expected = {
            "silver": (silver_table(spec), "process_to_silver", "records"),
            "gold": (gold_table(spec), "aggregate_to_gold", "aggregated_records"),
        }
        for layer, (table, step, metric) in expected.items():
            rows = self._count(f"SELECT count(*) FROM {table} WHERE partition_date = ?", [day])
            writers = self._saga_ids(table, day)
            if last is None:
                if rows:
                    report.add("I2", subject, f"{layer} holds {rows} rows but no saga of the "
                                              "partition succeeded")
                continue
            recorded = (steps[last.id][step].output or {}).get(metric)
            # An empty ingestion (a header-only file) succeeds and writes no row: no writer.
            expected_writers = {last.id} if recorded else set()
            if rows != recorded or writers != expected_writers:
                report.add("I2", subject, f"{layer} holds {rows} rows written by "
                                          f"{sorted(writers)}; expected {recorded} rows of {last.id}")
        catalogued = {layer: e.saga_id for layer, e in entries.items()}
        wanted = {layer: last.id for layer in ("bronze", "silver", "gold")} if last else {}
        if catalogued != wanted:
            report.add("I2", subject, f"catalog entries {catalogued} != expected {wanted}")

    def _no_orphans(self, report: Report, sagas: list[SagaRow],
                    catalog: list[CatalogPartitionRow], cleanup: bool) -> None:
        compensated = {s.id for s in sagas if s.status == SagaStatus.COMPENSATED}
        for entry in catalog:
            if entry.saga_id in compensated:
                report.add("I3", entry.saga_id, f"catalog/lineage entry {entry.layer} of "
                                                f"{entry.dataset}/{entry.partition_date} remains")
        cur = self.lake.cursor()
        if cleanup:
            removed = cur.execute(f"CALL ducklake_delete_orphaned_files('{LAKE}', "
                                  "cleanup_all => true)").fetchall()
            report.stats["orphan_files_cleaned"] += len(removed)
        meta = self.lake.metadata_prefix
        known = {Path(str(r[0])).name for r in cur.execute(
            f"SELECT path FROM {meta}.ducklake_data_file UNION ALL "
            f"SELECT path FROM {meta}.ducklake_delete_file UNION ALL "
            f"SELECT path FROM {meta}.ducklake_files_scheduled_for_deletion").fetchall()}
        live = {Path(str(r[0])).name for r in cur.execute(
            f"SELECT path FROM {meta}.ducklake_data_file WHERE end_snapshot IS NULL UNION ALL "
            f"SELECT path FROM {meta}.ducklake_delete_file WHERE end_snapshot IS NULL").fetchall()}
        on_disk = {p.name: p for p in self.lake.data_path.rglob("*") if p.is_file()}
        report.stats["data_files"] = len(on_disk)
        for name, path in sorted(on_disk.items()):
            if name not in known:
                report.add("I3", str(path.relative_to(self.lake.data_path)),
                           "data file not referenced by the lake catalog")
        for name in sorted(live - set(on_disk)):
            report.add("I3", name, "referenced by the lake catalog but missing on disk")

    def _raw_unchanged(self, report: Report, sagas: list[SagaRow],
                       steps: dict[str, dict[str, SagaStepRow]]) -> None:
        digests: dict[str, str | None] = {}
        for saga in sagas:
            hashed = dict((steps[saga.id]["ingest_to_bronze"].checkpoint or {}).get("sha256", {}))
            for entry in saga.manifest.get("files", []):
                expected = entry.get("sha256") or hashed.get(entry["path"])
                if expected is None:
                    continue
                if entry["path"] not in digests:
                    path = self.source_root / entry["path"]
                    digests[entry["path"]] = sha256_file(path) if path.is_file() else None
                report.stats["raw_files_checked"] += 1
                if digests[entry["path"]] != expected:
                    report.add("I4", entry["path"], "raw input changed or disappeared")

    def _notifications(self, report: Report, sagas: list[SagaRow],
                       steps: dict[str, dict[str, SagaStepRow]],
                       outbox: dict[str, list[OutboxRow]]) -> None:
        for saga in sagas:
            rows = outbox.get(saga.id, [])
            if saga.status == SagaStatus.COMPENSATED and rows:
                report.add("I5", saga.id, f"compensated but {len(rows)} notifications queued")
            if saga.status != SagaStatus.SUCCEEDED:
                continue
            notify = steps[saga.id]["notify_downstream"].output or {}
            expected = int(notify.get("consumers_notified", 0))
            keys = defaultdict(set)
            for row in rows:
                keys[row.consumer_id].add(row.idempotency_key)
            delivered = {r.consumer_id for r in rows if r.status == "delivered"}
            report.stats["notifications_delivered"] += len(delivered)
            if len(delivered) < expected:
                report.add("I5", saga.id, f"{len(delivered)} of {expected} consumers delivered")
            for consumer, consumer_keys in keys.items():
                if len(consumer_keys) != 1:
                    report.add("I5", saga.id, f"consumer {consumer} got several keys")

    def _event_paths(self, report: Report, sagas: list[SagaRow],
                     events: dict[str, list[SagaEventRow]]) -> None:
        for saga in sagas:
            status, epoch = SagaStatus.PENDING, 0
            for expected_seq, event in enumerate(events.get(saga.id, []), start=1):
                if event.seq != expected_seq:
                    report.add("I6", saga.id, f"event seq {event.seq}, expected {expected_seq}")
                    break
                if event.epoch < epoch:
                    report.add("I6", saga.id, f"epoch went back from {epoch} to {event.epoch} "
                                              f"at seq {event.seq}")
                epoch = max(epoch, event.epoch)
                target = event.payload.get("to") if event.step is None else None
                if target is None or event.kind == "created":
                    continue
                source = SagaStatus(event.payload.get("from", status))
                if source != status or SagaStatus(target) not in ALLOWED_SAGA_TRANSITIONS[source]:
                    report.add("I6", saga.id, f"seq {event.seq}: {source} -> {target} "
                                              f"is not a step from {status}")
                status = SagaStatus(target)
            if status != saga.status:
                report.add("I6", saga.id, f"events end in {status}, the saga is {saga.status}")
