"""Errors the API turns into RFC 9457 problem+json responses."""

from __future__ import annotations

from typing import Any


class Problem(Exception):
    """A client-facing error: status, a short title and a detail that is safe to show."""

    def __init__(self, status: int, title: str, detail: str, *,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra
        self.headers = headers or {}

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://lakesaga.dev/problems/{self.title.lower().replace(' ', '-')}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        return {**body, **self.extra}
