"""Wakes requests waiting for a saga to change (``GET /sagas/{id}?wait=``).

This process's executor calls :meth:`SagaWatch.changed` from its own threads after each
transition commits: the waiters of that saga wake at once. Changes made elsewhere (another
process's executor, a webhook delivery) are found by ONE poller thread per process, which reads
the version of every watched saga (``versions``: one query for all of them) each
``poll_interval_s`` and wakes the waiters whose saga's version differs from the one they started
from. A wait costs nothing on the event loop while its saga does not change, however many there
are; their number is bounded per API key and per process (:class:`WaitLimitReached`).

uvicorn lets open requests finish before it shuts down, so a server told to stop ends every
wait at once (:func:`waits_end_on_exit_signals`) instead of after up to a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

log = logging.getLogger("lakesaga.watch")
#: Reads the current version of each of the given sagas (absent: the saga is gone).
Versions = Callable[[list[str]], dict[str, Hashable]]
#: A waiter's version before it has read one: the poller wakes it on its first look.
UNREAD: Hashable = object()


class WaitLimitReached(Exception):
    """As many requests as allowed already wait (for this API key, or in this process)."""


@dataclass(eq=False)
class Waiter:
    """One waiting request: its loop, the event set when its saga may have changed, and the
    saga's version it last read (set it before reading the saga)."""

    loop: asyncio.AbstractEventLoop
    key: str
    event: asyncio.Event = field(default_factory=asyncio.Event)
    version: Hashable = UNREAD


class SagaWatch:
    def __init__(self, versions: Versions | None = None, *, poll_interval_s: float = 0.2,
                 max_waits: int = 0, max_waits_per_key: int = 0) -> None:
        self._versions = versions
        self.poll_interval_s = poll_interval_s
        #: Waits allowed at once in this process and per API key (0: no limit).
        self.max_waits, self.max_waits_per_key = max_waits, max_waits_per_key
        self._waiters: dict[str, set[Waiter]] = {}
        self._per_key: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._poke = threading.Event()
        self._closing = threading.Event()
        self._poller: threading.Thread | None = None
        #: Set once the server is stopping: waits end at once, new ones do not start.
        self.closed = False

    @property
    def waiting(self) -> int:
        """Requests waiting now."""
        with self._lock:
            return sum(self._per_key.values())

    def changed(self, saga_id: str) -> None:
        """A change to the saga was committed (called from any thread; cheap with no waiter)."""
        with self._lock:
            waiters = list(self._waiters.get(saga_id, ()))
        _wake(waiters)

    @contextlib.contextmanager
    def watching(self, saga_id: str, key: str = "") -> Iterator[Waiter]:
        """A waiter whose event is set (on the calling coroutine's loop) each time the saga may
        have changed while the block runs, and when the watch closes. Enter it before reading
        the saga's version and then the saga, so that no change in between goes unnoticed;
        clear the event before each read. Raises WaitLimitReached over the limits."""
        waiter = Waiter(asyncio.get_running_loop(), key)
        with self._lock:
            if self.max_waits and sum(self._per_key.values()) >= self.max_waits:
                raise WaitLimitReached(f"{self.max_waits} requests already wait in this process "
                                       "(LAKESAGA_MAX_WAITS)")
            if self.max_waits_per_key and self._per_key[key] >= self.max_waits_per_key:
                raise WaitLimitReached(f"this API key already has {self.max_waits_per_key} "
                                       "waiting requests (LAKESAGA_MAX_WAITS_PER_KEY)")
            self._waiters.setdefault(saga_id, set()).add(waiter)
            self._per_key[key] += 1
            if self.closed:
                waiter.event.set()
            elif self._versions is not None and self._poller is None:
                self._poller = threading.Thread(target=self._poll, name="saga-watch",
                                                daemon=True)
                self._poller.start()
        self._poke.set()
        try:
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiters.get(saga_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[saga_id]
                self._per_key[key] -= 1
                if not self._per_key[key]:
                    del self._per_key[key]

    def close(self) -> None:
        """End every wait now and any later one at once (the server is stopping)."""
        with self._lock:
            self.closed = True
            waiters = [w for ws in self._waiters.values() for w in ws]
        self._closing.set()
        self._poke.set()
        _wake(waiters)

    def _poll(self) -> None:
        """The poller thread: while anyone waits, read all watched sagas' versions in one call
        per interval and wake the waiters whose saga moved on; with no waiter, sleep."""
        assert self._versions is not None
        while not self.closed:
            with self._lock:
                watched = {saga_id: list(ws) for saga_id, ws in self._waiters.items()}
                if not watched:
                    self._poke.clear()
            if not watched:
                self._poke.wait()
                continue
            try:
                versions = self._versions(list(watched))
            except Exception as exc:  # database outage: the waits end at their timeout
                log.warning("reading watched sagas failed: %s", type(exc).__name__)
                versions = None
            if versions is not None:
                moved = []
                for saga_id, waiters in watched.items():
                    version = versions.get(saga_id)
                    for waiter in waiters:
                        if waiter.version != version:
                            waiter.version = version
                            moved.append(waiter)
                _wake(moved)
            self._closing.wait(self.poll_interval_s)


def _wake(waiters: list[Waiter]) -> None:
    """Set each waiter's event on its loop. Never raises: the caller's change is committed, and
    a loop closed under a waiter (a server stopped mid-wait) has nobody left to wake."""
    for waiter in waiters:
        with contextlib.suppress(RuntimeError):
            waiter.loop.call_soon_threadsafe(waiter.event.set)


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
