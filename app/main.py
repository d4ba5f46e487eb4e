"""create_app(): routers, problem handlers, lifespan (service, optionally with workers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app import __version__
from app.api.problems import install_problem_handlers
from app.api.routes import consumers, datasets, health, sagas
from app.api.schemas import ProblemDetail
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
    _document_problems(app)
    return app


def _document_problems(app: FastAPI) -> None:
    """Errors are only ever problem+json: publish that schema instead of FastAPI's default."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["ProblemDetail"] = ProblemDetail.model_json_schema()
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for path in schema["paths"].values():
                for operation in path.values():
                    response = operation.get("responses", {}).get("422")
                    if response and "application/json" in response.get("content", {}):
                        response["content"] = {"application/problem+json": {
                            "schema": {"$ref": "#/components/schemas/ProblemDetail"}}}
                        response["description"] = "Invalid request (problem+json)"
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
