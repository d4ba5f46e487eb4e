"""Engine and session factory for the saga log.

SQLite (embedded mode) runs in WAL mode and opens every write transaction with ``BEGIN
IMMEDIATE`` so that concurrent writers queue on the database lock instead of failing a
read-to-write upgrade; read-only connections (:meth:`Database.reading`) use a plain ``BEGIN``.
Within a process, writers also take turns on a lock first: SQLite's busy handler makes a
waiting writer sleep in growing steps (up to 100 ms) however soon the lock frees, which put
a POST's p99 at hundreds of milliseconds under load; a thread waiting on the process lock is
woken the moment it is released, and all of them write on one connection (see
``Database._sqlite_writer``). Writers in other processes still meet the busy handler.
PostgreSQL uses psycopg 3; a pooled connection whose server has hung up (a restart, an
idle-in-transaction timeout) is replaced at checkout without a round trip.
"""

from __future__ import annotations

import contextlib
import select
import sqlite3
import threading
from collections import namedtuple
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ClauseElement, Connection, Dialect, Engine, create_engine, event, exc
from sqlalchemy.dialects.sqlite import DATETIME as SQLITE_DATETIME
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler

#: Execution option marking a connection that only reads (SQLite: no write lock).
READ_ONLY = "lakesaga_read_only"


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
    engine = create_engine(url, pool_size=10, max_overflow=20, connect_args=connect_args)
    _discard_hung_up_connections(engine)
    return engine


def _discard_hung_up_connections(engine: Engine) -> None:
    """At checkout, replace a pooled connection whose socket is readable: an idle connection
    only receives something when the server ends it (shutdown, restart, a session timeout).

    This replaces ``pool_pre_ping``, which costs a round trip per checkout. A server that dies
    without closing the socket is noticed by the first statement instead, as a disconnect.
    """

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection, _record, _proxy):
        if _hung_up(dbapi_connection):
            # Every other pooled connection predates the same restart: replace them all.
            raise exc.InvalidatePoolError("the server closed the connection")


def _hung_up(dbapi_connection: Any) -> bool:
    """Whether an idle PostgreSQL connection has something to read: the server ended it."""
    poller = select.poll()
    poller.register(dbapi_connection.fileno(), select.POLLIN)
    return bool(poller.poll(0))


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
        dbapi_connection = connection.connection.dbapi_connection
        if dbapi_connection.in_transaction:  # begun by Database.writing, on the driver
            return
        _on_driver(dbapi_connection, "BEGIN" if connection.get_execution_options().get(
            READ_ONLY, False) else "BEGIN IMMEDIATE")


def _in_transaction(connection: Connection) -> bool:
    """SQLite: whether a transaction is open on ``connection``, begun by SQLAlchemy or on the
    driver (``Database.writing``)."""
    return connection.in_transaction() or bool(
        cast(Any, connection.connection.dbapi_connection).in_transaction)


def _on_driver(dbapi_connection: Any, statement: str) -> None:
    """SQLite: a ``BEGIN``, ``COMMIT`` or ``ROLLBACK`` straight to the driver (transactions
    begin and end on the saga log's hot path), raising what SQLAlchemy would (a busy database
    is an OperationalError)."""
    try:
        dbapi_connection.execute(statement)
    except sqlite3.Error as err:
        raise exc.DBAPIError.instance(statement, None, err, sqlite3.Error) from err


@dataclass
class _DriverStatement:
    """A Core statement compiled for one dialect, with what running it on the driver needs."""

    sql: str
    defaults: dict[str, Any]
    bind_processors: dict[str, Callable[[Any], Any]]
    #: Parameter order for positional drivers (SQLite's ``?``); None for named ones.
    positions: tuple[str, ...] | None
    #: One per result column, or None when no column needs processing.
    result_processors: tuple[Callable[[Any], Any] | None, ...] | None
    #: Parameters without a value of their own: the caller must give them.
    required: frozenset[str]
    row_type: Any = None

    @classmethod
    def compile(cls, statement: ClauseElement, dialect: Dialect) -> _DriverStatement:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        binds: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            process = _bind_processor(bind.type.dialect_impl(dialect), dialect)
            if process is not None and name in compiled.params:
                binds[name] = process
        results = tuple(column.type.dialect_impl(dialect).result_processor(dialect, None)
                        for column in getattr(statement, "exported_columns", ()))
        return cls(str(compiled), dict(compiled.params), binds,
                   tuple(compiled.positiontup) if compiled.positiontup else None,
                   results if any(results) else None,
                   frozenset(name for name, bind in compiled.binds.items()
                             if bind.required and name in compiled.params))

    def arguments(self, params: dict[str, Any]) -> Any:
        """``params`` as the driver takes them: with the statement's defaults, through the type
        processors, in ``positions`` order for a positional driver."""
        missing = self.required.difference(params)
        if missing:
            raise exc.ArgumentError(f"no value for the parameters {sorted(missing)}")
        values = {**self.defaults, **params}
        for name, process in self.bind_processors.items():
            values[name] = process(values[name])
        return values if self.positions is None else tuple(
            values[name] for name in self.positions)


