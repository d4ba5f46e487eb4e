"""Silver: the partition rebuilt from every bronze batch of it: deduplicated on the dataset's
key, typed, validated, nulls filled. Counts of what was cleaned come from the same staged rows
that are written, so the metrics and the table can never disagree."""

from __future__ import annotations

from typing import Any

import duckdb

from app.lakehouse.duck import first_row, write_guard
from app.lakehouse.pipeline import DatasetSpec, quote
from app.lakehouse.tables import bronze_table, replace_partition, silver_table

#: How a rule (operator SQL) refers to the partition's date: a bound parameter, never a literal.
PARTITION_DATE = "CAST($partition_date AS DATE)"


def staging_params(spec: DatasetSpec, partition_date: str) -> dict[str, Any]:
    """The values ``staging_sql`` binds: the partition date and each column's fill default."""
    params: dict[str, Any] = {"partition_date": partition_date}
    for i, c in enumerate(spec.columns):
        if c.fill is not None:
            fill = c.fill
            params[f"fill_{i}"] = fill if isinstance(fill, bool | int | float | str) else str(fill)
    return params


def staging_sql(spec: DatasetSpec) -> str:
    """One row per bronze row with its typed, filled values and why it would be dropped.

    Names are validated and quoted, types come from ``ALLOWED_TYPES``; values are bound
    (``staging_params``). Rule predicates are operator SQL from the spec files.
    """
    key = ", ".join(quote(k) for k in spec.dedupe_key)
    key_present = " AND ".join(f"{quote(k)} IS NOT NULL" for k in spec.dedupe_key)
    typed = ", ".join(
        f"TRY_CAST({quote(c.name)} AS {c.type}) AS {quote(c.name)}" for c in spec.columns
    )
    cast_failed = " OR ".join(
        f"({quote(c.name)} IS NOT NULL AND TRY_CAST({quote(c.name)} AS {c.type}) IS NULL)"
        for c in spec.columns
    ) or "FALSE"
    filled = ", ".join(
        f"coalesce({quote(c.name)}, CAST($fill_{i} AS {c.type})) AS {quote(c.name)}"
        if c.fill is not None else quote(c.name)
        for i, c in enumerate(spec.columns)
    )
    nulls = " + ".join(
        f"CAST({quote(c.name)} IS NULL AS INTEGER)" for c in spec.columns if c.fill is not None
    ) or "0"
    missing = " OR ".join(f"{quote(c.name)} IS NULL" for c in spec.columns if c.required) or "FALSE"
    rules = " AND ".join(
        f"coalesce(({r.check.replace('{partition_date}', PARTITION_DATE)}), FALSE)"
        for r in spec.rules
    ) or "TRUE"
    return f"""
WITH raw AS (
    SELECT *, ({cast_failed}) AS _cast_failed,
           CASE WHEN {key_present} THEN row_number() OVER (
               PARTITION BY {key} ORDER BY _ingested_at, _batch_id, _source_file) END AS _copy
    FROM {bronze_table(spec)} WHERE partition_date = {PARTITION_DATE}
), typed AS (
    SELECT {typed}, _batch_id, _source_file, _cast_failed, _copy FROM raw
), filled AS (
    SELECT {filled}, _batch_id, _source_file, coalesce(_copy > 1, FALSE) AS _duplicate,
           _cast_failed OR {missing} AS _unusable, {nulls} AS _nulls
    FROM typed
)
SELECT * EXCLUDE (_unusable), _unusable OR NOT ({rules}) AS _invalid FROM filled
"""


def process(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, *, partition_date: str,
            saga_id: str, stage: str, tag: str) -> dict[str, Any]:
    """Rebuild the silver partition from bronze; returns the cleaning metrics."""
    with write_guard(cur):
        return _process(cur, spec, partition_date=partition_date, saga_id=saga_id, stage=stage,
                        tag=tag)


def _process(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, *, partition_date: str,
             saga_id: str, stage: str, tag: str) -> dict[str, Any]:
    cur.execute(f"CREATE OR REPLACE TEMP TABLE {quote(stage)} AS {staging_sql(spec)}",
                staging_params(spec, partition_date))
    try:
        row = first_row(cur.execute(
            f"""SELECT count(*),
                       count(*) FILTER (WHERE _duplicate),
                       count(*) FILTER (WHERE NOT _duplicate AND _invalid),
                       coalesce(sum(_nulls) FILTER (WHERE NOT _duplicate AND NOT _invalid), 0)
                FROM {quote(stage)}"""
        ))
        assert row is not None
        records_in, duplicates, invalid, nulls = (int(v) for v in row)
        columns = ", ".join(quote(c.name) for c in spec.columns)
        written = replace_partition(
            cur, silver_table(spec), partition_date,
            f"SELECT CAST(? AS DATE), {columns}, _batch_id, _source_file, ? "
            f"FROM {quote(stage)} WHERE NOT _duplicate AND NOT _invalid",
            [partition_date, saga_id], tag, f"process_to_silver {spec.name} {partition_date}",
        )
    finally:
        cur.execute(f"DROP TABLE IF EXISTS {quote(stage)}")
    return {
        "records_in": records_in,
        "duplicates_removed": duplicates,
        "nulls_filled": nulls,
        "invalid_removed": invalid,
        "records": written,
        "retained_pct": round(100.0 * written / records_in, 1) if records_in else 0.0,
        "table": f"silver.{spec.silver_table}",
    }
