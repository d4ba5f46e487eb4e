"""The ``lakesaga`` command: serve, worker, db upgrade, generate, demo, openapi, maintenance."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from app.settings import get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.db.session import Database

cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Crash-safe lakehouse ingestion sagas (Bronze -> Silver -> Gold).")
db_cli = typer.Typer(no_args_is_help=True, help="Saga database schema.")
cli.add_typer(db_cli, name="db")
keys_cli = typer.Typer(no_args_is_help=True, help="API keys for the HTTP API (Bearer tokens).")
cli.add_typer(keys_cli, name="keys")
console = Console(highlight=False, soft_wrap=True)


def _logging() -> None:
    from app.logs import configure_logging

    configure_logging(get_settings().log_level)


@cli.command()
def serve(host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
          workers: Annotated[bool | None, typer.Option(
              "--workers/--no-workers", show_default=False,
              help="Run the saga executor in each API process "
                   "[default: LAKESAGA_SERVE_WORKERS, true].")] = None,
          processes: Annotated[int | None, typer.Option(
              min=1, max=64, show_default=False,
              help="API processes sharing the port, each with its own database pool (and "
                   "executor) [default: LAKESAGA_SERVE_PROCESSES, 1].")] = None,
          ) -> None:
    """Run the HTTP API (and, by default, the saga executor) in this process, or in N."""
    import os
    import socket

    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from app.db.migrate import upgrade
    from app.logs import uvicorn_log_config

    _logging()
    settings = get_settings()
    if settings.auto_migrate:
        upgrade(settings.database_url)  # once, before any process starts
    # Each process builds its app with serve_app() from the settings; these two reach the
    # processes (spawned, not forked) through their environment.
    os.environ["LAKESAGA_AUTO_MIGRATE"] = "false"
    if workers is not None:
        os.environ["LAKESAGA_SERVE_WORKERS"] = str(workers).lower()
    get_settings.cache_clear()
    count = processes or settings.serve_processes
    log_level = settings.log_level.lower()
    if count == 1:
        uvicorn.run("app.cli:serve_app", factory=True, host=host, port=port, log_level=log_level,
                    log_config=uvicorn_log_config())
        return
    # uvicorn.run with workers=N exits 0 when the processes fail to start: supervise here.
    config = uvicorn.Config("app.cli:serve_app", factory=True, host=host, port=port,
                            log_level=log_level, log_config=uvicorn_log_config(), workers=count)
    listener = config.bind_socket()
    # bind_socket() leaves proto at 0, and asyncio enables TCP_NODELAY only on accepted sockets
    # whose proto is TCP: without it every keep-alive response waits ~40 ms on Nagle and a
    # delayed ACK (uvicorn issue #3149).
    listener = socket.socket(listener.family, listener.type, socket.IPPROTO_TCP,
                             fileno=listener.detach())
    supervisor = Multiprocess(config, sockets=[listener])
    supervisor.run()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise typer.Exit(STARTUP_FAILURE)


def serve_app() -> FastAPI:
    """The app of one ``lakesaga serve`` process (uvicorn calls it in each process)."""
    from app.main import create_app

    _logging()
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        _stop_with_parent(parent.pid)
    settings = get_settings()
    return create_app(settings, run_workers=settings.serve_workers)


def _stop_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM to this process when the supervisor dies, even of SIGKILL,
    so that no orphan keeps serving the port or running sagas (Linux only)."""
    import ctypes
    import os

    libc = ctypes.CDLL(None)
    pr_set_pdeathsig = 1
    if not hasattr(libc, "prctl") or libc.prctl(pr_set_pdeathsig, signal.SIGTERM) != 0:
        return
    if os.getppid() != parent_pid:  # the supervisor died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


@cli.command()
def worker() -> None:
    """Run the saga executor and webhook dispatcher only (scale out with more processes)."""
    from app.service import Service

    _logging()
    service = Service(get_settings())
    service.start_workers()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"worker {service.executor.owner if service.executor else ''} running")
    stop.wait()
    service.close()


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply Alembic migrations to LAKESAGA_DATABASE_URL."""
    from app.db.migrate import upgrade

    upgrade(get_settings().database_url, revision)
    console.print(f"database at {revision}")


def _database() -> Database:
    from app.db.migrate import upgrade
    from app.db.session import Database

    settings = get_settings()
    if settings.auto_migrate:
        upgrade(settings.database_url)
    return Database(settings.database_url)


@keys_cli.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for, e.g. 'airflow-prod'.")],
    scope: Annotated[list[str], typer.Option(
        help="read (GETs), write (submit/cancel/retry sagas, includes read) or admin "
             "(consumers, includes both); repeat for several.")] = ["read"],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a key and print its token. The token is shown only now; only its hash is kept."""
    import json

    from app.auth import InvalidKey, create_key

    db = _database()
    try:
        token, key = create_key(db, name, scope)
    except InvalidKey as exc:
        raise typer.BadParameter(str(exc)) from exc
    finally:
        db.dispose()
    if as_json:
        sys.stdout.write(json.dumps({**key, "token": token}) + "\n")
        return
    console.print(f"key {key['id']} ({name}, scopes {', '.join(key['scopes'])}); token, shown once:")
    sys.stdout.write(token + "\n")


