"""Shared plumbing of the bench scripts: the bench venv, result files, machine details,
percentiles, child processes measured with ``wait4`` (peak RSS), PostgreSQL scratch databases
and a ``lakesaga serve`` subprocess with an API key.

Standard library at import time; the app and third-party packages are imported where used, so
``python3 bench/x.py`` can re-execute itself under ``.venv-bench`` before anything else loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
VENV = ROOT / ".venv-bench"
VENV_PY = VENV / "bin" / "python"
#: Scratch data (generated input, lakes, saga databases); ``var/`` is gitignored.
WORK = ROOT / "var" / "bench"
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PARTITION = "2026-01-06"


def ensure_bench_python() -> None:
    """Re-execute under ``.venv-bench`` (sagaz, dbos, psutil live only there)."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not VENV_PY.exists():
        sys.exit("bench: .venv-bench is missing; create it with\n"
                 f"  python3 -m venv {VENV} && {VENV_PY} -m pip install -e '{ROOT}[test]' "
                 f"-r {BENCH / 'requirements.txt'}\n(or run `make bench`, which does this)")
    os.execv(VENV_PY, [str(VENV_PY), *sys.argv])  # noqa: S606


def result_path(name: str, quick: bool) -> Path:
    """Quick (smoke) results never overwrite, and are never rendered as, real results."""
    return RESULTS / f"{name}{'.quick' if quick else ''}.json"


def write_result(name: str, quick: bool, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(name, quick)
    payload = {"benchmark": name, "quick": quick, "command": command_line(),
               "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def command_line() -> str:
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *sys.argv[1:]])


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def postgres_version() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else None
    except Exception:
        return None


#: Iterations of ``python_loop_s``'s loop.
LOOP_ITERATIONS = 5_000_000


def python_loop_s() -> float:
    """Seconds a fixed pure-Python loop (``total += i``, ``LOOP_ITERATIONS`` times) takes here
    and now, best of 3: how fast this host runs the interpreter, so that absolute figures of runs
    made on different hosts (or on a busy one) can be compared. The ratios do not need it."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(LOOP_ITERATIONS):
            total += i
        best = min(best, time.perf_counter() - started)
    return best


def machine_info() -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "app"],
                                    capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(int(mem.group(1)) / 1024**2, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": postgres_version(),
        "packages": {p: _version(p) for p in ("duckdb", "sqlalchemy", "psycopg", "fastapi",
                                              "uvicorn", "httptools", "uvloop", "httpx",
                                              "sagaz", "dbos", "aiosqlite")},
        "git_commit": commit,
        "app_dirty": dirty,
        # As the benchmark began (print_header), else now.
        "loadavg": _before.get("loadavg") or list(os.getloadavg()),
        "python_loop_s": _before.get("python_loop_s") or python_loop_s(),
    }


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (no interpolation): a value that was actually observed."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(pct / 100 * len(ordered) + 0.5))))
    return ordered[rank - 1]


def latency_summary(values_s: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p99, max in milliseconds."""
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {"n": len(values_s), "p50_ms": ms(percentile(values_s, 50)),
            "p99_ms": ms(percentile(values_s, 99)), "max_ms": ms(max(values_s) if values_s else None)}


def median(values: Iterable[float]) -> float | None:
    import statistics

    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (also readable on a terminal)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@dataclass
class Finished:
    """A child process that has exited, with its own resource usage."""

    returncode: int
    maxrss_mib: float
    user_s: float
    sys_s: float
    stdout: str = ""
    stderr: str = ""


def wait_child(proc: subprocess.Popen[Any]) -> tuple[int, resource.struct_rusage]:
    """``wait4`` the child: its own rusage (ru_maxrss = its peak RSS, in KiB on Linux)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def exited(proc: subprocess.Popen[Any]) -> bool:
    """Whether the child has exited, without reaping it (``wait_child`` still gets its rusage)."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None,
                 timeout_s: float = 3600) -> Finished:
    """Run a command to completion; its stdout/stderr and its own peak RSS and CPU time."""
    out_path = WORK / f".child-{os.getpid()}-{time.monotonic_ns()}"
    WORK.mkdir(parents=True, exist_ok=True)
    with open(f"{out_path}.out", "w+") as out, open(f"{out_path}.err", "w+") as err:
        proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=err, cwd=ROOT)  # noqa: S603
        deadline = time.monotonic() + timeout_s
        # Popen.poll() would reap the child and lose its rusage: peek with waitid(WNOWAIT).
        while not exited(proc):
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.01)
        code, usage = wait_child(proc)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for suffix in (".out", ".err"):
        Path(f"{out_path}{suffix}").unlink(missing_ok=True)
    return Finished(code, usage.ru_maxrss / 1024, usage.ru_utime, usage.ru_stime, stdout, stderr)


