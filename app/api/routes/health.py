"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import ServiceDep
from app.api.problems import PROBLEM_RESPONSES
from app.api.schemas import Health, Readiness
from app.errors import Problem
from app.readiness import readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {
    **PROBLEM_RESPONSES[503],
    "description": "A check failed; the problem's extension member `checks` is the same "
                   "object as in the 200 answer"}})
async def readyz(service: ServiceDep) -> dict:
    """The saga database answers, the executor's workers are alive and the lake is attached
    read-write (the last two when this process runs them); 503 naming the failing checks."""
    checks = await run_in_threadpool(readiness, service)
    failing = [name for name, check in checks.items() if not check["ok"]]
    if failing:
        raise Problem(503, "Not ready", f"failing checks: {', '.join(failing)}",
                      headers={"Retry-After": "2"}, checks=checks)
    return {"status": "ready", "checks": checks}