@keys_cli.command("list")
def keys_list() -> None:
    """List keys (never their tokens)."""
    from app.auth import list_keys

    db = _database()
    try:
        keys = list_keys(db)
    finally:
        db.dispose()
    for key in keys:
        state = f"revoked {key['revoked_at']}" if key["revoked_at"] else "active"
        console.print(f"{key['id']}  {key['name']:<24} {','.join(key['scopes']):<18} "
                      f"created {key['created_at']}  {state}")
    if not keys:
        console.print("no keys; create one with `lakesaga keys create NAME --scope write`")


@keys_cli.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id from `keys list`.")]) -> None:
    """Revoke a key; requests with it are refused from now on."""
    from app.auth import revoke_key

    db = _database()
    try:
        revoked = revoke_key(db, key_id)
    finally:
        db.dispose()
    if not revoked:
        console.print(f"no active key {key_id!r}")
        raise typer.Exit(1)
    console.print(f"key {key_id} revoked")


@cli.command()
def generate(
    out: Annotated[Path | None, typer.Option(help="Directory (default: "
                                             "<source root>/clickstream/2026-01-06).")] = None,
    records: int = 145_231,
    files: int = 25,
    seed: int = 42,
) -> None:
    """Write a seed-like raw clickstream dataset (NDJSON), deterministic for a seed."""
    from app.lakehouse.generator import generate_clickstream

    target = out or get_settings().source_root / "clickstream" / "2026-01-06"
    data = generate_clickstream(target, records=records, files=files, seed=seed)
    console.print(f"{data.records:,} records in {len(data.files)} files under {target}: "
                  f"{data.duplicates:,} duplicates, {data.invalid:,} invalid, "
                  f"{data.nulls:,} nulls to fill")


@cli.command()
def demo(
    fail_at: Annotated[str | None, typer.Option(
        help="Make this step fail (e.g. aggregate_to_gold) to see the compensation flow.")] = None,
    workdir: Annotated[Path, typer.Option(help="Demo state (recreated each run).")] = Path(
        "var/demo"),
    records: int = 145_231,
    keep: Annotated[bool, typer.Option(help="Keep earlier demo state.")] = False,
) -> None:
    """Generate data, run the service in-process, ingest over HTTP, print the report."""
    from app.demo import run_demo

    logging.basicConfig(level=logging.ERROR)
    raise typer.Exit(run_demo(workdir.resolve(), fail_at=fail_at, records=records, keep=keep))


@cli.command()
def openapi() -> None:
    """Print the OpenAPI document (YAML) generated from the app."""
    from app.main import create_app
    from app.openapi_doc import render_openapi

    sys.stdout.write(render_openapi(create_app(run_workers=False)))


@cli.command()
def check(
    allow_failed: Annotated[bool, typer.Option(help="Accept sagas left `failed`.")] = False,
    cleanup: Annotated[bool, typer.Option(help="Delete orphaned lake files first.")] = True,
) -> None:
    """Check the invariants (I1-I6) of the saga log, lake, catalog, outbox and raw input."""
    from app.invariants import InvariantChecker
    from app.lakehouse.duck import Lake
    from app.lakehouse.pipeline import load_datasets
    from app.service import Service

    settings = get_settings()
    service = Service(settings)
    lake = Lake(settings)
    try:
        report = InvariantChecker(service.db, lake, load_datasets(settings.datasets_dir),
                                  settings.source_root).check(allow_failed=allow_failed,
                                                              cleanup=cleanup)
    finally:
        lake.close()
        service.close()
    console.print(", ".join(f"{k} {v}" for k, v in sorted(report.stats.items())))
    for violation in report.violations:
        console.print(f"[red]{violation}[/red]")
    console.print("all invariants hold" if report.ok else f"{len(report.violations)} violations")
    raise typer.Exit(0 if report.ok else 1)


@cli.command()
def maintenance(
    older_than: Annotated[str, typer.Option(help="Expire snapshots older than this "
                                            "(DuckDB interval).")] = "7 days",
) -> None:
    """Expire old lake snapshots and delete the data files no snapshot references any more.

    Snapshots an unfinished saga (pending, running, compensating, failed) may restore are kept,
    and so is every later one.
    """
    from app.db.session import Database
    from app.lakehouse.duck import Lake
    from app.lakehouse.maintenance import check_interval, describe, expire_snapshots

    try:
        check_interval(older_than)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    settings = get_settings()
    if settings.auto_migrate:  # the saga log says which snapshots sagas may restore
        from app.db.migrate import upgrade

        upgrade(settings.database_url)
    db = Database(settings.database_url)
    lake = Lake(settings)
    try:
        result = expire_snapshots(db, lake, older_than)
    finally:
        lake.close()
        db.dispose()
    summary = describe(result)
    console.print(f"expired {summary['expired']} snapshots older than {older_than}; kept "
                  f"snapshot {summary['kept_from_snapshot']} and later "
                  f"({summary['sagas_pinning_snapshots']} unfinished sagas may restore them); "
                  "cleaned up old files")


def main() -> None:
    cli()
