"""Lake table layouts per layer, created once per dataset and partitioned by date."""

from __future__ import annotations

import duckdb

from app.lakehouse.duck import LAKE, first_row, lake_write, rollback_quietly
from app.lakehouse.pipeline import DatasetSpec, quote

LAYERS = ("bronze", "silver", "gold")

#: Metadata columns of bronze: the batch (saga) a row arrived with, its file, and when.
BRONZE_META = [("_batch_id", "VARCHAR"), ("_source_file", "VARCHAR"), ("_ingested_at", "TIMESTAMP")]
#: Silver keeps the batch and file each row came from, and the saga that built the partition.
SILVER_META = [("_batch_id", "VARCHAR"), ("_source_file", "VARCHAR"), ("_saga_id", "VARCHAR")]
GOLD_COLUMNS = [
    ("aggregation", "VARCHAR"),
    ("dimension", "VARCHAR"),
    ("metric", "VARCHAR"),
    ("value", "DOUBLE"),
    ("_saga_id", "VARCHAR"),
]


def table(layer: str, name: str) -> str:
    return f"{LAKE}.{quote(layer)}.{quote(name)}"


def bronze_table(spec: DatasetSpec) -> str:
    return table("bronze", spec.bronze_table)


def silver_table(spec: DatasetSpec) -> str:
    return table("silver", spec.silver_table)


def gold_table(spec: DatasetSpec) -> str:
    return table("gold", spec.gold_table)


def layer_table(spec: DatasetSpec, layer: str) -> str:
    return {"bronze": bronze_table, "silver": silver_table, "gold": gold_table}[layer](spec)


def ensure_tables(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec) -> None:
    """Create the dataset's three tables if missing (idempotent, safe to race).

    Every bronze step calls this: when the tables exist (the usual case) it costs one catalog
    read, not a schema statement and a lookup per table (5 ms instead of 22 on a SQLite catalog).
    """
    layouts = {
        bronze_table(spec): [(c.name, "VARCHAR") for c in spec.columns] + BRONZE_META,
        silver_table(spec): [(c.name, c.type) for c in spec.columns] + SILVER_META,
        gold_table(spec): GOLD_COLUMNS,
    }
    existing = _existing_tables(cur)
    layouts = {name: cols for name, cols in layouts.items() if _unquoted(name) not in existing}
    if not layouts:
        return
    for layer in LAYERS:
        try:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {LAKE}.{quote(layer)}")
        except duckdb.TransactionException:
            # Another worker created it at the same moment (same race as the tables below).
            rollback_quietly(cur)
            row = first_row(cur.execute("SELECT count(*) FROM duckdb_schemas() "
                                        "WHERE database_name = ? AND schema_name = ?", [LAKE, layer]))
            if not (row and row[0]):
                raise
    for name, columns in layouts.items():
        cols = ", ".join(f"{quote(n)} {t}" for n, t in [("partition_date", "DATE"), *columns])
        try:
            with lake_write(cur, '{"step": "create_table"}', f"create {name}"):
                cur.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")
                cur.execute(f"ALTER TABLE {name} SET PARTITIONED BY (partition_date)")
        except duckdb.TransactionException:
            # Another worker created it at the same moment; a real failure shows next time.
            if not _table_exists(cur, name):
                raise


def _unquoted(name: str) -> str:
    """``lake."bronze"."raw_x"`` -> ``bronze.raw_x`` (names are validated: no quotes inside)."""
    return name.split(".", 1)[1].replace('"', "")


def _existing_tables(cur: duckdb.DuckDBPyConnection) -> set[str]:
    rows = cur.execute("SELECT schema_name || '.' || table_name FROM duckdb_tables() "
                       "WHERE database_name = ?", [LAKE]).fetchall()
    return {str(row[0]) for row in rows}


def _table_exists(cur: duckdb.DuckDBPyConnection, name: str) -> bool:
    return _unquoted(name) in _existing_tables(cur)


def replace_partition(cur: duckdb.DuckDBPyConnection, target: str, partition_date: str,
                      select_sql: str, params: list[object] | dict[str, object], tag: str,
                      message: str) -> int:
    """Replace one partition of ``target`` with the rows of ``select_sql``, in one lake commit.

    ``params`` are bound to ``select_sql`` (positional ``?`` or named ``$name``).

    Returns the number of rows written. Idempotent: a re-run computes the same partition.
    """
    with lake_write(cur, tag, message):
        cur.execute(f"DELETE FROM {target} WHERE partition_date = CAST(? AS DATE)",
                    [partition_date])
        cur.execute(f"INSERT INTO {target} {select_sql}", params)
        row = first_row(cur.execute(
            f"SELECT count(*) FROM {target} WHERE partition_date = CAST(? AS DATE)",
            [partition_date],
        ))
    return int(row[0]) if row else 0


def restore_partition(cur: duckdb.DuckDBPyConnection, target: str, partition_date: str,
                      before_snapshot: int, tag: str, message: str) -> dict[str, int]:
    """Put one partition back exactly as it was at ``before_snapshot`` (time travel).

    For a first ingestion that empties the partition; for a re-ingestion it brings back the
    previous good rows instead of destroying them. Idempotent.
    """
    with lake_write(cur, tag, message):
        removed = first_row(cur.execute(
            f"SELECT count(*) FROM {target} WHERE partition_date = CAST(? AS DATE)",
            [partition_date],
        ))
        cur.execute(f"DELETE FROM {target} WHERE partition_date = CAST(? AS DATE)",
                    [partition_date])
        cur.execute(
            f"INSERT INTO {target} SELECT * FROM {target} AT (VERSION => ?) "
            "WHERE partition_date = CAST(? AS DATE)",
            [int(before_snapshot), partition_date],
        )
        restored = first_row(cur.execute(
            f"SELECT count(*) FROM {target} WHERE partition_date = CAST(? AS DATE)",
            [partition_date],
        ))
    return {
        "records_removed": int(removed[0]) if removed else 0,
        "records_restored": int(restored[0]) if restored else 0,
        "restored_to_snapshot": int(before_snapshot),
    }
