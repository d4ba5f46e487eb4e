"""Dependencies of the routes, as Annotated aliases: the service, the caller's API key (with the
scope the route needs, its rate limit and the failed-authentication limits of the client
address and key id), and the Idempotency-Key header.

They are coroutines, run on the event loop. FastAPI would run a plain ``def`` dependency in the
thread pool, and a hop to a thread and back costs about 0.4 ms of CPU on two vCPUs (wake-ups,
GIL hand-offs): more than the key lookup itself, one primary-key read on a pooled connection
(0.04 ms on SQLite, where it takes no lock; 0.15 ms and one round trip on PostgreSQL), which
every request but health makes.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import Principal, authenticate, key_id_of
from app.errors import Problem
from app.service import Service

#: Documents the scheme in OpenAPI; errors are raised by ``require`` as problem+json.
bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="An API key from `lakesaga keys create`: "
                                "`Authorization: Bearer lsk_<id>_<secret>`.")


async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting callers whose key holds ``scope``, within their rate limit."""

    async def caller(request: Request, service: ServiceDep, credentials: Credentials) -> Principal:
        client = f"client:{request.client.host if request.client else ''}"
        principal = authenticate(service.db, credentials.credentials) if credentials else None
        if principal is None:
            if "authorization" in request.headers:
                _count_failure(service, client, credentials)
            raise Problem(401, "Unauthorized", "a valid API key is required: "
                          "Authorization: Bearer <key> (create one with `lakesaga keys create`)",
                          headers={"WWW-Authenticate": "Bearer"})
        if not principal.allows(scope):
            raise Problem(403, "Forbidden", f"this API key lacks the {scope!r} scope",
                          headers={"WWW-Authenticate":
                                   f'Bearer error="insufficient_scope", scope="{scope}"'})
        wait_s = service.rate_limiter.take(principal.key_id)
        if wait_s is not None:
            raise Problem(429, "Too many requests", "this API key is over its rate limit",
                          headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
        return principal

    caller.__name__ = f"require_{scope}"
    return caller


def _count_failure(service: Service, client: str,
                   credentials: HTTPAuthorizationCredentials | None) -> None:
    """Spend a failed authentication of the client address and of the key id the token names;
    over either limit the failure is a 429 instead of a 401.

    Only failures are refused: a valid key is accepted from a client, and for a key id, over
    its limit. Clients behind one NAT or untrusted proxy share an address, and key ids are
    public, so refusing the right secret because others sent wrong ones would let anyone lock
    a whole site, or a key, out. (Each refused failure still costs its key lookup.)
    """
    key_id = key_id_of(credentials.credentials) if credentials else None
    waits = [service.auth_failures.take(client)]
    if key_id is not None:
        waits.append(service.auth_failures.take(f"key:{key_id}"))
    _refuse_if_over(max((w for w in waits if w is not None), default=None))


def _refuse_if_over(wait_s: float | None) -> None:
    if wait_s is not None:
        raise Problem(429, "Too many failed authentications",
                      "too many requests with a wrong API key from this client or for this key "
                      "id; check the key (`lakesaga keys list`) and retry later",
                      headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


MAX_IDEMPOTENCY_KEY = 255


async def idempotency_key(
    key: Annotated[str | None, Header(
        alias="Idempotency-Key", json_schema_extra={"maxLength": MAX_IDEMPOTENCY_KEY},
        description="Makes the POST safe to retry: the same key with the same body returns the "
                    "saga the first request created (`Idempotent-Replayed: true`); the same key "
                    "with a different body is 422. Keys are scoped to the calling API key and "
                    "kept as long as the saga. 1 to 255 printable ASCII characters; any other "
                    "key is 400.")] = None,
) -> str | None:
    # Checked here rather than by FastAPI's max_length, so every invalid key is the same 400.
    if key is not None and (not key or not key.isprintable() or not key.isascii()
                            or len(key) > MAX_IDEMPOTENCY_KEY):
        raise Problem(400, "Invalid Idempotency-Key",
                      f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII "
                      "characters")
    return key


require_read, require_write, require_admin = (require(s) for s in ("read", "write", "admin"))
#: For ``dependencies=[...]`` of routes that only need the check.
READ, WRITE, ADMIN = (Depends(r) for r in (require_read, require_write, require_admin))
ReadKey = Annotated[Principal, Depends(require_read)]
WriteKey = Annotated[Principal, Depends(require_write)]
IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]
