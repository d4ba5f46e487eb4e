"""create_app(): routers, problem handlers, lifespan (service, optionally with workers)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, unquote_plus

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.api.deps import READ
from app.api.problems import MEDIA_TYPE, install_problem_handlers, problem_response
from app.api.routes import consumers, datasets, health, sagas
from app.api.schemas import ProblemDetail
from app.auth import list_keys
from app.errors import Problem
from app.saga.watch import waits_end_on_exit_signals
from app.service import Service
from app.settings import Settings, get_settings

log = logging.getLogger("lakesaga.api")


def _operation_id(route: APIRoute) -> str:
    return route.name


def create_app(settings: Settings | None = None, *, run_workers: bool = True,
               service: Service | None = None) -> FastAPI:
    """The API; with ``run_workers`` the executor and webhook dispatcher run in-process."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = service is None
        svc = service or Service(settings or get_settings())
        # Load and check the dataset specs before serving (a bad one stops the start): they
        # are cached once loaded, but the first requests would otherwise all parse them at once.
        svc.dataset_list()
        if owned and run_workers:
            svc.start_workers()
        app.state.service = svc
        if not list_keys(svc.db):
            log.warning("no API keys exist yet: every request but /healthz and /readyz will "
                        "get 401; create one with `lakesaga keys create NAME --scope write`")
        try:
            # The event loop thread runs the key lookup of every request and GET /sagas/{id}:
            # on PostgreSQL its reads share one pinned connection (no pool checkout per read;
            # the statements are synchronous, so requests never interleave on it).
            with waits_end_on_exit_signals(svc.watch), svc.db.pinned():
                yield
        finally:
            if owned:
                svc.close()

    app = FastAPI(
        title="lakesaga",
        version=__version__,
        summary="Crash-safe lakehouse ingestion: Bronze -> Silver -> Gold as durable sagas.",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        # Every route but health needs a key, the schema included; no browser UI is served.
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    install_problem_handlers(app)
    for module in (sagas, datasets, consumers, health):
        app.include_router(module.router)
    app.add_api_route("/openapi.json", lambda: app.openapi(), include_in_schema=False,
                      dependencies=[READ], name="openapi")
    _document_problems(app)
    max_bytes = (settings or (service.settings if service else get_settings())).max_request_bytes
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    app.add_middleware(NoNulInUrl)
    return app


API_DESCRIPTION = """Every operation except `/healthz` and `/readyz` needs an API key (`Authorization: Bearer
lsk_...`, created with `lakesaga keys create`). Scopes: `read` for GETs, `write` to submit
sagas and cancel or retry its own, `admin` to manage consumers, see their URLs in full and
cancel or retry any saga; `write` includes `read`, `admin` includes both. Errors are
`application/problem+json` (RFC 9457). Limits: request bodies over
`LAKESAGA_MAX_REQUEST_BYTES` are 413; each key has a request rate and a number of unfinished
sagas it may have, and failed authentications are limited per client and per key id (429 with
`Retry-After`). `POST /sagas` honours `Idempotency-Key`.
"""


class BodyLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413, whether or not they declare a
    Content-Length; the body is read (up to the limit) before the app sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send, self._too_large() if declared.isdigit()
                               else Problem(400, "Malformed request", "invalid Content-Length"))
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send, self._too_large())
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> Problem:
        return Problem(413, "Request too large",
                       f"request bodies are limited to {self.max_bytes} bytes")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, problem: Problem) -> None:
        from starlette.requests import Request

        response = problem_response(Request(scope), problem)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class NoNulInUrl:
    """Refuse, with 400, a request whose decoded path or query contains NUL (``%00``), before
    any route or database sees it: PostgreSQL text cannot hold it (the driver raised, a 500),
    while SQLite matched nothing (404); no identifier or parameter of this API contains it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or "\x00" in unquote_plus(
                scope.get("query_string", b"").decode("latin-1"))):
            problem = Problem(400, "Malformed request",
                              "the URL's path and query parameters may not contain NUL (%00)")
            response = JSONResponse(problem.body(quote(scope["path"])), status_code=400,
                                    media_type=MEDIA_TYPE)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


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
