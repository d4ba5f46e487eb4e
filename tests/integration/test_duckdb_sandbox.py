"""The lake's DuckDB connection is confined: files only under the source root and the lake
directory, no new attachments, extensions or network, and its configuration locked — on a
SQLite and on a PostgreSQL DuckLake catalog, and again after ``Lake.reset()``. The scanner the
catalog needs ignores that confinement; spec SQL that would use it is refused when loaded."""

from __future__ import annotations

import dataclasses
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import duckdb
import pytest
import yaml
from sqlalchemy.engine import make_url

from app.lakehouse import gold
from app.lakehouse.duck import Lake, extension_path, libpq_dsn
from app.lakehouse.pipeline import BUILTIN_DIR, Aggregation, DatasetSpec, SpecError, load_datasets
from app.lakehouse.tables import ensure_tables, gold_table
from app.settings import Settings, parse_bytes


@pytest.fixture
def lake(database_url: str, settings_factory: Callable[..., Settings]) -> Iterator[Lake]:
    lake = Lake(settings_factory(database_url, duckdb_memory_limit="512MiB"))
    try:
        yield lake
    finally:
        lake.close()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A readable directory beside the source root and the lake directory, outside both."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.csv").write_text("secret\nS3cretCanary\n")
    return folder


def _refused(lake: Lake, sql: str, params: list[object] | None = None) -> str:
    with pytest.raises(duckdb.Error) as caught:
        lake.cursor().execute(sql, params or []).fetchall()
    return str(caught.value)


def test_lake__reading_outside_the_allowed_directories_fails(lake: Lake, outside: Path) -> None:
    root = lake.settings.source_root
    (root / "leak.csv").symlink_to(outside / "secret.csv")
    (root / "outdir").symlink_to(outside)
    for path in ("/etc/passwd", str(outside / "secret.csv"), str(root / "leak.csv"),
                 str(root / "outdir" / "secret.csv"), f"{root}/../outside/secret.csv",
                 str(outside / "*.csv")):
        for reader in ("read_csv", "read_text", "read_blob", "glob"):
            message = _refused(lake, f"SELECT * FROM {reader}(?)", [path])
            assert "S3cretCanary" not in message
            assert "disabled by configuration" in message, (reader, path, message)


@pytest.mark.parametrize("statement", [
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "SET allowed_paths = ['/etc/passwd']",
    "SET lock_configuration = false",
    "RESET lock_configuration",
    "SET GLOBAL lock_configuration = false",
    "SET temp_directory = '/tmp'",
    "SET autoload_known_extensions = true",
    "SET allow_unsigned_extensions = true",
    "PRAGMA memory_limit = '100GB'",
])
def test_lake__configuration_is_locked(lake: Lake, statement: str) -> None:
    assert "the configuration has been locked" in _refused(lake, statement)
    row = lake.cursor().execute("SELECT current_setting('enable_external_access'), "
                                "current_setting('lock_configuration')").fetchall()
    assert row == [(False, True)]


def test_lake__extensions_cannot_be_installed_or_loaded(lake: Lake) -> None:
    assert "disabled" in _refused(lake, "INSTALL httpfs")
    assert "disabled" in _refused(lake, "FORCE INSTALL httpfs FROM 'http://127.0.0.1:9'")
    assert "disabled" in _refused(lake, "LOAD httpfs")
    assert "disabled" in _refused(lake, "LOAD no_such_extension")
    # A file under an allowed directory: refused before it is even read.
    planted = lake.settings.source_root / "evil.duckdb_extension"
    wheel = extension_path("sqlite_scanner")
    planted.write_bytes(wheel.read_bytes() if wheel else b"not an extension")
    assert "disabled" in _refused(lake, f"LOAD '{planted}'")


def test_lake__writing_outside_fails(lake: Lake, outside: Path) -> None:
    for sql in (f"COPY (SELECT 1 AS a) TO '{outside / 'x.csv'}'",
                f"COPY (SELECT 1 AS a) TO '{outside / 'x.parquet'}' (FORMAT parquet)",
                f"EXPORT DATABASE '{outside / 'export'}'"):
        assert "disabled by configuration" in _refused(lake, sql)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.csv"]


