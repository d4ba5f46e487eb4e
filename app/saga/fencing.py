"""Fencing of external writes: the executor installs the running step's ownership check here,
and resources (the lake) call :func:`check_owner` immediately before they commit.

A worker paused past its lease (a "zombie") that resumes inside a step thus finds, at its next
commit, that a newer epoch owns the saga, and rolls back instead of writing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[Callable[[], None] | None] = ContextVar("saga_owner_check", default=None)


@contextmanager
def owner_check(check: Callable[[], None]) -> Iterator[None]:
    token = _current.set(check)
    try:
        yield
    finally:
        _current.reset(token)


def check_owner() -> None:
    """Raise LostOwnership if the step running in this context no longer owns its saga."""
    check = _current.get()
    if check is not None:
        check()
