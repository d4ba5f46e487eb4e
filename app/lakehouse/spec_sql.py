"""The allowlist for spec SQL: rule predicates and gold aggregations are parsed by DuckDB's own
parser (``json_serialize_sql``, on a plain in-memory connection) and their syntax tree walked
before a spec is accepted.

The lake connection carries the scanner its DuckLake catalog needs, and that scanner ignores
``enable_external_access`` (``sqlite_scan`` opens any SQLite file, ``postgres_scan`` any DSN,
``postgres_execute`` runs any SQL on the catalog database), so the connection's sandbox alone
does not confine spec SQL. Accepted: one SELECT reading only
``{silver}`` (and CTEs of its own), with DuckDB's built-in scalar, aggregate and window
functions less those that reach files, the network, the session or global state. Refused:
every other table, table function, PIVOT, DESCRIBE/SUMMARIZE, recursive CTE, parameter, and
any text that does not stay in its slot of the query the pipeline builds.

Each text is parsed in the very context the pipeline pastes it into (silver.py's
``coalesce((<check>), FALSE)``, gold.py's ``FROM (<sql>)``, ``{silver}`` as a subquery), so
what is checked is what runs; ``tests/unit/test_spec_sql.py`` pins those two contexts.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import duckdb

SILVER = "{silver}"
PARTITION_DATE = "{partition_date}"
#: The text around a rule in ``silver.staging_sql`` and around an aggregation in
#: ``gold.aggregate``: each is parsed inside the same, so it cannot close it and go on.
RULE_SLOT = ("coalesce((", "), FALSE)")
AGGREGATION_SLOT = ("FROM (", ")")
#: What a placeholder becomes for parsing: the runtime shapes (a subquery; ``CAST(... AS DATE)``
#: around a DATE literal where the pipeline binds ``$partition_date``), over a sentinel table
#: that no spec may name.
_SILVER_TABLE = "__lakesaga_silver__"
SILVER_SQL = f"(SELECT * FROM {_SILVER_TABLE})"
PARTITION_DATE_SQL = "CAST(DATE '2000-01-01' AS DATE)"
#: The rows a rule is evaluated on, and a stand-in used to locate placeholders in the text.
_ROWS_TABLE = "__lakesaga_rows__"
_MARK = "__lakesaga_placeholder__"
_RESERVED = (_SILVER_TABLE, _ROWS_TABLE, _MARK)
_RULE_PREFIX = f"SELECT 1 FROM {_ROWS_TABLE} WHERE {RULE_SLOT[0]}"
_AGGREGATION_PREFIX = f"SELECT * {AGGREGATION_SLOT[0]}"

_CTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

#: Built-in functions that read files, connect out, execute or plan other SQL, reveal the
#: session or the host, or change global state. Refused even if a DuckDB release lists them as
#: scalar or aggregate functions.
DENIED_FUNCTIONS = frozenset({
    "query", "query_table", "getenv", "getvariable", "current_setting", "current_query",
    "current_database", "current_catalog", "current_schema", "current_schemas", "current_user",
    "current_role", "session_user", "user", "version", "in_search_path", "get_block_size",
    "nextval", "currval", "setseed", "sleep_ms", "write_log", "stats", "vector_type",
    "parse_duckdb_log_message", "json_serialize_plan", "json_serialize_sql",
    "json_deserialize_sql", "json_execute_serialized_sql", "glob", "checkpoint",
    "force_checkpoint",
})
DENIED_PREFIXES = (
    "read_", "glob", "sqlite_", "postgres_", "mysql_", "ducklake_", "duckdb_", "pragma_",
    "parquet_", "iceberg_", "delta_", "http", "current_", "pg_", "has_", "inet_", "txid_",
    "json_serialize", "json_deserialize", "json_execute", "__internal",
)
#: ``current_*`` clocks, which are fine.
_CLOCKS = frozenset({"current_date", "current_localtime", "current_localtimestamp"})
#: Function-like SQL forms the parser emits under names ``duckdb_functions()`` lists only as
#: table functions (``SELECT unnest(list)`` expands a list; ``FROM unnest(...)`` stays refused).
_SQL_FORMS = frozenset({"unnest", "unlist"})
#: Functions that call an aggregate named by a string argument.
_BY_NAME = frozenset({"list_aggr", "list_aggregate", "array_aggr", "array_aggregate",
                      "aggregate"})
#: DuckDB's binder turns an unresolved column of these names into a call of the function
#: (``GetSQLValueFunctionName``): the parse shows a COLUMN_REF, so they are checked there.
VALUE_KEYWORDS = {
    "current_catalog": "current_catalog", "current_date": "current_date",
    "current_role": "current_role", "current_schema": "current_schema",
    "current_time": "get_current_time", "current_timestamp": "get_current_timestamp",
    "current_user": "current_user", "localtime": "current_localtime",
    "localtimestamp": "current_localtimestamp", "session_user": "session_user", "user": "user",
}

_EXPRESSIONS = frozenset({
    "CONSTANT", "COLUMN_REF", "FUNCTION", "OPERATOR", "COMPARISON", "CONJUNCTION", "CASE",
    "CAST", "BETWEEN", "COLLATE", "STAR", "SUBQUERY", "WINDOW", "LAMBDA", "LAMBDA_REF",
    "POSITIONAL_REFERENCE",
})
_QUERIES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE"})
#: FROM items besides a base table: nested, joined, VALUES lists and no FROM at all.
_FROM_ITEMS = frozenset({"SUBQUERY", "JOIN", "EXPRESSION_LIST", "EMPTY"})


class SpecSQLError(ValueError):
    """Spec SQL does not parse, or uses a construct outside the allowlist."""


def is_denied(name: str) -> bool:
    name = name.lower()
    return name in DENIED_FUNCTIONS or (name.startswith(DENIED_PREFIXES) and name not in _CLOCKS)


@functools.cache
def allowed_functions() -> frozenset[str]:
    """DuckDB's built-in scalar and aggregate functions (window functions are aggregates
    there) and the ``main`` schema's built-in macros, less the denied ones.

    Read from a connection with no extension loaded, so no scanner's function is on it."""
    with _lock:
        rows = _parser().execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() "
            "WHERE function_type IN ('scalar', 'aggregate') "
            "OR (function_type = 'macro' AND schema_name = 'main')").fetchall()
    names = {name.lower() for (name,) in rows} | _SQL_FORMS
    return frozenset(name for name in names if not is_denied(name))


