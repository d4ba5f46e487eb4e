"""RFC 9457 problem+json for every error, never a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from app.errors import Problem

log = logging.getLogger("lakesaga.api")
MEDIA_TYPE = "application/problem+json"

_HEADERS = {
    401: {"WWW-Authenticate": "`Bearer`"},
    403: {"WWW-Authenticate": "`Bearer error=\"insufficient_scope\", scope=\"<needed>\"`"},
    429: {"Retry-After": "Seconds to wait before trying again"},
    503: {"Retry-After": "Seconds to wait before trying again"},
}

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text,
             "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}},
             **({"headers": {name: {"description": about, "schema": {"type": "string"}}
                             for name, about in _HEADERS[status].items()}}
                if status in _HEADERS else {})}
    for status, text in [
        (400, "Malformed request (e.g. an invalid `Idempotency-Key` or cursor)"),
        (401, "Missing, malformed, unknown or revoked API key"),
        (403, "The API key lacks the scope this operation needs"),
        (404, "Not found"),
        (409, "Conflict with the resource's state"),
        (413, "Request body larger than LAKESAGA_MAX_REQUEST_BYTES"),
        (422, "Invalid request body or source, or an `Idempotency-Key` reused with another body"),
        (429, "Rate limit, active-saga limit or long-poll limit reached"),
        (503, "The saga database is unavailable; retry later"),
    ]
}


def problem_response(request: Request, problem: Problem) -> JSONResponse:
    return JSONResponse(problem.body(request.url.path), status_code=problem.status,
                        media_type=MEDIA_TYPE, headers=problem.headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def _allowed_methods(request: Request) -> str:
    """Every method the path accepts: Starlette's 405 names only those of the first route it
    matched (``Allow: POST`` for ``/consumers``, which also has GET); RFC 9110 wants them all."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(request, Problem(422, "Invalid request", _validation_detail(exc)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return problem_response(request, Problem(exc.status_code, title, str(exc.detail),
                                                 headers=headers))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        response = problem_response(request, Problem(
            503, "Service unavailable", "the saga database is unavailable; retry later"))
        response.headers["Retry-After"] = "2"
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc_info=exc)
        return problem_response(request, Problem(
            500, "Internal error", "an unexpected error occurred; it has been logged"))
