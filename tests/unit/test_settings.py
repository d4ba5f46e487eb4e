"""The worker's memory budget: how it is read, refused, and shared with DuckDB."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import HEADROOM_MIN, Settings, parse_bytes


@pytest.mark.parametrize(("text", "expected"), [
    ("2GB", 2 * 10**9), ("1536MiB", 1536 * 2**20), ("4 gib", 4 * 2**30), ("2e9", 2 * 10**9),
    ("1.5GB", 1_500_000_000), ("700000000", 700_000_000), ("1TiB", 2**40), ("256.0 MiB", 2**28),
])
def test_parse_bytes__decimal_and_binary_units(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "abc", "-1GB", "0GB", "nanGB", "infGB", "1XB",
                                  "1GBB", "1.2.3MB"])
def test_parse_bytes__refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_bytes(text)


@pytest.mark.parametrize(("budget", "duckdb_mib"), [
    ("512MiB", 256),            # the 256 MiB floor of headroom
    ("1GiB", 768),              # a quarter is 256 MiB: the same
    ("2GB", 1430),              # a quarter, 476.8 MiB
    ("8GiB", 6144),
])
def test_duckdb_memory_limit__the_budget_less_headroom(budget: str, duckdb_mib: int) -> None:
    limit = Settings(duckdb_memory_limit=budget).duckdb_memory_limit_bytes
    assert limit is not None
    assert limit // 2**20 == duckdb_mib
    assert parse_bytes(budget) - limit >= HEADROOM_MIN


def test_duckdb_memory_limit__unset_leaves_duckdb_its_default() -> None:
    assert Settings(duckdb_memory_limit="").duckdb_memory_limit_bytes is None


@pytest.mark.parametrize(("budget", "needle"), [
    ("100MB", "at least 512 MiB"), ("lots", "not a size"), ("-2GB", "positive")])
def test_duckdb_memory_limit__bad_budget_is_refused_at_start(budget: str, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        Settings(duckdb_memory_limit=budget)