def check_rule(check: str, columns: frozenset[str]) -> None:
    """Refuse a rule predicate that is more than an expression over its row."""
    _guarded(_check_rule, check, columns)


def check_aggregation(sql: str, columns: frozenset[str]) -> None:
    """Refuse an aggregation that is more than one SELECT over ``{silver}``."""
    _guarded(_check_aggregation, sql, columns)


def _guarded(check: Callable[[str, frozenset[str]], None], sql: str,
             columns: frozenset[str]) -> None:
    try:
        check(sql, columns)
    except RecursionError:
        raise SpecSQLError("is nested too deeply") from None


def _check_rule(check: str, columns: frozenset[str]) -> None:
    text = _substitute(check, PARTITION_DATE, PARTITION_DATE_SQL)
    statement = _parse(_RULE_PREFIX + text + RULE_SLOT[1])
    node = statement["node"]
    where = node.get("where_clause") or {}
    children = where.get("children") or [{}]
    if not (_bare_select(node, where=True) and len(node["select_list"]) == 1
            and node["from_table"].get("table_name") == _ROWS_TABLE
            and where.get("type") == "OPERATOR_COALESCE"
            and _located_nowhere(children[-1]) == _false()):
        raise SpecSQLError("is not a single predicate: it reaches outside its place in the query")
    _Walker(frozenset({_ROWS_TABLE}), columns).walk(node, frozenset())


