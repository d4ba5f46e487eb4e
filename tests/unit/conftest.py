"""Fixtures for engine unit tests: a saga-log ``Database`` on SQLite and on PostgreSQL.

PostgreSQL gets one throwaway database per test session (tables made with ``create_all``, since
migrations are tested elsewhere) and its tables are truncated before each test. Without a
reachable server the PostgreSQL variants are skipped locally and fail when ``CI=true``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text

import app.db.models  # noqa: F401  (registers the tables on Base.metadata)
import app.faults
from app.db.base import Base
from app.db.session import Database
from app.saga.step_log import StepLog

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"


def _admin_connection() -> psycopg.Connection:
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres",
        autocommit=True, connect_timeout=5,
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    try:
        admin = _admin_connection()
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL at {PG_HOST}:{PG_PORT} is unreachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (required when CI=true)", pytrace=False)
        pytest.skip(message)
    name = f"lakesaga_unit_{secrets.token_hex(6)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    db = Database(url)
    try:
        Base.metadata.create_all(db.engine)
    finally:
        db.dispose()
    try:
        yield url
    finally:
        with _admin_connection() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _truncate_all(db: Database) -> None:
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    with db.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgres":
        database = Database(request.getfixturevalue("postgres_url"))
        try:
            _truncate_all(database)
        except BaseException:
            database.dispose()
            raise
    else:
        database = Database(f"sqlite:///{tmp_path / 'saga_log.db'}")
        Base.metadata.create_all(database.engine)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def step_log(db: Database) -> StepLog:
    return StepLog(db)


@pytest.fixture(autouse=True)
def _no_fault_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine tests control failures through their own steps, never through LAKESAGA_FAULTS."""
    monkeypatch.setattr(app.faults, "_plan", None)
