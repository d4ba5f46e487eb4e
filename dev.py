#!/usr/bin/env python3
"""Developer entry point: sets up .venv on demand, then runs the requested task.

    python3 dev.py demo [args...]   # run the end-to-end demo
    python3 dev.py test [pytest args...]
    python3 dev.py lint             # ruff check + mypy
    python3 dev.py bench            # bench/run.py
    python3 dev.py setup            # only create/update .venv
    python3 dev.py <anything else>  # passed through to the `lakesaga` CLI (e.g. serve)

Standard library only, so it runs before any dependency is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

MIN_PYTHON = (3, 11)
ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
PY = BIN / "python"
STAMP = VENV / ".lakesaga-install"
PIP_ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def say(msg: str) -> None:
    print(f"dev.py: {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 1) -> NoReturn:
    say(f"error: {msg}")
    sys.exit(code)


def run(cmd: list[str | Path], env: dict[str, str] | None = None, to_stderr: bool = False) -> int:
    out = sys.stderr if to_stderr else None  # keeps stdout clean, e.g. `dev.py openapi > x`
    argv = [str(c) for c in cmd]
    return subprocess.run(argv, cwd=ROOT, env=env, stdout=out).returncode  # noqa: S603


def pip(*args: str) -> int:
    return run([PY, "-m", "pip", *args], env=PIP_ENV, to_stderr=True)


def pyproject_hash() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_env() -> None:
    if sys.version_info < MIN_PYTHON:
        die(
            f"Python >= {'.'.join(map(str, MIN_PYTHON))} is required, "
            f"this is {sys.version.split()[0]} ({sys.executable})"
        )
    if not PY.exists():
        say("creating .venv")
        if run([sys.executable, "-m", "venv", "--clear", VENV], to_stderr=True) != 0:
            die("could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)")
        if pip("install", "-q", "--upgrade", "pip") != 0:
            say("warning: could not upgrade pip in .venv, continuing with the bundled one")
    wanted = pyproject_hash()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    say("installing dependencies (first run takes a minute)")
    if pip("install", "-q", "-e", ".[test]") != 0:
        die("pip install -e '.[test]' failed (see output above)")
    STAMP.write_text(wanted + "\n")


def exec_tool(name: str, args: list[str]) -> NoReturn:
    tool = BIN / name
    if not tool.exists():
        die(f"{tool} not found; is the project installed? (delete {STAMP} to force a reinstall)")
    os.chdir(ROOT)
    os.execv(tool, [str(tool), *args])  # noqa: S606


def cmd_test(args: list[str]) -> int:
    code = run([PY, "-m", "pytest", *(args or ["-q"])])
    if code == 5:
        say("pytest collected no tests -- treating that as a failure")
        return 1
    return code


def cmd_lint(args: list[str]) -> int:
    ruff = run([BIN / "ruff", "check", "app", "tests", "migrations", "bench", "dev.py", *args])
    mypy = run([BIN / "mypy", "app"])
    return 1 if ruff or mypy else 0


def cmd_bench(args: list[str]) -> int:
    script = ROOT / "bench" / "run.py"
    if not script.exists():
        say("benchmarks are not written yet (bench/run.py is missing)")
        return 1
    return run([PY, script, *args])


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    ensure_env()
    if command == "setup":
        return 0
    if command == "test":
        return cmd_test(args)
    if command == "lint":
        return cmd_lint(args)
    if command == "bench":
        return cmd_bench(args)
    # "demo" and everything else go straight to the CLI (exec: signals and exit code pass through).
    exec_tool("lakesaga", [command, *args])


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
