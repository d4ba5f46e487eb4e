"""Spec SQL is checked when a spec is loaded: rules and aggregations may read their own rows and
``{silver}`` with built-in functions, and nothing else (``app/lakehouse/spec_sql.py``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from app.lakehouse import gold, silver
from app.lakehouse.duck import extension_path, load_extension
from app.lakehouse.pipeline import (
    BUILTIN_DIR,
    Aggregation,
    Column,
    DatasetSpec,
    Rule,
    SpecError,
    load_datasets,
)
from app.lakehouse.spec_sql import (
    AGGREGATION_SLOT,
    DENIED_FUNCTIONS,
    PARTITION_DATE_SQL,
    RULE_SLOT,
    SILVER_SQL,
    VALUE_KEYWORDS,
    SpecSQLError,
    allowed_functions,
    check_aggregation,
    check_rule,
)

COLUMNS = frozenset({"event_id", "event_type", "event_ts", "duration_ms", "tags"})
AGG = "SELECT 'd' AS dimension, 'm' AS metric, {value} AS value FROM {source}"

#: Every function that reaches files, the network, other SQL or the session: none is allowed,
#: as a call or as a FROM item. The scanners' functions are not even on the parser's
#: connection, the rest are denied by name.
DANGEROUS = [
    "sqlite_scan", "sqlite_query", "sqlite_attach", "postgres_scan", "postgres_scan_pushdown",
    "postgres_query", "postgres_execute", "postgres_attach", "ducklake_snapshots",
    "ducklake_table_info", "ducklake_list_files", "read_csv", "read_csv_auto", "read_json",
    "read_json_auto", "read_ndjson", "read_parquet", "read_text", "read_blob", "glob",
    "parquet_metadata", "query", "query_table", "getenv", "getvariable", "current_setting",
    "json_serialize_plan", "json_serialize_sql", "json_deserialize_sql",
    "json_execute_serialized_sql", "nextval", "currval", "setseed", "sleep_ms", "write_log",
    "version", "current_database", "current_schema", "current_query", "current_user",
    "session_user", "user", "duckdb_settings", "duckdb_secrets", "duckdb_extensions",
    "pragma_database_size", "get_block_size", "pg_sleep", "txid_current", "checkpoint",
]

RULE_ATTACKS = [
    ("(SELECT count(*) FROM sqlite_scan('/tmp/x.sqlite', 't')) > 0", "sqlite_scan"),
    ("EXISTS (SELECT 1 FROM postgres_scan('dbname=x', 'public', 't'))", "postgres_scan"),
    ("(SELECT count(*) FROM postgres_query('__ducklake_metadata_lake', 'SELECT 1')) > 0",
     "postgres_query"),
    ("(SELECT count(*) FROM postgres_execute('__ducklake_metadata_lake', 'DROP TABLE t')) > 0",
     "postgres_execute"),
    ("(SELECT count(*) FROM read_csv('/etc/passwd')) > 0", "read_csv"),
    ("EXISTS (FROM glob('/*'))", "glob"),
    ("getenv('HOME') IS NOT NULL", "getenv"),
    ("current_setting('allowed_directories') IS NULL", "current_setting"),
    ("json_serialize_plan('SELECT * FROM sqlite_scan(''/x'', ''t'')') IS NULL",
     "json_serialize_plan"),
    ("(SELECT count(*) FROM query('SELECT 1')) > 0", "query"),
    ("nextval('seq') > 0", "nextval"),
    ("list_aggr([duration_ms], 'getenv') > 0", "list_aggr"),
    ("(SELECT count(*) FROM raw) > 0", "'raw'"),
    ("(SELECT count(*) FROM lake.gold.clickstream_metrics) > 0", "lake.gold.clickstream_metrics"),
    ("(SELECT count(*) FROM __ducklake_metadata_lake.ducklake_snapshot) > 0",
     "__ducklake_metadata_lake.ducklake_snapshot"),
    ("(SELECT count(*) FROM '/etc/passwd') > 0", "'/etc/passwd'"),
    ("(SELECT count(*) FROM (DESCRIBE lake.gold.x)) > 0", "SHOW_REF"),
    ("(WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r) SELECT 1) = 1",
     "recursive CTE"),
    ("system.main.abs(duration_ms) > 0 AND pg_catalog.pg_typeof(1) = 'x'", "pg_catalog"),
    ("$partition_date = event_ts", "parameter"),
    ("? = event_ts", "parameter"),
    ("user = 'duckdb'", "user()"),
    ("\"CURRENT_USER\" = 'duckdb'", "current_user()"),
    # Statements and escapes from the predicate's slot.
    ("TRUE; ATTACH '/tmp/x.sqlite' AS x (TYPE sqlite)", "does not parse"),
    ("TRUE), FALSE); ATTACH '/tmp/x.sqlite' AS x (TYPE sqlite); SELECT coalesce((TRUE",
     "single SELECT"),
    ("TRUE), FALSE) OR (SELECT count(*) FROM read_csv('/x')) > 0 OR coalesce((TRUE",
     "not a single predicate"),
    ("TRUE), FALSE) GROUP BY ALL ORDER BY coalesce((1", "not a single predicate"),
    ("TRUE --", "does not parse"),
    ("TRUE /*", "does not parse"),
    ("'{partition_date}' = 'x'", "{partition_date} must stand on its own"),
    ("event_ts = /* {partition_date} */ event_ts", "{partition_date} must stand on its own"),
    ("\"{partition_date}\" IS NULL", "{partition_date} must stand on its own"),
    ("{partition_date}x IS NULL", "{partition_date} must stand on its own"),
    ("__lakesaga_silver__ IS NULL", "reserved name"),
]

AGGREGATION_ATTACKS = [
    (AGG.format(value="1", source="sqlite_scan('/tmp/x.sqlite', 't')"), "sqlite_scan"),
    (AGG.format(value="count(*)", source="{silver} s JOIN sqlite_scan('/x', 't') x ON TRUE"),
     "sqlite_scan"),
    (AGG.format(value="1", source="postgres_scan('dbname=x', 'pg_catalog', 'pg_class')"),
     "postgres_scan"),
    (AGG.format(value="1", source="postgres_query('__ducklake_metadata_lake', 'SELECT 1')"),
     "postgres_query"),
    (AGG.format(value="1", source="{silver}, postgres_execute('__ducklake_metadata_lake', "
                "'DROP TABLE ducklake.ducklake_snapshot')"), "postgres_execute"),
    (AGG.format(value="1", source="{silver}, LATERAL (SELECT * FROM read_text('/etc/passwd'))"),
     "read_text"),
    (AGG.format(value="count(*)", source="{silver}") + " UNION ALL "
     + AGG.format(value="1", source="read_csv('/etc/passwd')"), "read_csv"),
    (AGG.format(value="1", source="glob('/*')"), "glob"),
    (AGG.format(value="(SELECT count(*) FROM read_parquet('/x.parquet'))", source="{silver}"),
     "read_parquet"),
    (AGG.format(value="1", source="query_table('t')"), "query_table"),
    (AGG.format(value="1", source="unnest([1, 2])"), "unnest"),
    (AGG.format(value="1", source="range(3)"), "range"),
    (AGG.format(value="1", source="lake.silver.cleaned_clickstream"),
     "lake.silver.cleaned_clickstream"),
    (AGG.format(value="1", source="'secret.csv'"), "'secret.csv'"),
    (AGG.format(value="1", source="(SUMMARIZE {silver})"), "SHOW_REF"),
    (AGG.format(value="1", source="{silver} PIVOT (sum(duration_ms) FOR event_type IN ('a'))"),
     "PIVOT"),
    ("WITH s AS (SELECT * FROM read_csv('/x')) " + AGG.format(value="1", source="s"), "read_csv"),
    # A CTE is only visible after its definition and inside its own query.
    ("WITH a AS (SELECT * FROM b), b AS (SELECT * FROM {silver}) "
     + AGG.format(value="1", source="a"), "'b'"),
    (AGG.format(value="1", source="(WITH s AS (SELECT 1) SELECT * FROM s) AS x, s"), "'s'"),
    (AGG.format(value="1", source="{silver}") + "); ATTACH '/tmp/x.sqlite' AS y (TYPE sqlite); "
     "SELECT (1", "single SELECT"),
    (AGG.format(value="1", source="{silver}") + ")); ATTACH '/tmp/x.sqlite' AS y (TYPE sqlite); "
     "SELECT ((1", "does not parse"),
    (AGG.format(value="1", source="{silver}") + ") UNION ALL (SELECT 'y', 'm', 1",
     "not a single SELECT"),
    (AGG.format(value="1", source="{silver}") + " -- a comment", "does not parse"),
    (AGG.format(value="1", source="'{silver}'"), "{silver} must stand on its own"),
    (AGG.format(value="1", source="\"{silver}\""), "{silver} must stand on its own"),
    (AGG.format(value="1", source="{silver}x"), "{silver} must stand on its own"),
    (AGG.format(value="current_schema", source="{silver}"), "current_schema()"),
]

ACCEPTED_RULES = [
    "event_type IN ('page_view', 'click')",
    "CAST(event_ts AS DATE) = {partition_date}",
    "CAST(event_ts AS DATE) BETWEEN {partition_date} - INTERVAL 1 DAY AND {partition_date}",
    "duration_ms >= 0 AND duration_ms < 86400000",
    "coalesce(length(event_id), 0) BETWEEN 1 AND 64",
    "regexp_matches(event_id, '^[a-z0-9-]+$') AND lower(event_type) = event_type",
    "CASE WHEN event_type = 'purchase' THEN duration_ms > 0 ELSE TRUE END",
    "event_ts <= current_timestamp AND event_ts > now() - INTERVAL 365 DAY",
    "list_sum(list_transform([duration_ms, 1], x -> x * 2)) >= 0",
    "event_type IN (SELECT * FROM (VALUES ('click'), ('search')) AS v(t))",
    "(WITH k AS (SELECT 1 AS n) SELECT max(n) FROM k) = 1",
    "json_extract_string('{\"a\": 1}', '$.a') = '1' AND nullif(event_type, '') IS NOT NULL",
    "strftime(event_ts, '%Y') >= '2000' AND date_trunc('day', event_ts) <= event_ts",
    "main.abs(duration_ms) >= 0 AND [1, 2][1] = 1 AND {'a': 1}.a = 1",
]

ACCEPTED_AGGREGATIONS = [
    "SELECT event_type AS dimension, 'events' AS metric, count(*) AS value FROM {silver} "
    "GROUP BY event_type",
    "WITH s AS (SELECT * FROM {silver} WHERE duration_ms > 0), t AS (SELECT * FROM s) "
    "SELECT event_type AS dimension, 'm' AS metric, avg(duration_ms) AS value FROM t GROUP BY 1",
    "SELECT a.event_type AS dimension, 'pairs' AS metric, count(*) AS value FROM {silver} a "
    "JOIN {silver} b USING (event_id) GROUP BY ALL",
    "SELECT event_type AS dimension, 'rank' AS metric, row_number() OVER (PARTITION BY "
    "event_type ORDER BY event_ts) AS value FROM {silver} QUALIFY value = 1",
    "SELECT 'all' AS dimension, 'share' AS metric, count(*) / (SELECT count(*) FROM {silver}) "
    "AS value FROM {silver} WHERE event_id IN (FROM {silver} SELECT event_id)",
    "SELECT event_type AS dimension, 'p90' AS metric, quantile_cont(duration_ms, 0.9) AS value "
    "FROM {silver} GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT 10",
    "SELECT d AS dimension, 'm' AS metric, 1 AS value FROM (VALUES ('x')) AS v(d) UNION ALL "
    "SELECT event_type, 'n', count(*) FILTER (WHERE duration_ms > 0) FROM {silver} GROUP BY 1",
    "SELECT unnest(['a', 'b']) AS dimension, 'm' AS metric, 1 AS value",
]


def _refused(check: Any, sql: str) -> str:
    with pytest.raises(SpecSQLError) as caught:
        check(sql, COLUMNS)
    return str(caught.value)


@pytest.mark.parametrize(("check", "construct"), RULE_ATTACKS)
def test_check_rule__refuses_reaching_outside_its_row(check: str, construct: str) -> None:
    assert construct in _refused(check_rule, check)


@pytest.mark.parametrize(("sql", "construct"), AGGREGATION_ATTACKS)
def test_check_aggregation__refuses_reaching_beyond_silver(sql: str, construct: str) -> None:
    assert construct in _refused(check_aggregation, sql)


@pytest.mark.parametrize("check", ACCEPTED_RULES)
def test_check_rule__accepts_ordinary_predicates(check: str) -> None:
    check_rule(check, COLUMNS)


@pytest.mark.parametrize("sql", ACCEPTED_AGGREGATIONS)
def test_check_aggregation__accepts_ordinary_aggregations(sql: str) -> None:
    check_aggregation(sql, COLUMNS)


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_functions__are_refused_as_calls_and_in_from(name: str) -> None:
    assert name not in allowed_functions()
    assert name in _refused(check_rule, f"{name}('x') IS NULL")
    assert name in _refused(check_aggregation, AGG.format(value="1", source=f"{name}('x')"))


def test_allowed_functions__exclude_every_function_the_lake_extensions_bring() -> None:
    plain = duckdb.connect()
    before = {n for (n,) in plain.execute("SELECT function_name FROM duckdb_functions()").fetchall()}
    for name in ("ducklake", "sqlite_scanner", "postgres_scanner"):
        if extension_path(name) is None:
            pytest.skip(f"no {name} wheel")
        load_extension(plain, name)
    after = {n for (n,) in plain.execute("SELECT function_name FROM duckdb_functions()").fetchall()}
    added = after - before
    assert {"sqlite_scan", "postgres_scan", "postgres_execute", "ducklake_snapshots"} <= added
    assert not added & allowed_functions()


def test_allowed_functions__are_built_in_and_not_denied() -> None:
    allowed = allowed_functions()
    assert {"count", "count_star", "sum", "row_number", "lpad", "hour", "list_value", "nullif",
            "current_date", "get_current_timestamp", "+", "~~"} <= allowed
    assert not allowed & DENIED_FUNCTIONS
    tables = {n for (n,) in duckdb.connect().execute(
        "SELECT function_name FROM duckdb_functions() WHERE function_type IN "
        "('table', 'table_macro', 'pragma') AND function_name NOT IN (SELECT function_name "
        "FROM duckdb_functions() WHERE function_type IN ('scalar', 'aggregate'))").fetchall()}
    assert allowed & tables == {"unnest", "unlist"} & tables


def test_value_keywords__are_every_bare_name_duckdb_binds_as_a_call() -> None:
    # A column reference with no such column becomes a function call for exactly these names.
    con = duckdb.connect()
    names = {n for (n,) in con.execute("SELECT DISTINCT function_name FROM duckdb_functions() "
                                       "WHERE function_name SIMILAR TO '[a-z_]+'").fetchall()}
    names |= set(VALUE_KEYWORDS) | {"localtime", "now", "today", "pi", "random"}
    bound = set()
    for name in sorted(names):
        try:
            con.execute(f'SELECT "{name}"')
            bound.add(name)
        except duckdb.Error:
            pass
    assert bound == set(VALUE_KEYWORDS)


def _spec(rules: tuple[Rule, ...] = (), aggregations: tuple[Aggregation, ...] = ()) -> DatasetSpec:
    return DatasetSpec("probe", "", (Column("event_id", "VARCHAR"), Column("tags", "VARCHAR")),
                       ("event_id",), rules, aggregations or (
                           Aggregation("n", AGG.format(value="count(*)", source="{silver}")),))


def test_pipeline__pastes_rules_and_aggregations_into_the_checked_slots(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The checker parses each text inside the slot the pipeline pastes it into; if silver.py
    # or gold.py changes how, this fails and spec_sql.py must follow.
    rule = "tags IS NULL OR CAST(event_id AS DATE) = {partition_date}"
    sql = "SELECT tags AS dimension, 'm' AS metric, count(*) AS value FROM {silver} GROUP BY 1"
    spec = _spec((Rule("r", rule),), (Aggregation("a", sql),))
    pasted = rule.replace("{partition_date}", silver.PARTITION_DATE)
    assert RULE_SLOT[0] + pasted + RULE_SLOT[1] in silver.staging_sql(spec)
    shell = re.escape(PARTITION_DATE_SQL).replace(re.escape("DATE '2000-01-01'"), r"\$\w+")
    assert re.fullmatch(shell, silver.PARTITION_DATE)

    captured: list[str] = []
    monkeypatch.setattr(gold, "replace_partition",
                        lambda _cur, _table, _date, select, *_: captured.append(select) or 0)
    gold.aggregate(None, spec, partition_date="2026-01-06", saga_id="s", tag="t")  # type: ignore[arg-type]
    before, after = sql.split("{silver}")
    match = re.search(re.escape(AGGREGATION_SLOT[0] + before) + r"(\(SELECT \* FROM .+?\))"
                      + re.escape(after + AGGREGATION_SLOT[1]), captured[0])
    assert match and SILVER_SQL.startswith("(SELECT * FROM ")


def test_dataset_spec__refusal_names_dataset_item_and_construct(tmp_path: Path) -> None:
    spec = yaml.safe_load((BUILTIN_DIR / "clickstream.yaml").read_text())
    spec["name"] = "evil"
    spec["rules"].append({"name": "leak", "check": RULE_ATTACKS[0][0]})
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=r"^dataset evil: rule leak: calls table function "
                                        r"sqlite_scan\(\)"):
        load_datasets(tmp_path)
    # However a spec is built, its SQL is checked.
    with pytest.raises(SpecError, match="aggregation x: .*postgres_query"):
        _spec(aggregations=(Aggregation("x", AGGREGATION_ATTACKS[3][0]),))


def test_builtin_datasets__load() -> None:
    spec = load_datasets(None)["clickstream"]
    assert len(spec.rules) == 3 and len(spec.aggregations) == 4
