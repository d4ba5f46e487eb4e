"""The lakehouse ingestion saga: Bronze -> Silver -> Gold -> catalog -> notify (DESIGN.md §4).

Each data step is one lake commit tagged with (saga, step, epoch, attempt) and is safe to re-run
whole. Silver and Gold record the snapshot they start from *before* writing, and their
compensations restore the partition to it; ``update_catalog`` is the pivot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any

import duckdb

from app.db.session import Database
from app.lakehouse import bronze, gold, silver
from app.lakehouse.catalog import current_entries, replace_entries
from app.lakehouse.duck import Lake, commit_tag, snapshot_of
from app.lakehouse.pinned import PinnedSources
from app.lakehouse.pipeline import DatasetSpec, load_datasets
from app.lakehouse.tables import (
    bronze_table,
    ensure_tables,
    gold_table,
    restore_partition,
    silver_table,
)
from app.notify.outbox import PARTITION_READY, enqueue_for_dataset
from app.saga import PermanentError, Saga, StepContext, TransientError, action, compensate
from app.saga.definition import StepSpec
from app.settings import Settings

_TRANSIENT_MESSAGES = ("Failed to commit", "Could not connect", "Unable to connect",
                       "server closed the connection", "database is locked", "Connection refused",
                       "Failed to query most recent snapshot", "no connection to the server",
                       "terminating connection", "the database system is", "Failed to prepare",
                       "Failed to get global stats")


@dataclass
class LakehouseServices:
    settings: Settings
    db: Database
    lake: Lake

    @property
    def datasets(self) -> dict[str, DatasetSpec]:
        return load_datasets(self.settings.datasets_dir)


class LakehouseIngestionSaga(Saga):
    name = "lakehouse_ingestion"
    pivot = "update_catalog"

    def __init__(self, services: LakehouseServices) -> None:
        self.services = services

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, duckdb.TransactionException):
            return True
        if isinstance(exc, duckdb.Error) and any(m in str(exc) for m in _TRANSIENT_MESSAGES):
            return True
        return super().is_transient(exc)

    def run_action(self, spec: StepSpec, ctx: StepContext) -> dict[str, Any]:
        # Whole steps are serialized: on a SQLite lake catalog every lake read takes catalog
        # locks too (so across processes as well); on PostgreSQL within the process only.
        with self.services.lake.write_guard, self._recovering_lake():
            return super().run_action(spec, ctx)

    def run_compensation(self, spec: StepSpec, ctx: StepContext) -> dict[str, Any]:
        with self.services.lake.write_guard, self._recovering_lake():
            return super().run_compensation(spec, ctx)

    @contextmanager
    def _recovering_lake(self) -> Iterator[None]:
        """A fatal DuckDB error invalidates the whole instance: rebuild it, retry the step."""
        try:
            yield
        except (duckdb.FatalException, duckdb.InternalException) as exc:
            self.services.lake.reset()
            raise TransientError(f"lake connection rebuilt after: {exc}") from exc

    def spec(self, ctx: StepContext) -> DatasetSpec:
        spec = self.services.datasets.get(ctx.dataset)
        if spec is None:
            raise PermanentError(f"dataset {ctx.dataset!r} is not configured on this worker")
        return spec

    def _tag(self, ctx: StepContext, step: str | None = None) -> str:
        return commit_tag(ctx.saga_id, step or ctx.step, ctx.epoch, ctx.attempt)

    def _before_snapshot(self, ctx: StepContext) -> int:
        """The snapshot this step started from: recorded once, before the first write."""
        if ctx.checkpoint and "before_snapshot" in ctx.checkpoint:
            return int(ctx.checkpoint["before_snapshot"])
        snapshot = self.services.lake.current_snapshot()
        ctx.save_checkpoint({"before_snapshot": snapshot})
        return snapshot

    @action("ingest_to_bronze")
    def ingest_to_bronze(self, ctx: StepContext) -> dict[str, Any]:
        spec = self.spec(ctx)
        cur = self.services.lake.cursor()
        ensure_tables(cur, spec)
        settings = self.services.settings
        known = dict((ctx.checkpoint or {}).get("sha256", {}))
        # Every file stays open from its verification to the commit: DuckDB reads those bytes.
        with PinnedSources(settings.source_root, dict(ctx.manifest), known,
                           max_ingest_bytes=settings.max_ingest_bytes) as sources:
            if sources.hashes != known:
                ctx.save_checkpoint({"sha256": sources.hashes})
            ctx.ensure_owner()
            result = bronze.ingest(
                cur, spec, sources, fmt=ctx.manifest["format"], max_rows=settings.max_ingest_rows,
                partition_date=ctx.partition_date.isoformat(), saga_id=ctx.saga_id,
                tag=self._tag(ctx),
            )
        return {**result, "snapshot_id": _snapshot(self.services.lake, self._tag(ctx)),
                "batch_id": ctx.saga_id, "source": ctx.request["source"]["path"]}

    @compensate("ingest_to_bronze")
    def delete_bronze_partition(self, ctx: StepContext) -> dict[str, Any]:
        return bronze.delete_batch(self.services.lake.cursor(), self.spec(ctx),
                                   saga_id=ctx.saga_id, tag=self._tag(ctx, "delete_bronze_partition"))

    @action("process_to_silver", depends_on=["ingest_to_bronze"])
    def process_to_silver(self, ctx: StepContext) -> dict[str, Any]:
        before = self._before_snapshot(ctx)
        ctx.ensure_owner()
        result = silver.process(
            self.services.lake.cursor(), self.spec(ctx),
            partition_date=ctx.partition_date.isoformat(), saga_id=ctx.saga_id,
            stage=f"stage_{ctx.saga_id.replace('-', '')}", tag=self._tag(ctx),
        )
        return {**result, "before_snapshot": before,
                "snapshot_id": _snapshot(self.services.lake, self._tag(ctx))}

    @compensate("process_to_silver")
    def delete_silver_partition(self, ctx: StepContext) -> dict[str, Any]:
        return self._restore(ctx, silver_table(self.spec(ctx)), "delete_silver_partition")

    @action("aggregate_to_gold", depends_on=["process_to_silver"])
    def aggregate_to_gold(self, ctx: StepContext) -> dict[str, Any]:
        before = self._before_snapshot(ctx)
        ctx.ensure_owner()
        result = gold.aggregate(
            self.services.lake.cursor(), self.spec(ctx),
            partition_date=ctx.partition_date.isoformat(), saga_id=ctx.saga_id, tag=self._tag(ctx),
        )
        return {**result, "before_snapshot": before,
                "snapshot_id": _snapshot(self.services.lake, self._tag(ctx))}

    @compensate("aggregate_to_gold")
    def delete_gold_partition(self, ctx: StepContext) -> dict[str, Any]:
        return self._restore(ctx, gold_table(self.spec(ctx)), "delete_gold_partition")

    def _restore(self, ctx: StepContext, table: str, name: str) -> dict[str, Any]:
        if not ctx.checkpoint or "before_snapshot" not in ctx.checkpoint:
            return {"records_removed": 0, "note": "the step never wrote: nothing to undo"}
        return restore_partition(
            self.services.lake.cursor(), table, ctx.partition_date.isoformat(),
            int(ctx.checkpoint["before_snapshot"]), self._tag(ctx, name), name,
        )

    @action("update_catalog", depends_on=["aggregate_to_gold"])
    def update_catalog(self, ctx: StepContext) -> dict[str, Any]:
        db, spec = self.services.db, self.spec(ctx)
        if not ctx.checkpoint or "previous" not in ctx.checkpoint:
            ctx.save_checkpoint({"previous": current_entries(db, spec.name, ctx.partition_date)})
        ctx.ensure_owner()
        entries = self._catalog_entries(ctx, spec)
        replace_entries(db, spec.name, ctx.partition_date, entries, point=ctx.step,
                        saga_id=ctx.saga_id, epoch=ctx.epoch)
        registered = [f"{e['table_name']}/partition_date={ctx.partition_date}" for e in entries]
        return {"partitions_registered": registered}

    @compensate("update_catalog")
    def unregister_partitions(self, ctx: StepContext) -> dict[str, Any]:
        if not ctx.checkpoint or "previous" not in ctx.checkpoint:
            return {"entries_restored": 0, "note": "the step never wrote: nothing to undo"}
        previous = ctx.checkpoint["previous"]
        replace_entries(self.services.db, ctx.dataset, ctx.partition_date, previous,
                        point="unregister_partitions", saga_id=ctx.saga_id, epoch=ctx.epoch)
        return {"entries_restored": len(previous)}

    def _catalog_entries(self, ctx: StepContext, spec: DatasetSpec) -> list[dict[str, Any]]:
        b, s, g = (ctx.outputs[n] for n in
                   ("ingest_to_bronze", "process_to_silver", "aggregate_to_gold"))
        pd = ctx.partition_date.isoformat()
        cur = self.services.lake.cursor()
        bronze_rows, batches = _bronze_partition(cur, spec, ctx.partition_date)
        files = [{"path": f["path"], "sha256": f.get("sha256"), "size": f["size"]}
                 for f in ctx.manifest["files"]]
        return [
            {"layer": "bronze", "table_name": b["table"], "saga_id": ctx.saga_id,
             "rows": bronze_rows, "snapshot_id": b["snapshot_id"],
             "lineage": {"sources": files, "batches": batches}},
            {"layer": "silver", "table_name": s["table"], "saga_id": ctx.saga_id,
             "rows": s["records"], "snapshot_id": s["snapshot_id"],
             "lineage": {"upstream": [f"{b['table']}/partition_date={pd}"],
                         "upstream_snapshot": b["snapshot_id"], "batches": batches}},
            {"layer": "gold", "table_name": g["table"], "saga_id": ctx.saga_id,
             "rows": g["aggregated_records"], "snapshot_id": g["snapshot_id"],
             "lineage": {"upstream": [f"{s['table']}/partition_date={pd}"],
                         "upstream_snapshot": s["snapshot_id"],
                         "aggregations": g["aggregations"]}},
        ]

    @action("notify_downstream", depends_on=["update_catalog"])
    def notify_downstream(self, ctx: StepContext) -> dict[str, Any]:
        catalog = ctx.outputs["update_catalog"]["partitions_registered"]
        payload = {
            "event": PARTITION_READY,
            "saga_id": ctx.saga_id,
            "dataset": ctx.dataset,
            "partition_date": ctx.partition_date.isoformat(),
            "partitions": catalog,
            "records": {
                "bronze": ctx.outputs["ingest_to_bronze"]["records"],
                "silver": ctx.outputs["process_to_silver"]["records"],
                "gold": ctx.outputs["aggregate_to_gold"]["aggregated_records"],
            },
        }
        names = enqueue_for_dataset(self.services.db, ctx.saga_id, ctx.epoch, ctx.dataset,
                                    PARTITION_READY, payload)
        return {"consumers_notified": len(names), "consumers": names}


def _snapshot(lake: Lake, tag: str) -> int:
    """The snapshot the step's commit made; a commit that changed nothing (an empty batch, a
    partition that stays empty) makes none, and the data is then as of the current one."""
    found = snapshot_of(lake.cursor(), tag)
    return found if found is not None else lake.current_snapshot()


def _bronze_partition(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec,
                      partition_date: date) -> tuple[int, list[str]]:
    rows = cur.execute(
        f"SELECT _batch_id, count(*) FROM {bronze_table(spec)} "
        "WHERE partition_date = ? GROUP BY _batch_id ORDER BY min(_ingested_at)",
        [partition_date],
    ).fetchall()
    return sum(int(n) for _, n in rows), [str(b) for b, _ in rows]


#: The lake-writing steps and compensations: their transaction has before/after-commit points.
_LAKE_WRITERS = ("ingest_to_bronze", "process_to_silver", "aggregate_to_gold",
                 "delete_bronze_partition", "delete_silver_partition", "delete_gold_partition")
#: Steps and compensations whose writes go to the saga database in one transaction.
_DB_WRITERS = ("update_catalog", "unregister_partitions", "notify_downstream")


def fault_points() -> dict[str, list[str]]:
    """Every named fault point of the lakehouse saga, grouped as the crash matrix runs them.

    ``forward``: reached by a saga that succeeds; ``compensation``: reached by a saga whose
    ``update_catalog`` fails after writing (so every compensation has something to undo);
    ``delivery``: reached while delivering webhooks. docs/RELIABILITY.md lists the same points.
    """
    forward: list[str] = ["saga.claimed"]
    compensation: list[str] = ["saga.compensating"]
    for spec in LakehouseIngestionSaga.steps:
        forward += [spec.name, f"{spec.name}.before_record", f"{spec.name}.after_record"]
        if spec.name != "notify_downstream":
            forward.append(f"{spec.name}.after_checkpoint")
        if spec.compensation:
            name = spec.compensation
            compensation += [name, f"{name}.before_record", f"{name}.after_record"]
    for name in _LAKE_WRITERS + _DB_WRITERS:
        group = forward if name in LakehouseIngestionSaga.step_names() else compensation
        group += [f"{name}.before_commit", f"{name}.after_commit"]
    forward.append("saga.succeeded")
    compensation.append("saga.compensated")
    return {"forward": forward, "compensation": compensation,
            "delivery": ["webhook.before_send", "webhook.after_send"]}
