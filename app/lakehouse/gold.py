"""Gold: the dataset's aggregations over the silver partition, in one long table
(partition, aggregation, dimension, metric, value), replaced per partition in one commit."""

from __future__ import annotations

from typing import Any

import duckdb

from app.lakehouse.pipeline import DatasetSpec
from app.lakehouse.tables import gold_table, replace_partition, silver_table


def aggregate(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, *, partition_date: str,
              saga_id: str, tag: str) -> dict[str, Any]:
    # The aggregation SQL is operator text from the spec files; every value is bound.
    silver = (f"(SELECT * FROM {silver_table(spec)} "
              "WHERE partition_date = CAST($partition_date AS DATE))")
    parts = [
        f"SELECT CAST($aggregation_{i} AS VARCHAR) AS aggregation, "
        f"CAST(dimension AS VARCHAR) AS dimension, "
        f"CAST(metric AS VARCHAR) AS metric, CAST(value AS DOUBLE) AS value "
        f"FROM ({agg.sql.replace('{silver}', silver)})"
        for i, agg in enumerate(spec.aggregations)
    ]
    params: dict[str, object] = {"partition_date": partition_date, "saga_id": saga_id}
    params.update({f"aggregation_{i}": agg.name for i, agg in enumerate(spec.aggregations)})
    written = replace_partition(
        cur, gold_table(spec), partition_date,
        f"SELECT CAST($partition_date AS DATE), aggregation, dimension, metric, value, $saga_id "
        f"FROM ({' UNION ALL '.join(parts)})",
        params, tag, f"aggregate_to_gold {spec.name} {partition_date}",
    )
    return {
        "aggregations": [agg.name for agg in spec.aggregations],
        "aggregated_records": written,
        "table": f"gold.{spec.gold_table}",
    }
