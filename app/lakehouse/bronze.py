"""Bronze: raw rows exactly as received (every value kept as text) plus batch metadata.

Append-only: a saga's rows carry ``_batch_id = saga id``; a re-run replaces only its own batch and
compensation deletes only its own batch, so other ingestions of the partition are never touched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import duckdb

from app.lakehouse.duck import first_row, lake_write
from app.lakehouse.pipeline import DatasetSpec, quote
from app.lakehouse.tables import bronze_table
from app.saga.errors import PermanentError

READERS = {
    "json": "read_json(?, format='newline_delimited', columns={columns}, filename='_source_path')",
    "csv": "read_csv(?, all_varchar=true, union_by_name=true, filename='_source_path')",
    "parquet": "read_parquet(?, union_by_name=true, filename='_source_path')",
}


class SourceChanged(PermanentError):
    """A source file differs from the manifest frozen when the saga was accepted."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_manifest(root: Path, manifest: dict[str, Any],
                    known_hashes: dict[str, str]) -> dict[str, str]:
    """Check every file against the frozen manifest; return the sha256 of each file.

    Files hashed at accept time are checked against that hash; others against ``known_hashes``
    (recorded by an earlier attempt of this step), or hashed now for the first time.
    """
    hashes: dict[str, str] = {}
    root = root.resolve()
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.resolve().is_relative_to(root):
            raise SourceChanged(f"source file {entry['path']} now resolves outside the source root")
        if not path.is_file():
            raise SourceChanged(f"source file {entry['path']} disappeared after the saga was accepted")
        info = path.stat()
        if info.st_size != entry["size"] or info.st_mtime != entry["mtime"]:
            raise SourceChanged(
                f"source file {entry['path']} changed after the saga was accepted "
                f"(size {entry['size']} -> {info.st_size})"
            )
        digest = sha256_file(path)
        expected = entry.get("sha256") or known_hashes.get(entry["path"])
        if expected and digest != expected:
            raise SourceChanged(f"source file {entry['path']} changed after the saga was accepted")
        hashes[entry["path"]] = digest
    return hashes


def reader_sql(spec: DatasetSpec, fmt: str) -> str:
    if fmt not in READERS:
        raise PermanentError(f"unsupported source format {fmt!r}")
    columns = "{" + ", ".join(f"'{c.name}': 'VARCHAR'" for c in spec.columns) + "}"
    return READERS[fmt].format(columns=columns)


def ingest(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, *, root: Path, files: list[str],
           fmt: str, partition_date: str, saga_id: str, tag: str) -> dict[str, Any]:
    """Write this saga's batch (replacing any earlier attempt of it) in one lake commit."""
    paths = [str(root / f) for f in files]
    prefix = str(root).rstrip("/") + "/"
    cols = ", ".join(f"CAST({quote(c.name)} AS VARCHAR)" for c in spec.columns)
    target = bronze_table(spec)
    with lake_write(cur, tag, f"ingest_to_bronze {spec.name} {partition_date}"):
        cur.execute(f"DELETE FROM {target} WHERE _batch_id = ?", [saga_id])
        cur.execute(
            f"INSERT INTO {target} SELECT CAST(? AS DATE), {cols}, ?, "
            f"replace(_source_path, ?, ''), now()::TIMESTAMP FROM {reader_sql(spec, fmt)}",
            [partition_date, saga_id, prefix, paths],
        )
        row = first_row(cur.execute(
            f"SELECT count(*) FROM {target} WHERE _batch_id = ?", [saga_id]
        ))
    records = int(row[0]) if row else 0
    return {"files": len(files), "records": records, "table": f"bronze.{spec.bronze_table}"}


def delete_batch(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, *, saga_id: str,
                 tag: str) -> dict[str, Any]:
    """Compensation: remove this saga's batch, and nothing else. Idempotent."""
    target = bronze_table(spec)
    with lake_write(cur, tag, f"delete_bronze_partition {spec.name}"):
        row = first_row(cur.execute(f"SELECT count(*) FROM {target} WHERE _batch_id = ?", [saga_id]))
        cur.execute(f"DELETE FROM {target} WHERE _batch_id = ?", [saga_id])
    return {"records_removed": int(row[0]) if row else 0}