def recreate_pg_database(name: str) -> str:
    """Drop and create a scratch database; returns its URL (127.0.0.1, trust auth)."""
    import psycopg
    from psycopg import sql

    if not re.fullmatch(r"bench_[a-z0-9_]{1,50}", name):
        raise ValueError(f"refusing to recreate database {name!r}: bench databases are bench_*")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def migrated_saga_log(backend: str, name: str) -> str:
    """A new, migrated saga log on ``backend`` (``postgres``: database ``bench_<name>``; else a
    SQLite file under WORK/<name>); its URL."""
    from app.db.migrate import upgrade

    if backend == "postgres":
        url = recreate_pg_database(f"bench_{name}")
    else:
        url = f"sqlite:///{fresh_dir(WORK / name) / 'sagas.db'}"
    upgrade(url)
    return url


def drop_pg_database(name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def lakesaga_bin() -> str:
    return str(Path(sys.executable).parent / "lakesaga")


def admin_token(database_url: str) -> str:
    """Migrate the saga database and create an admin API key in it."""
    from app.auth import create_key
    from app.db.migrate import upgrade
    from app.db.session import Database

    upgrade(database_url)
    db = Database(database_url)
    try:
        token, _ = create_key(db, f"bench-{os.getpid()}", ["admin"])
    finally:
        db.dispose()
    return token


def lakesaga_env(database_url: str, source_root: Path, lake_dir: Path,
                 **settings: str | int | float | None) -> dict[str, str]:
    """The environment of a lakesaga process: only LAKESAGA_* settings differ from ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESAGA_")}
    env.update({
        "LAKESAGA_DATABASE_URL": database_url,
        "LAKESAGA_SOURCE_ROOT": str(source_root),
        "LAKESAGA_LAKE_DIR": str(lake_dir),
        "LAKESAGA_LOG_LEVEL": "WARNING",
    })
    for key, value in settings.items():
        if value is not None and value != "":
            env[f"LAKESAGA_{key.upper()}"] = str(value)
    return env


@dataclass
class Server:
    """A ``lakesaga serve`` subprocess on a loopback port, measured with ``wait4`` on stop."""

    env: dict[str, str]
    workers: bool = True
    #: ``--processes``: API processes (uvicorn workers under one supervisor process).
    processes: int = 1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> Server:
        WORK.mkdir(parents=True, exist_ok=True)
        self.log_path = WORK / f"server-{self.port}.log"
        cmd = [lakesaga_bin(), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if not self.workers:
            cmd.append("--no-workers")
        if self.processes > 1:
            cmd += ["--processes", str(self.processes)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log,  # noqa: S603
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if exited(self.proc):
                wait_child(self.proc)
                raise RuntimeError(f"lakesaga serve exited {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"lakesaga serve not ready after {timeout_s} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path and self.log_path.exists() else ""

    def rss_mib(self) -> float | None:
        import psutil

        if self.proc is None:
            return None
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self, timeout_s: float = 30) -> Finished:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not exited(self.proc):
                time.sleep(0.02)
            if not exited(self.proc):
                self.proc.kill()
        code, usage = wait_child(self.proc)
        if self.log_path:
            self.log_path.unlink(missing_ok=True)
        return Finished(code, usage.ru_maxrss / 1024, usage.ru_utime, usage.ru_stime)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.stop()


#: The load average and interpreter speed as the benchmark began (``print_header``), which
#: ``machine_info`` reports: after the benchmark, the load would be its own.
_before: dict[str, Any] = {}


def print_header(title: str, quick: bool) -> None:
    _before["loadavg"] = list(os.getloadavg())
    _before["python_loop_s"] = python_loop_s()
    load = ", ".join(f"{x:.2f}" for x in _before["loadavg"])
    note = " (quick smoke run: numbers are not results)" if quick else ""
    print(f"\n## {title}{note}\nload average before: {load}; "
          f"Python loop: {_before['python_loop_s']:.2f} s\n", flush=True)