def test_lake__attaching_anything_new_outside_fails(lake: Lake, outside: Path) -> None:
    assert "disabled by configuration" in _refused(
        lake, f"ATTACH '{outside / 'other.duckdb'}' AS other")
    # SQLite catalog: the postgres extension may not load; PostgreSQL catalog: it may not attach.
    message = _refused(
        lake, "ATTACH 'dbname=postgres host=127.0.0.1 user=postgres' AS pg (TYPE postgres)")
    assert "Permission Error" in message and "disabled through configuration" in message
    assert "Cannot access file" in _refused(
        lake, f"ATTACH 'ducklake:{outside / 'cat.ducklake'}' AS lake2 (DATA_PATH '{outside}/')")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.csv"]


def test_lake__carries_only_the_scanner_its_catalog_needs(lake: Lake, outside: Path) -> None:
    functions = {name for (name,) in lake.cursor().execute(
        "SELECT DISTINCT function_name FROM duckdb_functions()").fetchall()}
    if lake.sqlite_catalog:
        assert "postgres_scan" not in functions and "sqlite_scan" in functions
        # postgres_scan would connect to any DSN whatever enable_external_access says.
        _refused(lake, "SELECT * FROM postgres_scan('dbname=postgres host=127.0.0.1 "
                       "user=postgres', 'pg_catalog', 'pg_class')")
    else:
        assert "sqlite_scan" not in functions and "postgres_scan" in functions
        # sqlite_scan / ATTACH (TYPE sqlite) open any SQLite file whatever DuckDB allows.
        _refused(lake, f"SELECT * FROM sqlite_scan('{outside / 'x.sqlite'}', 't')")
        _refused(lake, f"ATTACH '{outside / 'other.sqlite'}' AS other (TYPE sqlite)")
        assert sorted(p.name for p in outside.iterdir()) == ["secret.csv"]


@pytest.fixture
def secret_db(outside: Path) -> Path:
    """A SQLite file outside the allowed directories, holding a canary."""
    path = outside / "secret.sqlite"
    with closing(sqlite3.connect(path)) as con:
        con.execute("CREATE TABLE secrets (s TEXT)")
        con.execute("INSERT INTO secrets VALUES ('S3cretCanary')")
        con.commit()
    return path


def _other_database(database_url: str) -> str:
    """A libpq DSN for the server's ``postgres`` database: not the lake's catalog."""
    return libpq_dsn(make_url(database_url).set(database="postgres")
                     .render_as_string(hide_password=False))


def test_lake__direct_sql_still_reaches_the_catalog_scanner(
        lake: Lake, outside: Path, secret_db: Path, database_url: str) -> None:
    # The residual: the scanner the catalog needs ignores enable_external_access, so code that
    # holds the lake connection can read, create or run what it likes through it. Spec SQL
    # cannot (next test) and API requests carry no SQL. If a DuckDB release closes this, this
    # test fails: update README "Security" and docs/ARCHITECTURE.md "Known limits".
    cur = lake.cursor()
    if lake.sqlite_catalog:
        assert cur.execute(f"SELECT s FROM sqlite_scan('{secret_db}', 'secrets')"
                           ).fetchall() == [("S3cretCanary",)]
        cur.execute(f"ATTACH '{outside / 'new.sqlite'}' AS other (TYPE sqlite)")
        cur.execute("CREATE TABLE other.t AS SELECT 42 AS x")
        assert (outside / "new.sqlite").exists()
    else:
        databases = cur.execute(f"SELECT datname FROM postgres_scan('{_other_database(database_url)}', "
                                "'pg_catalog', 'pg_database')").fetchall()
        assert ("postgres",) in databases
        # The catalog's own connection runs any SQL on the saga database.
        meta = lake.metadata_prefix.split(".")[0]
        cur.execute(f"CALL postgres_execute('{meta}', 'CREATE TABLE pwned (x int)')")
        assert cur.execute(f"SELECT * FROM postgres_query('{meta}', 'SELECT count(*) FROM pwned')"
                           ).fetchall() == [(0,)]


