"""Fixtures for API integration tests: the real app served by uvicorn on a loopback port, with
the executor and webhook dispatcher running in-process, driven over real HTTP with httpx.

``live`` is one server with the default test settings; ``live_factory(**overrides)`` starts more
(e.g. with ``faults=...``), and ``Live.stop()`` shuts one down early so that a second server can
take over the same database and lake. ``webhook_receiver`` is a tiny HTTP server that records
every POST it gets; ``trickling_receiver`` one that answers a byte per second.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from lakesaga_live import Live, Received, TricklingReceiver, WebhookReceiver, serve

import app.faults
from app.auth import create_key
from app.service import Service
from app.settings import Settings


@pytest.fixture
def live_factory(database_url: str, settings_factory: Callable[..., Settings],
                 ) -> Iterator[Callable[..., Live]]:
    """Start a live server on this test's database and lake with optional settings overrides."""
    started: list[Live] = []

    def start(**overrides: Any) -> Live:
        """Start a server whose Settings get ``overrides`` (e.g. ``faults="step=raise"``)."""
        settings = settings_factory(database_url, **overrides)
        service = Service(settings)
        try:
            service.start_workers()
            server, thread, port = serve(service)
        except BaseException:
            service.close()
            raise
        token, _ = create_key(service.db, "tests", ["admin"])
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                              headers={"Authorization": f"Bearer {token}"})
        live = Live(client=client, service=service, settings=settings, server=server,
                    thread=thread, token=token)
        started.append(live)
        return live

    try:
        yield start
    finally:
        for live in reversed(started):
            live.stop()
        app.faults.configure_faults("")


@pytest.fixture
def live(live_factory: Callable[..., Live]) -> Live:
    """A live server with the default test settings (no faults)."""
    return live_factory()


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A loopback HTTP server that answers 204 to every POST and records it."""
    receiver: WebhookReceiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            with receiver.lock:
                receiver.requests.append(Received(
                    path=self.path, headers={k.lower(): v for k, v in self.headers.items()},
                    body=body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = WebhookReceiver(url=f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def trickling_receiver() -> Iterator[TricklingReceiver]:
    """A loopback server that answers one byte per second (it never finishes its headers)."""
    receiver = TricklingReceiver(interval_s=1.0)
    try:
        yield receiver
    finally:
        receiver.close()
