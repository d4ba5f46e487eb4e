"""``Lake.reset()`` after the PostgreSQL catalog's connections died must not abort the process.

DuckDB rolls an open transaction back when the connection that holds it is closed or freed; with
its PostgreSQL connection gone (or the instance invalidated by a fatal error) that rollback
throws inside a C++ destructor and the process aborts (std::terminate, exit -6). A ``lakesaga
serve`` died so when PostgreSQL restarted while one thread rebuilt the lake and another thread's
cursor was inside a transaction. The scenario runs in a child process, since the failure is an
abort.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres

CHILD = textwrap.dedent("""
    import gc, sys, threading, time
    from pathlib import Path

    import psycopg
    from sqlalchemy.engine import make_url

    from app.lakehouse.duck import Lake
    from app.settings import Settings

    url, home = sys.argv[1], Path(sys.argv[2])
    (home / "raw").mkdir(parents=True, exist_ok=True)
    lake = Lake(Settings(database_url=url, source_root=home / "raw", lake_dir=home / "lake",
                         duckdb_memory_limit="512MiB"))
    lake.cursor().execute("CREATE TABLE IF NOT EXISTS lake.t AS SELECT range AS i FROM range(10)")

    in_transaction, reset_done, finished = threading.Event(), threading.Event(), []

    def other_thread():
        cur = lake.cursor()
        cur.execute("BEGIN")
        cur.execute("INSERT INTO lake.t SELECT 42").fetchall()
        in_transaction.set()          # left open, as a thread interrupted mid-step leaves it
        reset_done.wait(30)
        cur = lake.cursor()           # the new instance; the old cursor is dropped here
        finished.append(cur.execute("SELECT count(*) FROM lake.t").fetchall()[0][0])

    thread = threading.Thread(target=other_thread)
    thread.start()
    assert in_transaction.wait(30)
    admin = make_url(url).set(drivername="postgresql", database="postgres")
    database = make_url(url).database
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as pg:
        killed = pg.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = %s", [database]).fetchone()[0]
        assert killed >= 1, killed
        deadline = time.monotonic() + 30  # pg_terminate_backend does not wait for them to go
        while pg.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                         [database]).fetchone()[0]:
            assert time.monotonic() < deadline, "backends still alive after 30 s"
            time.sleep(0.05)
    lake.reset()
    reset_done.set()
    thread.join(30)
    gc.collect()
    lake.close()
    print("rows after reset:", finished)
""")


def test_lake_reset__with_a_transaction_open_on_dead_connections_does_not_abort(
        pg_database_factory: Callable[[], str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESAGA_")}
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", CHILD, pg_database_factory(), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2], env=env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "terminate called" not in result.stderr, result.stderr
    # The open transaction died with its connection: the new instance sees the 10 rows only.
    assert "rows after reset: [10]" in result.stdout, result.stdout