def _unchecked(spec: DatasetSpec, aggregation: str) -> DatasetSpec:
    """``spec`` with one aggregation, built around the load-time check: what would run without it."""
    smuggled = object.__new__(DatasetSpec)
    for field in dataclasses.fields(DatasetSpec):
        object.__setattr__(smuggled, field.name, getattr(spec, field.name))
    object.__setattr__(smuggled, "aggregations", (Aggregation("leak", aggregation),))
    return smuggled


def test_lake__spec_sql_reaching_the_catalog_scanner_is_refused_at_load(
        lake: Lake, outside: Path, secret_db: Path, database_url: str, tmp_path: Path) -> None:
    meta = lake.metadata_prefix.split(".")[0]
    other = _other_database(database_url) if not lake.sqlite_catalog else "dbname=postgres"
    agg = "SELECT {0} AS dimension, 'leak' AS metric, 1 AS value FROM {1}"
    attacks = [  # (rule or aggregation, SQL, the construct the refusal names)
        ("rule", f"(SELECT count(*) FROM sqlite_scan('{secret_db}', 'secrets')) > 0",
         "sqlite_scan"),
        ("aggregation", agg.format("s", f"sqlite_scan('{secret_db}', 'secrets')"),
         "sqlite_scan"),
        ("aggregation", agg.format("x.s", f"{{silver}} d JOIN sqlite_scan('{secret_db}', "
                                   "'secrets') x ON TRUE"), "sqlite_scan"),
        ("rule", f"EXISTS (SELECT 1 FROM postgres_scan('{other}', 'pg_catalog', 'pg_class'))",
         "postgres_scan"),
        ("aggregation", agg.format("datname", f"postgres_scan('{other}', 'pg_catalog', "
                                   "'pg_database')"), "postgres_scan"),
        ("aggregation", agg.format("'n'", f"postgres_query('{meta}', 'SELECT 1')"),
         "postgres_query"),
        ("aggregation", agg.format("'n'", f"postgres_execute('{meta}', 'CREATE TABLE pwned "
                                   "(x int)')"), "postgres_execute"),
        ("rule", f"(SELECT count(*) FROM read_csv('{outside / 'secret.csv'}')) > 0", "read_csv"),
        ("aggregation", agg.format("file", f"glob('{outside}/*')"), "glob"),
        ("rule", "getenv('HOME') IS NOT NULL", "getenv"),
        ("rule", f"json_serialize_plan('SELECT * FROM sqlite_scan(''{secret_db}'', ''t'')') "
                 "IS NOT NULL", "json_serialize_plan"),
        ("rule", f"TRUE), FALSE); ATTACH '{outside / 'new.sqlite'}' AS other (TYPE sqlite); "
                 "SELECT coalesce((TRUE", "single SELECT"),
        ("aggregation", agg.format("1", "{silver}") + f"); ATTACH '{outside / 'new.sqlite'}' "
                                                      "AS other (TYPE sqlite); SELECT (1",
         "single SELECT"),
    ]
    builtin = yaml.safe_load((BUILTIN_DIR / "clickstream.yaml").read_text())
    for i, (kind, sql, construct) in enumerate(attacks):
        spec = dict(builtin, name=f"evil{i}")
        if kind == "rule":
            spec["rules"] = [*builtin["rules"], {"name": "leak", "check": sql}]
        else:
            spec["aggregations"] = [*builtin["aggregations"], {"name": "leak", "sql": sql}]
        folder = tmp_path / f"specs{i}"
        folder.mkdir()
        (folder / "evil.yaml").write_text(yaml.safe_dump(spec))
        with pytest.raises(SpecError) as refused:
            load_datasets(folder)
        assert str(refused.value).startswith(f"dataset evil{i}: {kind} leak: "), refused.value
        assert construct in str(refused.value), (sql, refused.value)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.csv", "secret.sqlite"]

    # Without the check, gold would have run the scanner on the lake connection.
    spec = load_datasets(None)["clickstream"]
    cur = lake.cursor()
    ensure_tables(cur, spec)
    leak = attacks[1][1] if lake.sqlite_catalog else attacks[4][1]
    gold.aggregate(cur, _unchecked(spec, leak), partition_date="2026-01-06", saga_id="s",
                   tag='{"step": "aggregate_to_gold"}')
    leaked = {d for (d,) in cur.execute(f"SELECT dimension FROM {gold_table(spec)}").fetchall()}
    assert leaked & {"S3cretCanary", "postgres"}


