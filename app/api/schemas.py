"""Request and response bodies of the HTTP API (they become openapi.yaml)."""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

Identifier = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")

_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _iso_date_text(value: Any) -> Any:
    """Only ``YYYY-MM-DD`` text names a date: pydantic alone reads ``0`` or ``"0"`` as a Unix
    timestamp (1970-01-01), which would ingest into a partition nobody asked for."""
    if isinstance(value, date) or (isinstance(value, str) and _ISO_DATE.fullmatch(value)):
        return value
    raise ValueError("must be a date written YYYY-MM-DD")


IsoDate = Annotated[date, BeforeValidator(_iso_date_text)]


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1024,
                      description="Glob relative to the configured source root, e.g. "
                                  "`clickstream/2026-01-06/*.ndjson`.")
    format: Literal["json", "csv", "parquet"] = Field(
        default="json", description="`json` is newline-delimited JSON.")


class SagaCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$", examples=["clickstream"])
    partition_date: IsoDate = Field(examples=["2026-01-06"])
    source: Source


class Compensation(BaseModel):
    status: str
    attempt: int
    started_at: str | None
    finished_at: str | None
    metrics: dict[str, Any]
    error: str | None


class Step(BaseModel):
    name: str
    status: str
    attempt: int
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    metrics: dict[str, Any]
    error: str | None
    compensation: Compensation | None


class Delivery(BaseModel):
    consumer: str
    consumer_id: str
    event: str
    idempotency_key: str
    status: Literal["pending", "delivered", "dead"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    delivered_at: str | None


class SagaSummary(BaseModel):
    id: str
    definition: str
    dataset: str
    partition_date: str
    status: Literal["pending", "running", "succeeded", "compensating", "compensated", "failed"]
    error: str | None
    attempts: int
    epoch: int
    cancel_requested: bool
    created_at: str
    updated_at: str
    finished_at: str | None


class Manifest(BaseModel):
    files: int
    total_bytes: int
    format: str


class Saga(SagaSummary):
    source: dict[str, Any] | None
    manifest: Manifest
    steps: list[Step]
    deliveries: list[Delivery]


class SagaPage(BaseModel):
    items: list[SagaSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end.")


class Event(BaseModel):
    seq: int
    kind: str
    step: str | None
    epoch: int
    payload: dict[str, Any]
    at: str | None


class EventPage(BaseModel):
    items: list[Event]


class Dataset(BaseModel):
    name: str
    description: str
    columns: list[dict[str, Any]]
    dedupe_key: list[str]
    rules: list[str]
    aggregations: list[str]
    tables: dict[str, str]


class LayerEntry(BaseModel):
    table_name: str
    saga_id: str
    rows: int
    snapshot_id: int
    lineage: dict[str, Any]
    registered_at: str


class Partition(BaseModel):
    dataset: str
    partition_date: str
    layers: dict[str, LayerEntry]


class ConsumerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    dataset: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    url: str = Field(min_length=8, max_length=2048, examples=["https://hooks.example.com/lake"])
    secret: str | None = Field(default=None, min_length=16, max_length=200,
                               pattern=r"^[\x21-\x7e]+$",
                               description="HMAC key for `webhook-signature`: a Standard "
                               "Webhooks secret (`whsec_` + base64 of at least 16 bytes), or any "
                               "other string, whose UTF-8 bytes are then the key; generated if "
                               "omitted.")


class Consumer(BaseModel):
    id: str
    name: str
    dataset: str
    url: str = Field(description="In full to `admin` keys; to others only its scheme, host and "
                                 "port (`https://hooks.example.com/…`): a path or query may "
                                 "carry a capability token.")
    created_at: str | None


class ConsumerCreated(Consumer):
    secret: str = Field(description="Shown once, in the Standard Webhooks form (`whsec_` + "
                        "base64 of the key): verify `webhook-signature` with it, e.g. "
                        "`standardwebhooks.Webhook(secret).verify(body, headers)`.")


class Health(BaseModel):
    status: str


class ReadinessCheck(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    status: str = Field(description="`ready`")
    checks: dict[str, ReadinessCheck] = Field(
        description="`database`, `executor` and `lake`, each with `ok` and a `detail`.")


class ProblemDetail(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
