"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import ServiceDep
from app.api.problems import PROBLEM_RESPONSES
from app.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Health, responses={503: PROBLEM_RESPONSES[503]})
async def readyz(service: ServiceDep) -> dict:
    """The saga database answers."""
    await run_in_threadpool(service.ready)
    return {"status": "ready"}
