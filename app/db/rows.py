"""Helpers every writer of the saga database uses, whatever it writes: the clock the schema
stores (naive UTC on both backends) and the row count a compare-and-set checks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Result


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE/DELETE (what every compare-and-set checks)."""
    return int(cast("CursorResult[Any]", result).rowcount)


def utcnow() -> datetime:
    """Naive UTC: the log stores naive UTC timestamps on both backends."""
    return datetime.now(UTC).replace(tzinfo=None)
