"""Dependencies of the routes, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import Problem
from app.service import Service


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def idempotency_key(
    key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                      description="Same key + same body returns the same saga; "
                                                  "same key + different body is 422.")] = None,
) -> str | None:
    if key is not None and (not key or not key.isprintable() or not key.isascii()):
        raise Problem(400, "Invalid Idempotency-Key", "Idempotency-Key must be printable ASCII")
    return key


ServiceDep = Annotated[Service, Depends(get_service)]
IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]
