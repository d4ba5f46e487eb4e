"""Readiness: whether this process can do its work now, check by check.

``/readyz`` reports the saga database (one ``SELECT 1``), the executor (its worker threads
alive, when this process runs them) and the lake (attached read-write, its data directory
writable, when this process attached it). Every check is cheap and writes nothing to the
database or the lake catalog, so a probe every second costs nothing measurable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from app.service import Service

NOT_HERE = "not run by this process (lakesaga serve --no-workers)"


def readiness(service: Service) -> dict[str, dict[str, Any]]:
    """``{check: {"ok": bool, "detail": str}}`` for the database, the executor and the lake."""
    return {"database": _database(service), "executor": _executor(service),
            "lake": _lake(service)}


def _database(service: Service) -> dict[str, Any]:
    try:
        with service.db.reading() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return {"ok": False, "detail": f"the saga database is unavailable ({type(exc).__name__})"}
    return {"ok": True, "detail": "answers"}


def _executor(service: Service) -> dict[str, Any]:
    if service.executor is None:
        return {"ok": True, "detail": NOT_HERE}
    alive, configured = service.executor.workers_alive()
    return {"ok": alive == configured,
            "detail": f"{alive} of {configured} worker threads alive"}


def _lake(service: Service) -> dict[str, Any]:
    lake = service.attached_lake
    if lake is None:
        return {"ok": True, "detail": NOT_HERE}
    try:
        problem = lake.problem()
    except Exception as exc:  # an invalidated DuckDB instance raises on any query
        problem = f"the lake does not answer ({type(exc).__name__})"
    return {"ok": problem is None, "detail": problem or "attached read-write, data directory writable"}
