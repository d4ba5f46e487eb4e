"""create_app(): routers, problem handlers, lifespan (service, optionally with workers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app import __version__
from app.api.problems import install_problem_handlers
from app.api.routes import consumers, datasets, health, sagas
from app.service import Service
from app.settings import Settings, get_settings


def _operation_id(route: APIRoute) -> str:
    return route.name


def create_app(settings: Settings | None = None, *, run_workers: bool = True,
               service: Service | None = None) -> FastAPI:
    """The API; with ``run_workers`` the executor and webhook dispatcher run in-process."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = service is None
        svc = service or Service(settings or get_settings())
        if owned and run_workers:
            svc.start_workers()
        app.state.service = svc
        try:
            yield
        finally:
            if owned:
                svc.close()

    app = FastAPI(
        title="lakesaga",
        version=__version__,
        summary="Crash-safe lakehouse ingestion: Bronze -> Silver -> Gold as durable sagas.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    install_problem_handlers(app)
    for module in (sagas, datasets, consumers, health):
        app.include_router(module.router)
    return app