def _check_aggregation(sql: str, columns: frozenset[str]) -> None:
    text = _substitute(sql, SILVER, SILVER_SQL)
    statement = _parse(_AGGREGATION_PREFIX + text + AGGREGATION_SLOT[1])
    node = statement["node"]
    if not (_bare_select(node, where=False) and node["from_table"].get("type") == "SUBQUERY"
            and not node["from_table"].get("alias")):
        raise SpecSQLError("is not a single SELECT: it reaches outside its place in the query")
    _Walker(frozenset({_SILVER_TABLE}), columns).walk(node, frozenset())


def _bare_select(node: dict[str, Any], *, where: bool) -> bool:
    """Is ``node`` the wrapper's own SELECT, with nothing the spec text could have added?"""
    return (node.get("type") == "SELECT_NODE" and not node["cte_map"]["map"]
            and not node["modifiers"] and not node["group_expressions"]
            and not node["group_sets"] and node["having"] is None and node["qualify"] is None
            and node["sample"] is None and (node["where_clause"] is not None) == where)


@functools.cache
def _false() -> Any:
    """``FALSE`` as the parser writes it (a cast of ``'f'``)."""
    return _located_nowhere(_parse("SELECT FALSE")["node"]["select_list"][0])


def _located_nowhere(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _located_nowhere(v) for k, v in value.items() if k != "query_location"}
    if isinstance(value, list):
        return [_located_nowhere(v) for v in value]
    return value


def _substitute(text: str, placeholder: str, replacement: str) -> str:
    lowered = text.lower()
    for name in _RESERVED:
        if name in lowered:
            raise SpecSQLError(f"uses the reserved name {name}")
    _check_placeholder(text, placeholder)
    return text.replace(placeholder, replacement)


def _check_placeholder(text: str, placeholder: str) -> None:
    """A placeholder must be a token of its own: inside a string, a quoted name or a comment,
    or glued to a name, it would lex differently once the pipeline replaces it."""
    marked = text.replace(placeholder, _MARK)
    tokens = {offset for offset, kind in duckdb.tokenize(marked)
              if kind == duckdb.token_type.identifier}
    at = marked.find(_MARK)
    while at != -1:
        end = at + len(_MARK)
        glued = end < len(marked) and (marked[end].isalnum() or marked[end] in "_$"
                                       or ord(marked[end]) > 127)
        if at not in tokens or glued:
            raise SpecSQLError(f"{placeholder} must stand on its own, not inside a string, a "
                               "quoted name or a comment, nor joined to other text")
        at = marked.find(_MARK, end)


def _parse(sql: str) -> dict[str, Any]:
    with _lock:
        row = _parser().execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    result: dict[str, Any] = json.loads(row[0]) if row else {"error": True}
    if result.get("error"):
        message = str(result.get("error_message", ""))
        if message.startswith("Only SELECT statements"):
            raise SpecSQLError("must be a single SELECT expression, not another statement")
        raise SpecSQLError(f"does not parse: {message}")
    statements: list[dict[str, Any]] = result["statements"]
    if len(statements) != 1:
        raise SpecSQLError(f"must be one statement, not {len(statements)}")
    return statements[0]


_lock = threading.Lock()


@functools.cache
def _parser() -> duckdb.DuckDBPyConnection:
    """A plain in-memory connection that never loads an extension or touches a file."""
    return duckdb.connect(config={
        "enable_external_access": "false", "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false", "lock_configuration": "true"})


