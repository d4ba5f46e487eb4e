"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.api.problems import PROBLEM_RESPONSES
from app.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Health, responses={503: PROBLEM_RESPONSES[503]})
def readyz(service: ServiceDep) -> dict:
    """The saga database answers."""
    service.ready()
    return {"status": "ready"}
