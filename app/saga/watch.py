"""Wakes requests waiting for a saga to change (``GET /sagas/{id}?wait=``) the moment this
process's executor records a change to it.

The executor calls :meth:`SagaWatch.changed` from its own threads after each transition
commits; each waiting coroutine gets its ``asyncio.Event`` set on its own event loop. A saga run
by another process gives no signal here: waiters also read it again every
``app.service.WAIT_RECHECK_S``.

uvicorn lets open requests finish before it shuts down, so a server told to stop ends every
wait at once (:func:`waits_end_on_exit_signals`) instead of after up to a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any


class SagaWatch:
    def __init__(self) -> None:
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()
        #: Set once the server is stopping: waits end at once, new ones do not start.
        self.closed = False

    def changed(self, saga_id: str) -> None:
        """A change to the saga was committed (called from any thread; cheap with no waiter)."""
        with self._lock:
            waiters = list(self._waiters.get(saga_id, ()))
        _wake(waiters)

    @contextlib.contextmanager
    def watching(self, saga_id: str) -> Iterator[asyncio.Event]:
        """An event set (on the calling coroutine's loop) each time the saga changes while the
        block runs, and when the watch closes. Enter it before reading the saga, so that no
        change between the read and the wait goes unnoticed; clear it before each read."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(saga_id, set()).add(waiter)
            if self.closed:
                waiter[1].set()
        try:
            yield waiter[1]
        finally:
            with self._lock:
                waiters = self._waiters.get(saga_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[saga_id]

    def close(self) -> None:
        """End every wait now and any later one at once (the server is stopping)."""
        with self._lock:
            self.closed = True
            waiters = [w for ws in self._waiters.values() for w in ws]
        _wake(waiters)


def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    """Set each waiter's event on its loop. Never raises: the caller's change is committed, and
    a loop closed under a waiter (a server stopped mid-wait) has nobody left to wake."""
    for loop, event in waiters:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(event.set)


@contextlib.contextmanager
def waits_end_on_exit_signals(watch: SagaWatch) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM also end every wait: a handler chained to the
    ones installed now (uvicorn's, while it serves). Only in the main thread, where signal
    handlers live; the previous handlers are back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    installed: dict[signal.Signals, tuple[Any, Any]] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue

        def handler(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
            # A signal handler may interrupt the loop thread inside SagaWatch's lock: only
            # schedule the close, on the loop (gone if the server has already stopped).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(watch.close)
            previous(sig, frame)

        signal.signal(signum, handler)
        installed[signum] = (handler, previous)
    try:
        yield
    finally:
        for signum, (handler, previous) in installed.items():
            if signal.getsignal(signum) is handler:  # nobody chained after us
                signal.signal(signum, previous)
