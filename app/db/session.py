"""Engine and session factory for the saga log.

SQLite (embedded mode) runs in WAL mode and opens every transaction with ``BEGIN IMMEDIATE`` so
that concurrent writers queue on the database lock instead of failing a read-to-write upgrade;
PostgreSQL uses psycopg 3 with pre-ping so a restarted server is reconnected transparently.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and select the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, *, idle_in_transaction_timeout_s: float | None = None) -> Engine:
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {}
    if idle_in_transaction_timeout_s:
        # A worker paused inside a transaction (a zombie) holds the saga row lock, and claims
        # skip locked rows: let the server end such sessions once the lease has run out.
        ms = int(idle_in_transaction_timeout_s * 1000)
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={ms}"
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         connect_args=connect_args)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """One engine and session factory per process and URL."""

    def __init__(self, url: str, *, idle_in_transaction_timeout_s: float | None = None) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url,
                                  idle_in_transaction_timeout_s=idle_in_transaction_timeout_s)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits on success and rolls back on any error."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
