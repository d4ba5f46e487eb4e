"""Dataset specs: columns and types, dedupe key, required columns, fill defaults, validation
rules and gold aggregations, loaded from YAML files. A dataset is data, not a code path.

Every name that reaches SQL is checked against ``IDENTIFIER`` and quoted; rule and aggregation
SQL comes from operator-controlled spec files, never from API requests, and is checked against
the allowlist of ``spec_sql`` when the spec is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from app.lakehouse.spec_sql import SpecSQLError, check_aggregation, check_rule

IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
#: lakesaga's own metadata columns (``_batch_id``, ...): never taken from a spec or a request.
_INTERNAL = re.compile(r"^_[a-z][a-z0-9_]{0,61}$")
ALLOWED_TYPES = {"VARCHAR", "BIGINT", "INTEGER", "DOUBLE", "BOOLEAN", "DATE", "TIMESTAMP"}
BUILTIN_DIR = Path(__file__).parent / "datasets"


class SpecError(ValueError):
    """A dataset spec file is malformed."""


def check_identifier(name: str, what: str = "identifier") -> str:
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise SpecError(f"invalid {what} {name!r}: must match {IDENTIFIER.pattern}")
    return name


def quote(name: str) -> str:
    """Quote a validated identifier (or one of lakesaga's ``_`` metadata columns) for DuckDB."""
    if not _INTERNAL.fullmatch(name):
        check_identifier(name)
    return '"' + name + '"'


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    required: bool = False
    fill: Any = None


@dataclass(frozen=True)
class Rule:
    name: str
    check: str


@dataclass(frozen=True)
class Aggregation:
    name: str
    sql: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    columns: tuple[Column, ...]
    dedupe_key: tuple[str, ...]
    rules: tuple[Rule, ...]
    aggregations: tuple[Aggregation, ...]

    def __post_init__(self) -> None:
        # Every spec, however built, has its SQL checked: rules and aggregations run on the lake
        # connection, whose catalog scanner ignores the connection's sandbox (see spec_sql).
        columns = frozenset(c.name for c in self.columns)
        items = [("rule", r.name, r.check, check_rule) for r in self.rules] + [
            ("aggregation", a.name, a.sql, check_aggregation) for a in self.aggregations]
        for kind, name, sql, check in items:
            try:
                check(sql, columns)
            except SpecSQLError as exc:
                raise SpecError(f"dataset {self.name}: {kind} {name}: {exc}") from None

    @property
    def bronze_table(self) -> str:
        return f"raw_{self.name}"

    @property
    def silver_table(self) -> str:
        return f"cleaned_{self.name}"

    @property
    def gold_table(self) -> str:
        return f"{self.name}_metrics"

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "columns": [
                {"name": c.name, "type": c.type, "required": c.required, "fill": c.fill}
                for c in self.columns
            ],
            "dedupe_key": list(self.dedupe_key),
            "rules": [r.name for r in self.rules],
            "aggregations": [a.name for a in self.aggregations],
            "tables": {
                "bronze": f"bronze.{self.bronze_table}",
                "silver": f"silver.{self.silver_table}",
                "gold": f"gold.{self.gold_table}",
            },
        }


def parse_spec(data: dict[str, Any]) -> DatasetSpec:
    try:
        name = check_identifier(data["name"], "dataset name")
        columns = tuple(
            Column(
                name=check_identifier(c["name"], "column name"),
                type=_check_type(c["type"]),
                required=bool(c.get("required", False)),
                fill=c.get("fill"),
            )
            for c in data["columns"]
        )
        names = {c.name for c in columns}
        dedupe_key = tuple(check_identifier(k, "dedupe column") for k in data["dedupe_key"])
        if not set(dedupe_key) <= names:
            raise SpecError(f"dataset {name}: dedupe key {dedupe_key} names unknown columns")
        rules = tuple(
            Rule(check_identifier(r["name"], "rule name"), str(r["check"]))
            for r in data.get("rules", [])
        )
        aggregations = tuple(
            Aggregation(check_identifier(a["name"], "aggregation name"), str(a["sql"]))
            for a in data["aggregations"]
        )
    except (KeyError, TypeError) as exc:
        raise SpecError(f"dataset spec is missing or mistypes {exc}") from exc
    if len(names) != len(columns) or names & {"partition_date"} or any(
        n.startswith("_") for n in names
    ):
        raise SpecError(f"dataset {name}: duplicate or reserved column names")
    return DatasetSpec(name, str(data.get("description", "")), columns, dedupe_key, rules,
                       aggregations)


def _check_type(value: str) -> str:
    if value not in ALLOWED_TYPES:
        raise SpecError(f"column type {value!r} not in {sorted(ALLOWED_TYPES)}")
    return value


def load_spec_file(path: Path) -> DatasetSpec:
    with path.open(encoding="utf-8") as fh:
        return parse_spec(yaml.safe_load(fh))


@lru_cache(maxsize=8)
def load_datasets(extra_dir: Path | None = None) -> dict[str, DatasetSpec]:
    """The built-in datasets plus any ``*.yaml`` spec in ``extra_dir``."""
    paths = sorted(BUILTIN_DIR.glob("*.yaml"))
    if extra_dir is not None:
        paths += sorted(extra_dir.glob("*.yaml"))
    specs: dict[str, DatasetSpec] = {}
    for path in paths:
        spec = load_spec_file(path)
        specs[spec.name] = spec
    return specs
