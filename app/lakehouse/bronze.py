"""Bronze: raw rows exactly as received (every value kept as text) plus batch metadata.

Append-only: a saga's rows carry ``_batch_id = saga id``; a re-run replaces only its own batch and
compensation deletes only its own batch, so other ingestions of the partition are never touched.
DuckDB reads the files through the descriptors ``PinnedSources`` verified (app/lakehouse/
pinned.py), never by name, and infers nothing from their paths: ``hive_partitioning`` is off
for every reader (a file under ``event_type=purchase/`` keeps the ``event_type`` it holds), the
compression is given, not guessed, and the only column added is ``_source_path``.
"""

from __future__ import annotations

from typing import Any

import duckdb

from app.lakehouse.duck import first_row, lake_write
from app.lakehouse.pinned import IngestLimitExceeded, PinnedSources, compression_of
from app.lakehouse.pipeline import DatasetSpec, quote
from app.lakehouse.tables import bronze_table
from app.saga.errors import PermanentError

#: Table functions reading a file list bound as ``{files}`` (and the JSON columns as
#: ``$columns``), all compressed as ``{compression}``. DuckDB expands each listed path as a
#: glob; the ``/proc/self/fd/N`` paths bronze passes have no glob characters, and the
#: connection's ``allowed_directories`` confine what the file behind each can be.
READERS = {
    "json": "read_json({files}, format='newline_delimited', columns=$columns, "
            "compression='{compression}', hive_partitioning=false, filename='_source_path')",
    "csv": "read_csv({files}, all_varchar=true, union_by_name=true, "
           "compression='{compression}', hive_partitioning=false, filename='_source_path')",
    "parquet": "read_parquet({files}, union_by_name=true, hive_partitioning=false, "
               "filename='_source_path')",
}


def reader_sql(fmt: str, files: str = "$files", compression: str = "uncompressed") -> str:
    if fmt not in READERS:
        raise PermanentError(f"unsupported source format {fmt!r}")
    return READERS[fmt].format(files=files, compression=compression)


def _readers(fmt: str, sources: PinnedSources) -> tuple[str, dict[str, object]]:
    """The FROM clause reading every pinned file (one reader per compression) and its
    parameters."""
    groups: dict[str, list[str]] = {}
    for pinned in sources.files:
        kind = "uncompressed" if fmt == "parquet" else compression_of(pinned.name)
        groups.setdefault(kind, []).append(pinned.reader_path)
    params: dict[str, object] = {f"files_{kind}": paths for kind, paths in groups.items()}
    selects = [f"SELECT * FROM {reader_sql(fmt, f'$files_{kind}', kind)}" for kind in groups]
    return "(" + " UNION ALL BY NAME ".join(selects) + ")", params


def ingest(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, sources: PinnedSources, *,
           fmt: str, partition_date: str, saga_id: str, tag: str,
           max_rows: int | None = None) -> dict[str, Any]:
    """Write this saga's batch (replacing any earlier attempt of it) in one lake commit.

    The rows come from the pinned descriptors only; ``sources.check()`` before and after the
    read (inside the transaction) refuses the batch if any file changed meanwhile. At most
    ``max_rows`` rows are read (one more, to tell that there were more).
    """
    cols = ", ".join(f"CAST({quote(c.name)} AS VARCHAR)" for c in spec.columns)
    target = bronze_table(spec)
    source, params = _readers(fmt, sources)
    params.update({"partition_date": partition_date, "saga_id": saga_id,
                   "paths": [p.reader_path for p in sources.files],
                   "names": [p.name for p in sources.files]})
    if fmt == "json":
        params["columns"] = {c.name: "VARCHAR" for c in spec.columns}
    limit = ""
    if max_rows is not None:
        limit, params["limit"] = " LIMIT $limit", max_rows + 1
    with lake_write(cur, tag, f"ingest_to_bronze {spec.name} {partition_date}"):
        cur.execute(f"DELETE FROM {target} WHERE _batch_id = ?", [saga_id])
        sources.check()
        try:
            cur.execute(
                f"INSERT INTO {target} SELECT CAST($partition_date AS DATE), {cols}, $saga_id, "
                f"$names[list_position($paths, _source_path)], now()::TIMESTAMP "
                f"FROM {source}{limit}",
                params,
            )
        except duckdb.Error as exc:
            sources.check()  # a file replaced meanwhile is the error to report
            raise type(exc)(sources.relative(str(exc))) from None
        row = first_row(cur.execute(
            f"SELECT count(*) FROM {target} WHERE _batch_id = ?", [saga_id]
        ))
        records = int(row[0]) if row else 0
        if max_rows is not None and records > max_rows:
            raise IngestLimitExceeded(
                f"the source holds more than {max_rows} rows, the most one saga may ingest "
                "(LAKESAGA_MAX_INGEST_ROWS); split it into smaller sagas")
        sources.check()
    return {"files": len(sources.files), "records": records,
            "table": f"bronze.{spec.bronze_table}"}


def delete_batch(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, *, saga_id: str,
                 tag: str) -> dict[str, Any]:
    """Compensation: remove this saga's batch, and nothing else. Idempotent."""
    target = bronze_table(spec)
    with lake_write(cur, tag, f"delete_bronze_partition {spec.name}"):
        row = first_row(cur.execute(f"SELECT count(*) FROM {target} WHERE _batch_id = ?", [saga_id]))
        cur.execute(f"DELETE FROM {target} WHERE _batch_id = ?", [saga_id])
    return {"records_removed": int(row[0]) if row else 0}
