"""DuckDB connection with DuckLake attached, and offline extension loading.

Extensions come from the ``duckdb-extension-*`` PyPI wheels pinned to the duckdb version (no
network at run time); where a wheel is absent we fall back to DuckDB's own INSTALL/LOAD. One
connection per worker process keeps the lake attached; each thread works on its own cursor.

Once the lake is attached the connection is locked down: files only inside the source root and
the lake directory, no new network connections, attachments or extensions, and the
configuration itself locked, so that no SQL run later (spec SQL included) can widen it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import glob
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
from sqlalchemy.engine import make_url

from app.faults import fault_point
from app.saga.fencing import check_owner
from app.settings import Settings

log = logging.getLogger("lakesaga.lake")

#: extension name -> PyPI wheel module that carries it
_EXTENSION_WHEELS = {
    "ducklake": "duckdb_extension_ducklake",
    "postgres_scanner": "duckdb_extension_postgres_scanner",
    "sqlite_scanner": "duckdb_extension_sqlite_scanner",
}
LAKE = "lake"
_ATTACH_ATTEMPTS = 5


def extension_path(name: str) -> Path | None:
    spec = importlib.util.find_spec(_EXTENSION_WHEELS[name])
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    return path if path.exists() else None


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> None:
    # LOAD/INSTALL take no parameters; ``name`` is a key of _EXTENSION_WHEELS.
    path = extension_path(name)
    if path is not None:
        con.execute(f"LOAD {_sql_string(str(path))}")
    else:
        con.execute(f"INSTALL {name}")
        con.execute(f"LOAD {name}")


def libpq_dsn(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg://u:p@h:5432/db`` -> ``dbname=db host=h port=5432 user=u password=p``."""
    url = make_url(sqlalchemy_url)
    parts = {
        "dbname": url.database,
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
    }
    return " ".join(f"{k}={_libpq_quote(str(v))}" for k, v in parts.items() if v)


