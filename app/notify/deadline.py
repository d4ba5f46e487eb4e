"""A wall-clock deadline for one webhook delivery attempt.

httpx's timeouts bound each connect, write and read, not their sum: a receiver that sends one
byte of its status line or headers per second never trips them and would hold the attempt (and,
before, the whole dispatcher) for as long as it likes. A :class:`Deadline` learns every socket
the attempt opens (through httpx's documented ``trace`` request extension, attached by
:func:`attach_deadline`, an httpx ``request`` event hook) and shuts them down when it expires;
the blocked read then fails and the attempt is recorded as failed (and retried later).

Once the response's headers are in, the attempt's outcome is known and the deadline lets go:
the body read after them is already capped in size and time by the dispatcher.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import httpx

_current = threading.local()


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        #: Why the attempt was cut short (None while it is not).
        self.reason: str | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._released = False
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _current.deadline = None
        self._timer.cancel()
        with self._lock:
            self._released = True
            self._sockets.clear()

    def expire(self, reason: str | None = None) -> None:
        """End the attempt now: shut down its sockets (a no-op once its headers are in)."""
        with self._lock:
            if self._released or self.reason is not None:
                return
            self.reason = reason or (f"no answer within the delivery deadline ({self.seconds:g} "
                                     "s, LAKESAGA_WEBHOOK_DEADLINE_S)")
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with self._lock:
                    self._sockets.append(sock)
                    expired = self.reason is not None and not self._released
                if expired:  # the deadline passed while connecting
                    _shut(sock)
        elif event == "http11.receive_response_headers.complete":
            with self._lock:
                self._released = True
                self._sockets.clear()


def attach_deadline(request: httpx.Request) -> None:
    """httpx ``request`` event hook: put the calling thread's attempt deadline on the request."""
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        request.extensions = {**request.extensions, "trace": deadline._trace}


def current_deadline_reason() -> str | None:
    """Why the calling thread's attempt was cut short, if it was."""
    deadline: Deadline | None = getattr(_current, "deadline", None)
    return deadline.reason if deadline is not None else None


def _shut(sock: socket.socket) -> None:
    # shutdown (not close) wakes a recv blocked in another thread; the owner still closes it.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
