"""How saga log rows become API resources: the saga query, its summary, step and consumer
views, and list cursors. Pure rendering; the service decides what to read and who may see it."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Select, bindparam, cast, func, select

from app.db.models import ConsumerRow, SagaRow, SagaStepRow
from app.errors import Problem
from app.saga.states import StepStatus


def iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value else None


def consumer_view(row: ConsumerRow) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "dataset": row.dataset, "url": row.url,
            "created_at": iso(row.created_at)}


_SUMMARY_COLUMNS = ("id", "definition", "dataset", "partition_date", "status", "error",
                    "attempts", "epoch", "cancel_requested", "created_at", "updated_at",
                    "finished_at")
#: Step columns as ``step_<attribute>`` (the saga's own ``status`` and ``error`` keep theirs).
_STEP_COLUMNS = [SagaStepRow.step.label("step_name"), *(column.label(f"step_{column.key}") for column in (
    SagaStepRow.status, SagaStepRow.attempt, SagaStepRow.started_at, SagaStepRow.finished_at,
    SagaStepRow.output, SagaStepRow.error, SagaStepRow.compensation_attempt,
    SagaStepRow.compensation_output, SagaStepRow.compensation_error,
    SagaStepRow.compensation_started_at, SagaStepRow.compensation_finished_at))]


def saga_query(postgres: bool) -> Select[Any]:
    """The saga with one row per step, its manifest summarized by the database: a manifest
    lists every source file (up to LAKESAGA_MAX_SOURCE_FILES), the resource shows counts."""
    count = (func.jsonb_array_length(SagaRow.manifest["files"]) if postgres
             else func.json_array_length(SagaRow.manifest, "$.files"))
    return (
        select(
            *(getattr(SagaRow, name) for name in _SUMMARY_COLUMNS),
            SagaRow.request["source"].label("source"),
            count.label("manifest_files"),
            cast(SagaRow.manifest["total_bytes"].as_string(), BigInteger).label("manifest_bytes"),
            SagaRow.manifest["format"].as_string().label("manifest_format"),
            *_STEP_COLUMNS,
        )
        .outerjoin(SagaStepRow, SagaStepRow.saga_id == SagaRow.id)
        .where(SagaRow.id == bindparam("saga_id"))
        .order_by(SagaStepRow.position)
    )


def accepted_view(row: SagaRow, step_names: list[str]) -> dict[str, Any]:
    """The resource of a saga just inserted, from what was written (no read back): every step
    pending, no deliveries; equal to what ``Service.saga`` reads until a worker claims it."""
    manifest = row.manifest
    return {
        **saga_summary(row),
        "source": row.request.get("source"),
        "manifest": {"files": len(manifest["files"]), "total_bytes": manifest["total_bytes"],
                     "format": manifest["format"]},
        "steps": [{"name": name, "status": StepStatus.PENDING.value, "attempt": 0,
                   "started_at": None, "finished_at": None, "duration_s": None, "metrics": {},
                   "error": None, "compensation": None} for name in step_names],
        "deliveries": [],
    }


def saga_summary(row: Any) -> dict[str, Any]:
    """The summary of a saga from a ``SagaRow`` or a row with its columns by name."""
    return {
        "id": row.id,
        "definition": row.definition,
        "dataset": row.dataset,
        "partition_date": row.partition_date.isoformat(),
        "status": row.status,
        "error": row.error,
        "attempts": row.attempts,
        "epoch": row.epoch,
        "cancel_requested": row.cancel_requested,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "finished_at": iso(row.finished_at),
    }


def step_view(row: Any) -> dict[str, Any]:
    """A step of the saga resource, from a row of the saga query (``step_*`` columns)."""
    compensation = None
    if row.step_compensation_attempt:
        compensation = {
            "status": "compensated" if row.step_status == "compensated" else "compensating",
            "attempt": row.step_compensation_attempt,
            "started_at": iso(row.step_compensation_started_at),
            "finished_at": iso(row.step_compensation_finished_at),
            "metrics": row.step_compensation_output or {},
            "error": row.step_compensation_error,
        }
    started, finished = row.step_started_at, row.step_finished_at
    return {
        "name": row.step_name,
        "status": row.step_status,
        "attempt": row.step_attempt,
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_s": (round((finished - started).total_seconds(), 3)
                       if started and finished else None),
        "metrics": row.step_output or {},
        "error": row.step_error,
        "compensation": compensation,
    }


def encode_cursor(row: SagaRow) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, saga_id = raw.split("|", 1)
        if not saga_id.isprintable():  # NUL, say: PostgreSQL text cannot hold it
            raise ValueError(saga_id)
        return datetime.fromisoformat(created), saga_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(400, "Invalid cursor", "cursor is not one this API returned") from exc