def _libpq_quote(value: str) -> str:
    if value and all(c.isalnum() or c in "._-/" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def catalog_target(settings: Settings) -> tuple[str, str | None]:
    """The DuckLake ATTACH target and its metadata schema for these settings."""
    if settings.lake_catalog:
        is_pg = settings.lake_catalog.startswith("postgres:")
        return settings.lake_catalog, settings.lake_metadata_schema if is_pg else None
    if settings.is_postgres:
        return f"postgres:{libpq_dsn(settings.database_url)}", settings.lake_metadata_schema
    return f"sqlite:{settings.lake_dir / 'catalog.sqlite'}", None


class LakeUnavailable(RuntimeError):
    """The DuckLake catalog could not be attached (message already free of secrets)."""


def redact_dsn(text: str) -> str:
    """Hide the passwords of libpq connection strings in ``text``: ``password=...`` values, and
    the ``user:password@`` of URIs (``postgres:postgresql://u:p@host/db`` is a valid catalog)."""
    text = re.sub(r"(password=)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)
    return re.sub(r"(://[^:/@\s]*:)[^/@\s]*@", r"\1***@", text)


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class WriteGuard:
    """Serializes lake work: one lake step at a time per process, and per lake directory when
    the DuckLake catalog is a SQLite file (reentrant).

    A SQLite catalog takes its locks for the whole lake transaction; two writers (threads, or
    processes sharing the lake directory) then time out on each other's locks and both fail.
    A thread lock plus an exclusive ``flock`` on ``<lake_dir>/.write.lock`` make them queue
    instead. On a PostgreSQL catalog only the thread lock is taken: processes run their steps
    side by side, and a process's steps share one DuckDB memory budget one at a time.
    """

    def __init__(self, lock_file: Path | None) -> None:
        self._thread_lock = threading.RLock()
        self._lock_file = lock_file
        self._depth = 0
        self._fd: int | None = None

    def __enter__(self) -> WriteGuard:
        self._thread_lock.acquire()
        if self._lock_file is not None and self._depth == 0:
            self._fd = os.open(self._lock_file, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._depth += 1
        return self

    def __exit__(self, *_: object) -> None:
        self._depth -= 1
        if self._fd is not None and self._depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        self._thread_lock.release()


#: The guard of the lake each cursor belongs to (cursors are handed out by ``Lake.cursor``).
_GUARDS: dict[int, WriteGuard] = {}


def write_guard(cur: duckdb.DuckDBPyConnection) -> contextlib.AbstractContextManager[Any]:
    """The guard to hold around lake work that must not interleave with other writers."""
    return _GUARDS.get(id(cur), contextlib.nullcontext())


@contextlib.contextmanager
def lake_write(cur: duckdb.DuckDBPyConnection, tag: str, message: str) -> Iterator[None]:
    """One lake transaction, tagged with who writes and why, committed when the body ends.

    Any failure inside rolls back, so the cursor is never left in an aborted transaction. The
    message's first word names the fault points ``<word>.before_commit`` / ``.after_commit``.
    """
    point = message.split()[0]
    with write_guard(cur):
        try:
            begin_tagged(cur, tag, message)
            yield
            fault_point(f"{point}.before_commit")
            check_owner()  # a zombie resuming here must not commit over the new owner
            cur.execute("COMMIT")
        except BaseException:
            rollback_quietly(cur)
            raise
    fault_point(f"{point}.after_commit")


class Lake:
    """A DuckDB database with the DuckLake catalog attached as ``lake``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_path = settings.lake_dir / "data"
        self.data_path.mkdir(parents=True, exist_ok=True)
        self._target, metadata_schema = catalog_target(settings)
        self._metadata_schema = metadata_schema
        #: Where DuckLake's own metadata tables can be queried (``<prefix>.ducklake_data_file``).
        self.metadata_prefix = f"__ducklake_metadata_{LAKE}" + (
            f".{quote_identifier(metadata_schema)}" if metadata_schema else "")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._generation = 0
        #: The cursors handed out from ``self.con`` (one per thread that asked).
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        #: The DuckLake catalog is a SQLite file (else PostgreSQL, or a DuckDB file).
        self.sqlite_catalog = self._target.startswith("sqlite:")
        self.write_guard = WriteGuard(settings.lake_dir / ".write.lock" if self.sqlite_catalog
                                      else None)
        self.con = self._connect()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        config: dict[str, str | int] = {
            "autoinstall_known_extensions": "false",
            "autoload_known_extensions": "false",
            "allow_community_extensions": "false",
        }
        memory_limit = self.settings.duckdb_memory_limit_bytes
        if memory_limit:
            config["memory_limit"] = f"{memory_limit // 2**20}MiB"
        if self.settings.duckdb_threads:
            config["threads"] = self.settings.duckdb_threads
        con = duckdb.connect(config=config)  # type: ignore[arg-type]
        for name in self._extensions():
            load_extension(con, name)
        options = [f"DATA_PATH {_sql_string(str(self.data_path) + '/')}"]
        if self._metadata_schema:
            options.append(f"METADATA_SCHEMA {_sql_string(self._metadata_schema)}")
        # ATTACH takes no parameters: the target (a libpq DSN or a file path) is quoted instead.
        attach = f"ATTACH {_sql_string('ducklake:' + self._target)} AS {LAKE} ({', '.join(options)})"
        for attempt in range(1, _ATTACH_ATTEMPTS + 1):
            try:
                con.execute(attach)
                break
            except duckdb.Error as exc:
                # Workers starting together on a new catalog race to create its metadata
                # tables; the loser succeeds on a retry.
                if attempt == _ATTACH_ATTEMPTS:
                    con.close()
                    # DuckDB repeats the connection string, password included, in its message.
                    raise LakeUnavailable(
                        f"cannot attach the lake: {redact_dsn(str(exc))}") from None
                time.sleep(0.2 * attempt)
        try:
            self._lock_down(con)
        except BaseException:
            con.close()
            raise
        return con

    def _extensions(self) -> list[str]:
        """DuckLake and only the scanner its catalog needs.

        Both scanners bypass ``enable_external_access`` in part (``sqlite_scan``/``ATTACH
        (TYPE sqlite)`` open any SQLite file, ``postgres_scan`` connects to any DSN), so a
        connection only carries the one its catalog cannot do without.
        """
        scanners = {"sqlite:": "sqlite_scanner", "postgres:": "postgres_scanner"}
        return ["ducklake"] + [ext for prefix, ext in scanners.items()
                               if self._target.startswith(prefix)]

    def _lock_down(self, con: duckdb.DuckDBPyConnection) -> None:
        """Confine the connection to the source root and the lake directory, for good.

        Runs after the extensions are loaded and the lake is attached: the catalog's own
        connections (SQLite file, PostgreSQL) stay open, but nothing new can be attached,
        loaded or reached over the network, and ``lock_configuration`` makes every later
        ``SET`` fail. DuckDB checks the resolved path of every file, so a symlink under an
        allowed directory that leads elsewhere is refused too.
        """
        allowed = [str(self.settings.source_root.resolve()) + "/",
                   str(self.settings.lake_dir.resolve()) + "/"]
        con.execute("SET allowed_directories = ?", [allowed])
        if self.sqlite_catalog:  # wherever LAKESAGA_LAKE_CATALOG puts the file
            catalog = Path(self._target.removeprefix("sqlite:")).resolve()
            con.execute("SET allowed_paths = ?", [[str(catalog)]])
        con.execute("SET temp_directory = ?", [str(self._temp_directory())])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")

    def _temp_directory(self) -> Path:
        """A spill directory of this connection alone, under ``<lake_dir>/tmp``.

        Several processes (on several hosts) share the lake directory, so each connection gets
        its own; DuckDB creates it on first spill and removes it on close. Those left by killed
        processes of this host are removed here.
        """
        parent = self.settings.lake_dir / "tmp"
        parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for stale in parent.glob(f"{glob.escape(host)}-*-*"):
            pid = stale.name.removeprefix(f"{host}-").split("-", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        return parent / f"{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def reset(self) -> None:
        """Replace a DuckDB instance that a fatal error invalidated (seen when PostgreSQL dies
        mid-query); every thread gets a fresh cursor on its next ``cursor()``.

        The old instance and its cursors are retired, never closed or freed: a cursor can still
        hold an open transaction (a ROLLBACK refused by the invalidated instance, or another
        thread's unfinished work), and DuckDB rolls such a transaction back in a C++ destructor,
        where the error it then raises aborts the whole process (std::terminate). Each rebuild
        therefore keeps the old instance's memory until the process ends.
        """
        with self._lock:
            new = self._connect()
            for retired in (self.con, *self._cursors):
                _keep_forever(retired)
            self.con, self._cursors = new, []
            self._generation += 1
            rebuilds = self._generation
        log.warning("lake: DuckDB instance rebuilt after a fatal error (%d in this process); the "
                    "old one is kept, not closed, until the process exits: restart it to release "
                    "their memory", rebuilds)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (DuckDB connections are not shared across threads)."""
        cur = getattr(self._local, "cursor", None)
        if cur is None or self._local.generation != self._generation:
            with self._lock:
                cur = self.con.cursor()
                self._cursors.append(cur)
                self._local.generation = self._generation
            _GUARDS[id(cur)] = self.write_guard
            self._local.cursor = cur
        return cur

    def current_snapshot(self, cur: duckdb.DuckDBPyConnection | None = None) -> int:
        row = first_row((cur or self.cursor()).execute(f"SELECT id FROM {LAKE}.current_snapshot()"))
        assert row is not None
        return int(row[0])

    def problem(self) -> str | None:
        """Why the lake cannot take writes now, or None: the catalog is attached read-write and
        a file can be created in the data directory. Cheap (no catalog read, no commit), for
        readiness probes; the message names no path."""
        with contextlib.closing(self.con.cursor()) as cur:
            row = first_row(cur.execute("SELECT readonly FROM duckdb_databases() "
                                        "WHERE database_name = ?", [LAKE]))
        if row is None:
            return "the lake catalog is not attached"
        if row[0]:
            return "the lake catalog is attached read-only"
        try:
            with tempfile.TemporaryFile(dir=self.data_path) as probe:
                probe.write(b"\0")
        except OSError as exc:
            return f"the lake data directory is not writable ({exc.strerror or type(exc).__name__})"
        return None

    def close(self) -> None:
        self.con.close()


def _keep_forever(obj: object) -> None:
    """Take a reference to ``obj`` that is never given back, so that not even the interpreter's
    shutdown frees it (a list would be emptied then). For DuckDB objects whose destructor can
    abort the process (see ``Lake.reset``)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def first_row(result: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """The first row of a result, read to the end.

    A half-read result keeps DuckDB's transaction open, and with it a read lock on a SQLite
    DuckLake catalog that blocks every other commit: never use ``fetchone`` on the lake.
    """
    rows = result.fetchall()
    return rows[0] if rows else None


def commit_tag(saga_id: str, step: str, epoch: int, attempt: int) -> str:
    """The ``extra_info`` a step's lake commit carries: lets anyone find the snapshot it made."""
    return json.dumps(
        {"saga_id": saga_id, "step": step, "epoch": epoch, "attempt": attempt}, sort_keys=True
    )


def begin_tagged(cur: duckdb.DuckDBPyConnection, tag: str, message: str) -> None:
    """Open a lake transaction whose commit records who wrote it and why.

    Call it inside the ``try`` whose ``except`` rolls back: the CALL can fail after BEGIN.
    """
    rollback_quietly(cur)  # a transaction left open by an earlier failure poisons the cursor
    cur.execute("BEGIN")
    cur.execute(
        f"CALL {LAKE}.set_commit_message('lakesaga', ?, extra_info => ?)", [message, tag]
    )


def snapshot_of(cur: duckdb.DuckDBPyConnection, tag: str) -> int | None:
    """The snapshot committed with ``tag``, or None if that commit never landed."""
    row = first_row(cur.execute(
        f"SELECT max(snapshot_id) FROM {LAKE}.snapshots() WHERE commit_extra_info = ?", [tag]
    ))
    return None if row is None or row[0] is None else int(row[0])


def rollback_quietly(cur: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # no transaction was open
        cur.execute("ROLLBACK")
