"""Shared fixtures: real PostgreSQL databases (created per test run) and SQLite files.

PostgreSQL is at LAKESAGA_TEST_PG (default ``postgresql://postgres@127.0.0.1:5432``). When it is
unreachable the PostgreSQL tests skip locally but fail loudly when ``CI=true``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from app.settings import Settings

PG_BASE = os.environ.get("LAKESAGA_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _pg_admin() -> psycopg.Connection:
    return psycopg.connect(f"{PG_BASE}/postgres", autocommit=True, connect_timeout=5)


def require_postgres() -> None:
    try:
        _pg_admin().close()
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required when CI=true and is unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")


@pytest.fixture(scope="session")
def pg_database_factory() -> Iterator[Callable[..., str]]:
    """Create fresh PostgreSQL databases; all are dropped at the end of the session."""
    created: list[str] = []

    def create(template: str | None = None) -> str:
        """A new database: empty, or a copy of the database ``template`` (one made here)."""
        require_postgres()
        name = f"lakesaga_test_{uuid.uuid4().hex[:12]}"
        with _pg_admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"'
                         + (f' TEMPLATE "{template}"' if template else ""))
        created.append(name)
        return f"{PG_BASE}/{name}"

    yield create
    if created:
        with _pg_admin() as conn:
            for name in created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path,
                 pg_database_factory: Callable[[], str]) -> str:
    """A fresh, empty saga database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lakesaga.db'}"
    return pg_database_factory()


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for an isolated deployment under tmp_path on the given database."""

    def make(database_url: str, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "database_url": database_url,
            "source_root": tmp_path / "raw",
            "lake_dir": tmp_path / "lake",
            "poll_interval_s": 0.05,
            "step_backoff_s": 0.01,
            "webhook_allow_hosts": ["127.0.0.1"],
        }
        values.update(overrides)
        (tmp_path / "raw").mkdir(exist_ok=True)
        return Settings(**values)  # type: ignore[arg-type]

    return make
