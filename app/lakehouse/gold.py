"""Gold: the dataset's aggregations over the silver partition, in one long table
(partition, aggregation, dimension, metric, value), replaced per partition in one commit."""

from __future__ import annotations

from typing import Any

import duckdb

from app.lakehouse.pipeline import DatasetSpec
from app.lakehouse.tables import gold_table, replace_partition, silver_table


def aggregate(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, *, partition_date: str,
              saga_id: str, tag: str) -> dict[str, Any]:
    silver = f"(SELECT * FROM {silver_table(spec)} WHERE partition_date = DATE '{partition_date}')"
    parts = [
        f"SELECT '{agg.name}' AS aggregation, CAST(dimension AS VARCHAR) AS dimension, "
        f"CAST(metric AS VARCHAR) AS metric, CAST(value AS DOUBLE) AS value "
        f"FROM ({agg.sql.replace('{silver}', silver)})"
        for agg in spec.aggregations
    ]
    written = replace_partition(
        cur, gold_table(spec), partition_date,
        f"SELECT CAST(? AS DATE), aggregation, dimension, metric, value, ? "
        f"FROM ({' UNION ALL '.join(parts)})",
        [partition_date, saga_id], tag, f"aggregate_to_gold {spec.name} {partition_date}",
    )
    return {
        "aggregations": [agg.name for agg in spec.aggregations],
        "aggregated_records": written,
        "table": f"gold.{spec.gold_table}",
    }
