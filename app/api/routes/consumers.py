"""Downstream consumers: webhooks notified when a partition of their dataset is ready."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import ADMIN, ReadKey, ServiceDep
from app.api.problems import PROBLEM_RESPONSES
from app.api.schemas import Consumer, ConsumerCreate, ConsumerCreated

router = APIRouter(prefix="/consumers", tags=["consumers"], responses=PROBLEM_RESPONSES)


@router.post("", status_code=201, response_model=ConsumerCreated, dependencies=[ADMIN])
async def create_consumer(body: ConsumerCreate, service: ServiceDep, response: Response) -> dict:
    """Register a webhook for a dataset (scope `admin`); the URL must not point inside the network."""
    consumer = await run_in_threadpool(service.add_consumer, body.model_dump())
    response.headers["Location"] = f"/consumers/{consumer['id']}"
    response.headers["Cache-Control"] = "no-store"  # it carries the secret
    return consumer


@router.get("", response_model=list[Consumer])
async def list_consumers(service: ServiceDep, caller: ReadKey, response: Response,
                         dataset: Annotated[str | None, Query(max_length=63)] = None,
                         ) -> list[dict]:
    """Registered consumers (secrets are never returned; URLs in full to `admin` keys only)."""
    full_urls = caller.allows("admin")
    if full_urls:
        response.headers["Cache-Control"] = "no-store"  # a URL may carry a token
    return await run_in_threadpool(service.consumers, dataset, full_urls=full_urls)


@router.delete("/{consumer_id}", status_code=204, dependencies=[ADMIN])
async def delete_consumer(consumer_id: str, service: ServiceDep) -> Response:
    """Unregister a consumer (scope `admin`)."""
    await run_in_threadpool(service.remove_consumer, consumer_id)
    return Response(status_code=204)
