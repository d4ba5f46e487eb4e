"""Checks the clickstream generator by recomputing its counts with DuckDB over the written files."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from datetime import date
from pathlib import Path

import duckdb
import pytest

from app.lakehouse.generator import GeneratedDataset, generate_clickstream

PARTITION = date(2026, 1, 6)
COLUMNS = (
    "event_id", "user_id", "session_id", "event_type", "page_url",
    "referrer", "device", "country", "event_ts", "duration_ms",
)  # fmt: skip
ALLOWED_TYPES = "('page_view', 'click', 'add_to_cart', 'checkout', 'purchase', 'search')"
VIOLATION = f"""(
    event_id IS NULL OR user_id IS NULL OR event_type IS NULL OR event_ts IS NULL
    OR event_type NOT IN {ALLOWED_TYPES}
    OR TRY_CAST(event_ts AS TIMESTAMP) IS NULL
    OR CAST(TRY_CAST(event_ts AS TIMESTAMP) AS DATE) <> DATE '{PARTITION.isoformat()}'
    OR coalesce(TRY_CAST(duration_ms AS BIGINT) < 0, false)
)"""


def open_raw(directory: Path) -> duckdb.DuckDBPyConnection:
    # All-VARCHAR so malformed values survive the read and are judged by the rules below.
    con = duckdb.connect()
    columns = "{" + ", ".join(f"'{c}': 'VARCHAR'" for c in COLUMNS) + "}"
    con.execute(
        f"""CREATE TABLE raw AS SELECT * FROM read_json('{directory}/events-*.ndjson',
            format = 'newline_delimited', columns = {columns})"""
    )
    con.execute(
        """CREATE TABLE uniq AS
           SELECT * FROM raw WHERE event_id IS NULL
           UNION ALL
           SELECT * FROM raw WHERE event_id IS NOT NULL
           QUALIFY row_number() OVER (PARTITION BY event_id) = 1"""
    )
    con.execute(f"CREATE TABLE retained AS SELECT * FROM uniq WHERE NOT {VIOLATION}")
    return con


def count_observed(directory: Path) -> dict[str, int]:
    con = open_raw(directory)

    def scalar(sql: str) -> int:
        return con.execute(sql).fetchone()[0]

    fillable = ("referrer", "device", "country", "duration_ms")
    null_cells = " + ".join(f"count(*) FILTER (WHERE {c} IS NULL)" for c in fillable)
    observed = {
        "records": scalar("SELECT count(*) FROM raw"),
        "duplicates": scalar(
            "SELECT count(*) - count(DISTINCT event_id) FROM raw WHERE event_id IS NOT NULL"
        ),
        "invalid": scalar(f"SELECT count(*) FROM uniq WHERE {VIOLATION}"),
        "retained": scalar("SELECT count(*) FROM retained"),
        "nulls": scalar(f"SELECT {null_cells} FROM retained"),
        "aggregated": scalar(
            """SELECT
                 (SELECT count(DISTINCT event_type) FROM retained)
               + (SELECT count(DISTINCT hour(CAST(event_ts AS TIMESTAMP))) FROM retained)
               + (SELECT count(DISTINCT page_url) FROM retained)
               + (SELECT count(*) FROM (SELECT DISTINCT coalesce(device, 'unknown'),
                                        coalesce(country, 'ZZ') FROM retained))"""
        ),
    }
    con.close()
    return observed


def hash_files(dataset: GeneratedDataset) -> str:
    digest = hashlib.sha256()
    for path in dataset.files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory: pytest.TempPathFactory) -> GeneratedDataset:
    return generate_clickstream(tmp_path_factory.mktemp("default"))


def test_generate_clickstream__default_size_writes_25_numbered_files(default_dataset):
    names = sorted(p.name for p in default_dataset.directory.glob("events-*.ndjson"))
    assert names == [f"events-{i:03d}.ndjson" for i in range(1, 26)]
    assert [p.name for p in default_dataset.files] == names
    lines = [len(p.read_bytes().splitlines()) for p in default_dataset.files]
    assert sum(lines) == 145_231
    assert max(lines) - min(lines) < 0.05 * max(lines)


def test_generate_clickstream__default_size_counts_match_seed_numbers(default_dataset):
    observed = count_observed(default_dataset.directory)
    assert observed == {
        "records": 145_231,
        "duplicates": 5_234,
        "invalid": 876,
        "retained": 139_121,
        "nulls": 2_145,
        "aggregated": 1_234,
    }
    assert (default_dataset.records, default_dataset.duplicates) == (145_231, 5_234)
    assert (default_dataset.invalid, default_dataset.nulls) == (876, 2_145)
    assert default_dataset.retained == 139_121


def test_generate_clickstream__duplicates_are_exact_copies_in_other_files(default_dataset):
    seen: dict[str, set[bytes]] = defaultdict(set)
    files_of: dict[str, set[str]] = defaultdict(set)
    for path in default_dataset.files:
        for line in path.read_bytes().splitlines():
            event_id = json.loads(line)["event_id"]
            if event_id is not None:
                seen[event_id].add(line)
                files_of[event_id].add(path.name)
    assert all(len(lines) == 1 for lines in seen.values())
    copied = [eid for eid, names in files_of.items() if len(names) > 1]
    assert len(copied) == 5_234


def test_generate_clickstream__timestamps_cover_every_hour_of_the_partition(default_dataset):
    con = open_raw(default_dataset.directory)
    hours = con.execute(
        "SELECT DISTINCT hour(CAST(event_ts AS TIMESTAMP)) FROM retained ORDER BY 1"
    ).fetchall()
    con.close()
    assert [h for (h,) in hours] == list(range(24))


def test_generate_clickstream__same_seed_is_byte_identical(tmp_path):
    first = generate_clickstream(tmp_path / "a", records=20_000, files=4, seed=7)
    second = generate_clickstream(tmp_path / "b", records=20_000, files=4, seed=7)
    other = generate_clickstream(tmp_path / "c", records=20_000, files=4, seed=8)
    assert hash_files(first) == hash_files(second)
    assert hash_files(first) != hash_files(other)


def test_generate_clickstream__rerun_overwrites_existing_files(tmp_path):
    first = hash_files(generate_clickstream(tmp_path, records=3_000, files=2, seed=1))
    generate_clickstream(tmp_path, records=3_000, files=2, seed=2)
    assert hash_files(generate_clickstream(tmp_path, records=3_000, files=2, seed=1)) == first


@pytest.mark.parametrize(("records", "files"), [(2_000, 3), (50, 1), (0, 2)])
def test_generate_clickstream__small_size_matches_returned_counts(tmp_path, records, files):
    dataset = generate_clickstream(tmp_path, records=records, files=files)
    assert len(dataset.files) == files
    observed = count_observed(tmp_path) if records else {"records": 0}
    assert observed["records"] == dataset.records == records
    if records:
        assert observed["duplicates"] == dataset.duplicates == round(records * 5234 / 145231)
        assert observed["invalid"] == dataset.invalid == round(records * 876 / 145231)
        assert observed["nulls"] == dataset.nulls == round(records * 2145 / 145231)
        assert observed["retained"] == dataset.retained


def test_generate_clickstream__rejects_zero_files(tmp_path):
    with pytest.raises(ValueError, match="files"):
        generate_clickstream(tmp_path, records=10, files=0)
