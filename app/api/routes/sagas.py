"""Saga resources: submit, read, list, event log, cancel.

Routes are coroutines that hand the service call to the thread pool: one thread hop per
request (FastAPI runs a plain ``def`` route, and then the validation of its response, in two).
``GET /sagas/{id}``, the read clients poll, makes no hop at all: three indexed reads on a pooled
connection (no lock on SQLite) cost less than the hop (see ``app.api.deps``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import READ, IdempotencyKeyDep, ReadKey, ServiceDep, WriteKey
from app.api.problems import PROBLEM_RESPONSES
from app.api.schemas import EventPage, IsoDate, Saga, SagaCreate, SagaPage

router = APIRouter(prefix="/sagas", tags=["sagas"], responses=PROBLEM_RESPONSES)

SagaStatusFilter = Query(pattern="^(pending|running|succeeded|compensating|compensated|failed)$")


@router.post("", status_code=202, response_model=Saga, responses={202: {
    "description": "Accepted (or, with a known Idempotency-Key, the saga it created)",
    "headers": {
        "Location": {"description": "`/sagas/{id}`", "schema": {"type": "string"}},
        "Idempotent-Replayed": {"description": "`true` when an earlier request with this "
                                "Idempotency-Key created the saga", "schema": {"type": "string"}},
    }}})
async def create_saga(body: SagaCreate, service: ServiceDep, caller: WriteKey,
                      key: IdempotencyKeyDep, response: Response) -> dict:
    """Accept an ingestion: resolve and freeze the source files, then run it as a saga.

    Scope `write`. With an `Idempotency-Key`, retrying the request is safe (see the header).
    """
    saga, created = await run_in_threadpool(service.submit, body.model_dump(mode="json"), key,
                                            owner=caller.key_id)
    response.headers["Location"] = f"/sagas/{saga['id']}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return saga


@router.get("", response_model=SagaPage, dependencies=[READ])
async def list_sagas(
    service: ServiceDep,
    status: Annotated[str | None, SagaStatusFilter] = None,
    dataset: Annotated[str | None, Query(max_length=63)] = None,
    partition_date: IsoDate | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> dict:
    """List sagas, newest first, with cursor pagination."""
    return await run_in_threadpool(service.list_sagas, status=status, dataset=dataset,
                                   partition_date=partition_date, limit=limit, cursor=cursor)


@router.get("/{saga_id}", response_model=Saga)
async def get_saga(
    saga_id: str,
    service: ServiceDep,
    caller: ReadKey,
    wait: Annotated[float, Query(
        ge=0, le=60, description="Long polling: answer as soon as the saga changes (its "
        "status, a step, a delivery), or after this many seconds. A saga at rest (`succeeded`, "
        "`compensated`, `failed`) is answered at once. 0 (the default) answers at once. "
        "Waiting requests are limited per API key and per process (429 beyond).")] = 0,
) -> dict:
    """A saga with its steps, metrics, compensations and webhook deliveries.

    With `wait`, a client follows a saga without polling: repeat the request until the saga
    is at rest; each answer shows the saga as it changed.
    """
    if wait:
        return await service.saga_once_changed(saga_id, wait, caller.key_id)
    return service.saga(saga_id)


@router.get("/{saga_id}/events", response_model=EventPage, dependencies=[READ])
async def get_saga_events(
    saga_id: str,
    service: ServiceDep,
    # Event seqs are 32-bit integers; a larger ``after`` overflowed SQLite's driver (500).
    after: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> dict:
    """The saga's append-only event log (every status change, claim and checkpoint)."""
    return await run_in_threadpool(service.events, saga_id, after, limit)


@router.post("/{saga_id}/cancel", status_code=202, response_model=Saga)
async def cancel_saga(saga_id: str, service: ServiceDep, caller: WriteKey) -> dict:
    """Ask a pending or running saga to stop and compensate; 409 when it is past that.

    Scope `write`, and the key must be the one that submitted the saga, or an `admin` key (403
    otherwise). The `cancel_requested` event records the key id that asked (`by`).
    """
    return await run_in_threadpool(service.cancel, saga_id, caller)


@router.post("/{saga_id}/retry", status_code=202, response_model=Saga)
async def retry_saga(saga_id: str, service: ServiceDep, caller: WriteKey) -> dict:
    """Resume the compensation of a `failed` saga once its cause is fixed; 409 otherwise.

    Scope `write`, and the key must be the one that submitted the saga, or an `admin` key (403
    otherwise).
    """
    return await run_in_threadpool(service.retry, saga_id, caller)