class _Walker:
    """Walks a serialized statement; ``tables`` are the sentinel tables the wrapper put there
    (spec text cannot name them), ``columns`` the dataset's column names."""

    def __init__(self, tables: frozenset[str], columns: frozenset[str]) -> None:
        self.tables = tables
        self.columns = columns
        self.functions = allowed_functions()

    def walk(self, value: Any, ctes: frozenset[str]) -> None:
        if isinstance(value, list):
            for item in value:
                self.walk(item, ctes)
        elif isinstance(value, dict):
            visit: Callable[[dict[str, Any], frozenset[str]], None] = self._children
            if "class" in value:
                visit = self._expression
            elif "cte_map" in value or str(value.get("type", "")).endswith("_NODE"):
                visit = self._query
            elif "alias" in value and "sample" in value:
                visit = self._from_item
            visit(value, ctes)

    def _children(self, value: dict[str, Any], ctes: frozenset[str]) -> None:
        for item in value.values():
            self.walk(item, ctes)

    def _query(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        kind = node.get("type")
        if kind not in _QUERIES:
            what = "a recursive CTE" if kind == "RECURSIVE_CTE_NODE" else f"a {kind} query"
            raise SpecSQLError(f"uses {what}, which is not allowed")
        # A CTE sees the CTEs defined before it; the query sees all of them.
        for entry in node["cte_map"]["map"]:
            name = entry["key"]
            if not isinstance(name, str) or not _CTE_NAME.fullmatch(name):
                raise SpecSQLError(f"CTE name {name!r} must match {_CTE_NAME.pattern}")
            self.walk(entry["value"], ctes)
            ctes = ctes | {name}
        self._children({k: v for k, v in node.items() if k != "cte_map"}, ctes)

    def _from_item(self, item: dict[str, Any], ctes: frozenset[str]) -> None:
        kind = item.get("type")
        if kind == "BASE_TABLE":
            name = item.get("table_name")
            qualified = item.get("schema_name") or item.get("catalog_name")
            if qualified or not (name in self.tables or name in ctes):
                shown = ".".join(p for p in (item.get("catalog_name"), item.get("schema_name"),
                                             name) if p)
                raise SpecSQLError(f"reads table {shown!r}: only {SILVER} and the query's "
                                   "own CTEs may be read")
            if item.get("at_clause") is not None:
                raise SpecSQLError("uses AT (time travel), which is not allowed")
        elif kind == "TABLE_FUNCTION":
            function = (item.get("function") or {}).get("function_name", "?")
            raise SpecSQLError(f"calls table function {function}(): only {SILVER} and the "
                               "query's own CTEs may be read")
        elif kind not in _FROM_ITEMS:
            raise SpecSQLError(f"uses {kind} in FROM, which is not allowed")
        self._children(item, ctes)

    def _expression(self, expr: dict[str, Any], ctes: frozenset[str]) -> None:
        kind = expr["class"]
        if kind not in _EXPRESSIONS:
            what = "a parameter" if kind == "PARAMETER" else f"a {kind} expression"
            raise SpecSQLError(f"uses {what}, which is not allowed")
        if kind in ("FUNCTION", "WINDOW"):
            self._function(expr)
        elif kind == "COLUMN_REF":
            names = expr.get("column_names") or [""]
            keyword = str(names[-1]).lower()
            target = VALUE_KEYWORDS.get(keyword)
            if target and target not in self.functions and keyword not in self.columns:
                raise SpecSQLError(f"uses {keyword}, which calls {target}(): not allowed")
        self._children(expr, ctes)

    def _function(self, expr: dict[str, Any]) -> None:
        name = str(expr.get("function_name", "")).lower()
        # The parser itself qualifies some forms (``[1]`` is ``main.list_value``).
        if expr.get("catalog") not in ("", None, "system") or \
                expr.get("schema") not in ("", None, "main"):
            where = ".".join(str(p) for p in (expr.get("catalog"), expr.get("schema")) if p)
            raise SpecSQLError(f"calls function {where}.{name}(): only built-in functions")
        if name not in self.functions:
            raise SpecSQLError(f"calls function {name}(), which is not allowed in spec SQL")
        if name in _BY_NAME:
            args = expr.get("children") or []
            named = args[1] if len(args) > 1 else {}
            value = (named.get("value") or {}).get("value") if named.get("class") == "CONSTANT" \
                else None
            if not isinstance(value, str) or value.lower() not in self.functions:
                raise SpecSQLError(f"{name}() must name an allowed aggregate as a literal")