def _bind_processor(impl: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """SQLAlchemy's bind processor of a type, but for SQLite's DATETIME in its default storage
    format a faster one that writes the same text (a transition binds several timestamps)."""
    process = impl.bind_processor(dialect)
    if (process is None or not isinstance(impl, SQLITE_DATETIME)
            or impl._storage_format != SQLITE_DATETIME._storage_format):
        return cast("Callable[[Any], Any] | None", process)

    def sqlite_datetime(value: Any) -> Any:
        # The default format has no zone, and always six digits of microseconds.
        if type(value) is datetime and value.tzinfo is None:
            return value.isoformat(" ", "microseconds")
        return process(value)

    return sqlite_datetime


@dataclass(frozen=True)
class DriverResult:
    rows: list[Any]
    rowcount: int

    def first(self) -> Any:
        return self.rows[0] if self.rows else None


_driver_statements: dict[tuple[ClauseElement, str], _DriverStatement] = {}


def run_on_driver(connection: Connection, statement: ClauseElement,
                  params: dict[str, Any]) -> DriverResult:
    """Run a Core statement on the connection's DBAPI cursor (the saga log's hot path).

    The statement is compiled once per process, and parameters and results go through
    SQLAlchemy's own type processors, but SQLAlchemy's per-execution machinery (execution
    context, cursor result) is skipped: it costs as much CPU as the driver itself. Rows have
    their fields by name. Driver errors become SQLAlchemy's exceptions, and a lost connection
    is invalidated, as ``Connection.execute`` would do.
    """
    dialect = connection.dialect
    key = (statement, dialect.name)
    compiled = _driver_statements.get(key)
    if compiled is None:
        compiled = _driver_statements[key] = _DriverStatement.compile(statement, dialect)
    args = compiled.arguments(params)
    dbapi_connection: Any = connection.connection.dbapi_connection
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(compiled.sql, args)
        rows = []
        if cursor.description:
            if compiled.row_type is None:
                compiled.row_type = namedtuple(  # type: ignore[misc]
                    "Row", [d[0] for d in cursor.description], rename=True)
            processors = compiled.result_processors
            for found in cursor.fetchall():
                if processors is not None:
                    found = [p(v) if p else v for p, v in zip(processors, found, strict=True)]
                rows.append(compiled.row_type(*found))
        return DriverResult(rows, cursor.rowcount)
    except dialect.loaded_dbapi.Error as err:
        lost = dialect.is_disconnect(err, dbapi_connection, cursor)
        if lost:
            connection.invalidate(err)
        raise exc.DBAPIError.instance(compiled.sql, args, err, dialect.loaded_dbapi.Error,
                                      connection_invalidated=lost) from err
    finally:
        cursor.close()


class Database:
    """One engine and session factory per process and URL."""

    def __init__(self, url: str, *, idle_in_transaction_timeout_s: float | None = None) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url,
                                  idle_in_transaction_timeout_s=idle_in_transaction_timeout_s)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        #: Sessions that only read: on SQLite they take no write lock (``BEGIN``, not
        #: ``BEGIN IMMEDIATE``), so they do not queue behind writers.
        self.read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}),
                                          expire_on_commit=False)
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._pins = threading.local()
        #: SQLite: this process's write transactions take turns (see the module docstring) on
        #: one connection (``_sqlite_writer``).
        self._writer: threading.RLock | None = (
            None if self.engine.dialect.name == "postgresql" else threading.RLock())
        self._writer_connection: Connection | None = None

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @property
    def one_writer(self) -> bool:
        """Whether this process's writes run one at a time, on one connection (SQLite)."""
        return self._writer is not None

    @contextmanager
    def _sqlite_writer(self) -> Iterator[Connection]:
        """SQLite: this process's writer connection, held with its writer lock.

        Every write transaction of the process runs on this one connection, one at a time (the
        database admits one writer anyway). A write needs no pool checkout, and the connection's
        page cache stays warm: SQLite drops a connection's whole cache whenever another
        connection has written since its last transaction, so writers taking turns on pooled
        connections re-read their pages every time. A connection left unusable (invalidated, or
        still in a transaction after an error) is replaced by the next writer. Lock order:
        the lock, then the connection; no writer holds a pooled connection while it waits for
        the lock.
        """
        assert self._writer is not None
        with self._writer:
            connection = self._writer_connection
            if connection is None:
                connection = self._writer_connection = self.engine.connect()
            if _in_transaction(connection):  # only a nested write could see this
                raise RuntimeError("a write transaction is already open in this thread")
            try:
                yield connection
            finally:
                if connection.closed or connection.invalidated or _in_transaction(connection):
                    self._writer_connection = None
                    with contextlib.suppress(Exception):
                        connection.close()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits on success and rolls back on any error."""
        if self._writer is None:
            with (self.engine.connect() as connection,
                  self.sessions(bind=connection) as session, session.begin()):
                yield session
            return
        with (self._sqlite_writer() as connection, self.sessions(bind=connection) as session,
              session.begin()):
            yield session

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A Core connection in a write transaction: commits on success, rolls back on error.

        On SQLite the transaction begins and ends on the driver: SQLAlchemy's own transaction
        bookkeeping took about 25 µs of CPU per transaction, as much as the ``BEGIN
        IMMEDIATE``, a one-row UPDATE and the ``COMMIT`` on the driver, and a saga makes six. A
        statement run through SQLAlchemy inside the block (``execute``) makes it begin its own
        view of the same transaction (its begin hook sees the driver's), which then ends
        through SQLAlchemy.
        """
        if self._writer is None:
            with self.engine.connect() as connection, connection.begin():
                yield connection
            return
        with self._sqlite_writer() as connection:
            dbapi_connection = connection.connection.dbapi_connection
            _on_driver(dbapi_connection, "BEGIN IMMEDIATE")
            try:
                yield connection
                if connection.in_transaction():
                    connection.commit()
                else:
                    _on_driver(dbapi_connection, "COMMIT")
            except BaseException:
                # A connection left in its transaction (the rollback failed too) is replaced.
                with contextlib.suppress(Exception):
                    if connection.in_transaction():
                        connection.rollback()
                    else:
                        _on_driver(dbapi_connection, "ROLLBACK")
                raise

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A Core connection on which every statement commits by itself (PostgreSQL runs one
        statement atomically, so a single-statement write needs no BEGIN/COMMIT round trips)."""
        pinned = self._pinned() if self.is_postgres else None
        if pinned is None:
            with self._autocommit.connect() as connection:
                yield connection
            return
        try:
            yield pinned
            pinned.commit()  # ends SQLAlchemy's implicit transaction; no round trip
        except BaseException:
            self._unpin()
            raise

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A Core connection for reads only: on PostgreSQL in autocommit (each statement sees
        the latest commit; no BEGIN/ROLLBACK round trips), on SQLite without the write lock."""
        if self.is_postgres:
            with self.autocommit() as connection:
                yield connection
            return
        with self.engine.connect() as connection:
            connection.execution_options(**{READ_ONLY: True})
            yield connection

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """Within the block, the calling thread's saga-log writes on PostgreSQL
        (``autocommit``) share one pooled connection instead of checking one out each time.
        Between writes it holds no transaction, so it blocks nobody; one that the server has
        closed, or that failed, is replaced. (On SQLite every write already runs on the
        process's writer connection.)"""
        if getattr(self._pins, "active", False):
            yield
            return
        self._pins.active, self._pins.connection = True, None
        try:
            yield
        finally:
            self._unpin()
            self._pins.active = False

    def _pinned(self) -> Connection | None:
        if not getattr(self._pins, "active", False):
            return None
        connection: Connection | None = self._pins.connection
        if connection is not None and _hung_up(connection.connection.dbapi_connection):
            connection.invalidate()
            self._unpin()
            connection = None
        if connection is None:
            connection = self._autocommit.connect()
            self._pins.connection = connection
        return connection

    def _unpin(self) -> None:
        """Give the pinned connection back (a later write checks out another)."""
        connection, self._pins.connection = self._pins.connection, None
        if connection is not None:
            connection.close()

    def dispose(self) -> None:
        if self._writer is not None:
            with self._writer:
                connection, self._writer_connection = self._writer_connection, None
                if connection is not None:
                    connection.close()
        self.engine.dispose()