def test_lake__network_reads_fail(lake: Lake) -> None:
    for url in ("http://127.0.0.1:9/x.csv", "https://example.com/x.parquet", "s3://bucket/x.csv"):
        assert "disabled by configuration" in _refused(lake, "SELECT * FROM read_csv(?)", [url])


def test_lake__normal_reads_and_writes_work(lake: Lake) -> None:
    source = lake.settings.source_root / "events.ndjson"
    source.write_text('{"id": "a", "n": 1}\n{"id": "b", "n": 2}\n')
    cur = lake.cursor()
    cur.execute("CREATE SCHEMA IF NOT EXISTS lake.sandbox")
    cur.execute("CREATE TABLE lake.sandbox.events (id VARCHAR, n BIGINT)")
    cur.execute("INSERT INTO lake.sandbox.events SELECT id, n FROM read_json(?)", [[str(source)]])
    cur.execute("INSERT INTO lake.sandbox.events SELECT 'x' || range, range FROM range(5000)")
    assert cur.execute("SELECT count(*), sum(n) FROM lake.sandbox.events").fetchall() == [
        (5002, sum(range(5000)) + 3)]
    assert lake.current_snapshot() > 0
    # DuckLake's own metadata (used by the invariant checker) stays readable.
    files = cur.execute(f"SELECT count(*) FROM {lake.metadata_prefix}.ducklake_data_file").fetchall()
    assert files[0][0] >= 1
    assert any(lake.data_path.rglob("*.parquet"))


def test_lake__duckdb_gets_the_memory_budget_less_headroom(lake: Lake) -> None:
    shown = lake.cursor().execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    assert parse_bytes(shown) == 256 * 2**20, shown  # 512 MiB less the 256 MiB headroom


def test_lake__spills_inside_the_lake_directory(lake: Lake) -> None:
    cur = lake.cursor()
    temp = Path(cur.execute("SELECT current_setting('temp_directory')").fetchall()[0][0])
    assert temp.is_relative_to(lake.settings.lake_dir / "tmp")
    # Larger than the 256 MiB DuckDB gets of the 512 MiB budget: DuckDB must spill, and may
    # only do so in there.
    row = cur.execute("SELECT count(*) FROM (SELECT range % 6000000 AS k, count(*) "
                      "FROM range(30000000) GROUP BY 1)").fetchall()
    assert row == [(6000000,)]


def test_lake__reset_rebuilds_a_locked_connection(lake: Lake, outside: Path) -> None:
    cur = lake.cursor()
    cur.execute("CREATE SCHEMA IF NOT EXISTS lake.sandbox")
    cur.execute("CREATE TABLE lake.sandbox.t AS SELECT range AS i FROM range(10)")
    lake.reset()
    cur = lake.cursor()
    assert cur.execute("SELECT count(*) FROM lake.sandbox.t").fetchall() == [(10,)]
    cur.execute("INSERT INTO lake.sandbox.t SELECT range FROM range(5)")
    assert cur.execute("SELECT count(*) FROM lake.sandbox.t").fetchall() == [(15,)]
    assert "locked" in _refused(lake, "SET enable_external_access = true")
    assert "disabled by configuration" in _refused(
        lake, "SELECT * FROM read_csv(?)", [str(outside / "secret.csv")])


def test_lake__stale_spill_directories_of_dead_processes_are_removed(
        database_url: str, settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(database_url)
    tmp = settings.lake_dir / "tmp"
    tmp.mkdir(parents=True)
    host = socket.gethostname()
    dead = tmp / f"{host}-999999999-deadbeef0000"
    (dead / "spill").mkdir(parents=True)
    alive = tmp / f"{host}-{os.getpid()}-aaaabbbbcccc"
    alive.mkdir()
    Lake(settings).close()
    assert not dead.exists()
    assert alive.exists()
