"""Webhook delivery by the outbox ``Dispatcher`` on SQLite and PostgreSQL, over real HTTP to
local receivers: Standard-Webhooks signatures a receiver can verify, no redirects, timeouts,
backoff with jitter and ``Retry-After`` (both forms), dead-lettering, the URL re-check at delivery
and DNS-rebinding protection (the checked address is the one connected to, also over TLS).

The rebinding tests replace ``socket.getaddrinfo`` with a scripted resolver. It also plays the
network: the "public" addresses it hands out are routed to local receivers, because a test cannot
listen on a public address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from lakesaga_live import Live, TricklingReceiver
from sqlalchemy import update

from app.db.base import Base
from app.db.models import ConsumerRow, OutboxRow, SagaRow
from app.db.rows import utcnow
from app.db.session import Database
from app.notify.urls import WebhookTarget
from app.notify.webhooks import MAX_RETRY_AFTER_S, Dispatcher, _retry_after_s, pinned_request

SECRET = "whsec-test-" + "k" * 24
PUBLIC_V4 = "93.184.215.14"
PUBLIC_V4_B = "93.184.215.15"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
HOOK_HOST = "hooks.example"


# -- a receiver as a consumer would write it ------------------------------------------------------


def verify_standard_webhook(secret: str, headers: dict[str, str], body: bytes,
                            tolerance_s: int = 300) -> bool:
    """What a consumer runs: recompute v1 over ``id.timestamp.body`` and compare in constant time
    with any of the space-separated signatures; refuse stale timestamps (replays)."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    expected = base64.b64encode(hmac.new(secret.encode(), f"{msg_id}.{timestamp}.".encode() + body,
                                         hashlib.sha256).digest())
    for signature in headers["webhook-signature"].split():
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return True
    return False


@dataclass
class Reply:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: Send this many bytes of body (in 64 KiB chunks), announcing 100 times more.
    body_bytes: int = 0


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A loopback HTTP(S) server that records every POST and answers with ``reply``."""

    def __init__(self, reply: Reply | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply or Reply()
        self.requests: list[Request] = []
        self.server_names: list[str | None] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.lock:
                    receiver.requests.append(Request(
                        self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                reply = receiver.reply
                time.sleep(reply.delay_s)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(reply.body_bytes * 100))
                    self.end_headers()
                    for _ in range(0, reply.body_bytes, 65536):
                        self.wfile.write(b"x" * 65536)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass  # the dispatcher stopped reading, as it should

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True,
                                       name=f"receiver-{self.port}")
        self.thread.start()

    def received(self) -> list[Request]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def saga_db(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    Base.metadata.create_all(db.engine)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(reply: Reply | None = None, tls: ssl.SSLContext | None = None) -> Receiver:
        started.append(Receiver(reply, tls))
        return started[-1]

    try:
        yield start
    finally:
        for receiver in started:
            receiver.close()


@pytest.fixture
def dispatchers(saga_db: Database) -> Iterator[Callable[..., Dispatcher]]:
    made: list[Dispatcher] = []

    def make(**overrides: Any) -> Dispatcher:
        options: dict[str, Any] = {"allow_hosts": ["127.0.0.1"], "timeout_s": 2.0,
                                   "max_attempts": 8}
        options.update(overrides)
        made.append(Dispatcher(saga_db, **options))
        return made[-1]

    try:
        yield make
    finally:
        for dispatcher in made:
            dispatcher.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate (and key) for HOOK_HOST only."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={HOOK_HOST}",
                    "-addext", f"subjectAltName=DNS:{HOOK_HOST}"],
                   check=True, capture_output=True)
    return cert, key


class ScriptedResolver:
    """``socket.getaddrinfo`` where HOOK_HOST's answers come from ``answers`` (the last one
    repeats) and the public addresses in ``routes`` lead to local ports; all else is real."""

    def __init__(self, answers: list[list[str]], routes: dict[str, int]) -> None:
        self.answers = answers
        self.routes = routes
        self.lookups: list[str] = []
        self.real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0,  # noqa: A002
                 proto: int = 0, flags: int = 0) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        self.lookups.append(name)
        if name == HOOK_HOST:
            answer = self.answers[min(len(self.lookups_of(HOOK_HOST)), len(self.answers)) - 1]
            return [_info(address, int(port)) for address in answer]
        if name in self.routes:
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                     ("127.0.0.1", self.routes[name]))]
        return self.real(host, port, family, type, proto, flags)

    def lookups_of(self, name: str) -> list[str]:
        return [n for n in self.lookups if n == name]


def _info(address: str, port: int) -> tuple[Any, ...]:
    if ipaddress.ip_address(address).version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))


# -- helpers --------------------------------------------------------------------------------------


def queue_delivery(db: Database, url: str, *, secret: str = SECRET) -> tuple[int, str]:
    """One succeeded saga, one consumer at ``url`` and its pending outbox row: (row id, key)."""
    now = utcnow()
    saga_id, consumer_id = str(uuid.uuid4()), str(uuid.uuid4())
    key = f"{saga_id}:{consumer_id}:partition.ready"
    with db.transaction() as s:
        s.add(SagaRow(id=saga_id, definition="ingestion", dataset="clickstream",
                      partition_date=date(2026, 1, 6), status="succeeded", request={},
                      manifest={}, request_fingerprint="0" * 64, created_at=now, updated_at=now))
        s.add(ConsumerRow(id=consumer_id, name=f"c-{consumer_id[:8]}", dataset="clickstream",
                          url=url, secret=secret, created_at=now))
        s.flush()
        row = OutboxRow(saga_id=saga_id, consumer_id=consumer_id, event_type="partition.ready",
                        idempotency_key=key, payload={"saga_id": saga_id, "rows": 3},
                        status="pending", attempts=0, next_attempt_at=now, created_at=now)
        s.add(row)
        s.flush()
        row_id = row.id
    return row_id, key


def outbox_row(db: Database, row_id: int) -> OutboxRow:
    with db.sessions() as s:
        row = s.get(OutboxRow, row_id)
        assert row is not None
        return row


def make_due(db: Database, row_id: int) -> None:
    """Age the row's retry time instead of sleeping through the backoff."""
    with db.transaction() as s:
        s.execute(update(OutboxRow).where(OutboxRow.id == row_id)
                  .values(next_attempt_at=utcnow() - timedelta(seconds=1)))


def delay_s(db: Database, row_id: int, since: datetime) -> float:
    return (outbox_row(db, row_id).next_attempt_at - since).total_seconds()


# -- signatures and headers -----------------------------------------------------------------------


def test_deliver__receiver_verifies_the_signature_with_the_consumer_secret(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher]) -> None:
    receiver = receivers()
    row_id, key = queue_delivery(saga_db, f"{receiver.url}/hook")

    assert dispatchers().deliver_due() == 1

    (request,) = receiver.received()
    assert request.path == "/hook"
    assert request.headers["webhook-id"] == key
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body)["rows"] == 3
    assert verify_standard_webhook(SECRET, request.headers, request.body)
    assert not verify_standard_webhook("another-secret-0123456789", request.headers, request.body)
    assert not verify_standard_webhook(SECRET, request.headers, request.body.replace(b"3", b"4"))
    assert not verify_standard_webhook(SECRET, {**request.headers, "webhook-id": key + "x"},
                                       request.body)
    row = outbox_row(saga_db, row_id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
        "delivered", 1, 204, None)


def test_deliver__ignores_proxy_environment_variables(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy would resolve the host again, behind the address check: deliveries go direct."""
    receiver, proxy = receivers(), receivers()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    row_id, _ = queue_delivery(saga_db, f"{receiver.url}/hook")

    assert dispatchers().deliver_due() == 1

    assert proxy.received() == []
    assert [r.path for r in receiver.received()] == ["/hook"]
    assert outbox_row(saga_db, row_id).status == "delivered"


# -- failures, backoff, Retry-After, dead letters -------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_deliver__redirect_is_a_failed_attempt_and_is_not_followed(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher], status: int) -> None:
    elsewhere = receivers()
    redirector = receivers(Reply(status=status, headers={"location": f"{elsewhere.url}/stolen"}))
    row_id, _ = queue_delivery(saga_db, f"{redirector.url}/hook")

    dispatchers().deliver_due()

    assert len(redirector.received()) == 1
    assert elsewhere.received() == []
    row = outbox_row(saga_db, row_id)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, status)
    assert row.last_error == f"HTTP {status} (redirects are not followed)"


def test_deliver__failures_back_off_exponentially_with_jitter(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher]) -> None:
    receiver = receivers(Reply(status=500))
    row_id, _ = queue_delivery(saga_db, receiver.url)
    dispatcher = dispatchers()

    delays = []
    for _ in range(4):
        make_due(saga_db, row_id)
        before = utcnow()
        dispatcher.deliver_due()
        delays.append(delay_s(saga_db, row_id, before))

    # attempt n waits 0.5 s * 2**(n-1) scaled by a random factor in [0.5, 1]
    for n, delay in enumerate(delays, start=1):
        base = 0.5 * 2 ** (n - 1)
        assert base * 0.5 - 0.05 <= delay <= base + 0.5, (n, delays)
    row = outbox_row(saga_db, row_id)
    assert (row.status, row.attempts, row.last_error) == ("pending", 4, "HTTP 500")


def _http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


@pytest.mark.parametrize(("retry_after", "low", "high"), [
    ("120", 119.0, 121.0),
    ("0", 0.2, 0.6),                       # too small: the backoff wins
    ("99999999", MAX_RETRY_AFTER_S - 1, MAX_RETRY_AFTER_S + 1),
    ("soon", 0.2, 0.6),                    # unparseable: ignored
    ("-5", 0.2, 0.6),
    pytest.param("date+600", 597.0, 601.0, id="http-date"),
    pytest.param("date-600", 0.2, 0.6, id="http-date-in-the-past"),
    pytest.param("date+86400", MAX_RETRY_AFTER_S - 1, MAX_RETRY_AFTER_S + 1, id="http-date-far"),
])
def test_deliver__retry_after_is_honoured_in_both_forms(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher], retry_after: str, low: float, high: float) -> None:
    if retry_after.startswith("date"):
        retry_after = _http_date(float(retry_after[4:]))
    receiver = receivers(Reply(status=503, headers={"retry-after": retry_after}))
    row_id, _ = queue_delivery(saga_db, receiver.url)

    before = utcnow()
    dispatchers().deliver_due()

    assert low <= delay_s(saga_db, row_id, before) <= high
    row = outbox_row(saga_db, row_id)
    assert (row.status, row.last_status_code) == ("pending", 503)


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("30", 30.0), (" 30 ", 30.0), ("1.5", None), ("1e3", None), ("nan", None),
    ("", None), ("\u0664\u0662", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ("Wed, 21 Oct 2015 07:29:00 GMT", 60.0), ("Wednesday, 21-Oct-15 07:29:00 GMT", 60.0),
    ("Wed Oct 21 07:29:00 2015", 60.0), ("Wed, 21 Oct 2015 08:28:00 GMT", 3600.0),
    ("Wed, 21 Oct 2015 09:28:00 GMT", MAX_RETRY_AFTER_S), ("Wed, 99 Oct 2015 07:28:00 GMT", None),
])
def test_retry_after_s__parses_delta_seconds_and_http_dates(value: str | None,
                                                             expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, tzinfo=UTC)
    assert _retry_after_s(value, now=now) == expected


def test_deliver__dead_letter_after_max_attempts(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher]) -> None:
    receiver = receivers(Reply(status=500))
    row_id, key = queue_delivery(saga_db, receiver.url)
    dispatcher = dispatchers(max_attempts=3)

    for attempt in range(1, 4):
        make_due(saga_db, row_id)
        assert dispatcher.deliver_due() == 1
        assert outbox_row(saga_db, row_id).attempts == attempt
    make_due(saga_db, row_id)
    assert dispatcher.deliver_due() == 0

    row = outbox_row(saga_db, row_id)
    assert (row.status, row.attempts, row.last_status_code, row.delivered_at) == (
        "dead", 3, 500, None)
    received = receiver.received()
    assert len(received) == 3
    assert {r.headers["webhook-id"] for r in received} == {key}  # one key across retries
    assert all(verify_standard_webhook(SECRET, r.headers, r.body) for r in received)


def test_deliver__slow_receiver_times_out(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher]) -> None:
    receiver = receivers(Reply(delay_s=3.0))
    row_id, _ = queue_delivery(saga_db, receiver.url)

    started = time.monotonic()
    dispatchers(timeout_s=0.3).deliver_due()

    assert time.monotonic() - started < 2.0
    row = outbox_row(saga_db, row_id)
    assert (row.status, row.last_status_code, row.last_error) == ("pending", None, "ReadTimeout")


def test_deliver__trickling_consumer_does_not_stall_the_others(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher], trickling_receiver: TricklingReceiver) -> None:
    # The slow consumer's row is the older one: a single dispatcher took it first and held it
    # for as long as the server trickled (each byte within the 2 s read timeout).
    slow_id, _ = queue_delivery(saga_db, trickling_receiver.url)
    fast = receivers()
    fast_id, _ = queue_delivery(saga_db, fast.url)
    dispatcher = dispatchers(timeout_s=2.0, deadline_s=1.5, concurrency=2, poll_interval_s=0.05)
    started = time.monotonic()
    dispatcher.start()

    wait_until(lambda: outbox_row(saga_db, fast_id).status == "delivered", timeout_s=1.0)
    assert outbox_row(saga_db, slow_id).attempts == 0  # still trickling
    wait_until(lambda: outbox_row(saga_db, slow_id).attempts == 1, timeout_s=3.0)
    assert 1.5 <= time.monotonic() - started < 3.0  # ended by the deadline, not by the server
    slow = outbox_row(saga_db, slow_id)
    assert (slow.status, slow.last_status_code) == ("pending", None)
    assert "LAKESAGA_WEBHOOK_DEADLINE_S" in (slow.last_error or ""), slow.last_error
    assert slow.next_attempt_at > utcnow()  # backoff: retried later

    make_due(saga_db, slow_id)
    wait_until(lambda: trickling_receiver.connections == 2, timeout_s=2.0)
    assert len(fast.received()) == 1


def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_deliver__endless_response_body_is_not_read(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher]) -> None:
    receiver = receivers(Reply(status=200, body_bytes=50 * 1024 * 1024))
    row_id, _ = queue_delivery(saga_db, receiver.url)

    started = time.monotonic()
    dispatchers().deliver_due()

    assert time.monotonic() - started < 2.0
    assert outbox_row(saga_db, row_id).status == "delivered"


# -- the URL is checked again at delivery ---------------------------------------------------------


@pytest.mark.parametrize(("url_of", "allow_hosts", "message"), [
    (lambda r: r.url, [], "non-public address"),
    (lambda r: f"http://2130706433:{r.port}/", ["127.0.0.1"], "canonical IP address"),
    (lambda r: f"http://127.1:{r.port}/", ["127.0.0.1"], "canonical IP address"),
    (lambda r: f"http://[::ffff:127.0.0.1]:{r.port}/", ["127.0.0.1"], "non-public address"),
    (lambda r: f"http://localhost:{r.port}/", ["127.0.0.1"], "non-public address"),
    (lambda r: f"http://user:pw@127.0.0.1:{r.port}/", ["127.0.0.1"], "credentials"),
], ids=["allow-list-emptied", "decimal", "short", "mapped", "localhost", "credentials"])
def test_deliver__unsafe_url_is_refused_at_delivery(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher], url_of: Callable[[Receiver], str],
        allow_hosts: list[str], message: str) -> None:
    receiver = receivers()
    row_id, _ = queue_delivery(saga_db, url_of(receiver))  # e.g. registered before an upgrade

    dispatchers(allow_hosts=allow_hosts).deliver_due()

    assert receiver.received() == []
    row = outbox_row(saga_db, row_id)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, None)
    assert row.last_error is not None and message in row.last_error


# -- DNS rebinding: resolve once, connect to what was checked -------------------------------------


def test_deliver__answer_with_any_internal_address_is_refused(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch) -> None:
    internal, public = receivers(), receivers()
    resolver = ScriptedResolver([[PUBLIC_V4, "127.0.0.1"]], routes={PUBLIC_V4: public.port})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    row_id, _ = queue_delivery(saga_db, f"http://{HOOK_HOST}:{internal.port}/hook")

    dispatchers(allow_hosts=[]).deliver_due()

    assert internal.received() == [] and public.received() == []
    row = outbox_row(saga_db, row_id)
    assert row.status == "pending" and row.last_error is not None
    assert "non-public address" in row.last_error and "127.0.0.1" not in row.last_error


@pytest.mark.parametrize("public_address", [PUBLIC_V4, PUBLIC_V6])
def test_deliver__rebinding_after_the_check_does_not_reach_the_internal_address(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch,
        public_address: str) -> None:
    internal, public = receivers(), receivers()
    # the first answer passes the check; every later one points inside
    resolver = ScriptedResolver([[public_address], ["127.0.0.1"]],
                                routes={public_address: public.port})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    url = f"http://{HOOK_HOST}:{internal.port}/hook"
    row_id, key = queue_delivery(saga_db, url)

    dispatchers(allow_hosts=[]).deliver_due()

    assert internal.received() == []
    (request,) = public.received()
    assert request.headers["host"] == f"{HOOK_HOST}:{internal.port}"
    assert request.headers["webhook-id"] == key
    assert verify_standard_webhook(SECRET, request.headers, request.body)
    assert resolver.lookups_of(HOOK_HOST) == [HOOK_HOST]  # resolved once
    assert public_address in resolver.lookups  # the socket went to the checked address
    assert outbox_row(saga_db, row_id).status == "delivered"


def test_deliver__next_checked_address_is_tried_when_one_refuses(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch) -> None:
    public = receivers()
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    resolver = ScriptedResolver([[PUBLIC_V4, PUBLIC_V4_B], ["127.0.0.1"]],
                                routes={PUBLIC_V4: closed_port, PUBLIC_V4_B: public.port})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    row_id, _ = queue_delivery(saga_db, f"http://{HOOK_HOST}/hook")

    dispatchers(allow_hosts=[]).deliver_due()

    assert len(public.received()) == 1
    assert resolver.lookups_of(HOOK_HOST) == [HOOK_HOST]
    assert outbox_row(saga_db, row_id).status == "delivered"


def test_deliver__pinned_https_verifies_the_certificate_of_the_real_host(
        saga_db: Database, receivers: Callable[..., Receiver],
        dispatchers: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch,
        tls_files: tuple[Path, Path]) -> None:
    cert, key_file = tls_files
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key_file)
    internal, public = receivers(), receivers(tls=server_tls)
    resolver = ScriptedResolver([[PUBLIC_V4], ["127.0.0.1"]], routes={PUBLIC_V4: public.port})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    url = f"https://{HOOK_HOST}:{internal.port}/hook"
    row_id, _ = queue_delivery(saga_db, url)
    trust = ssl.create_default_context(cafile=str(cert))

    dispatcher = dispatchers(allow_hosts=[], verify=trust)
    dispatcher.deliver_due()

    assert internal.received() == []
    (request,) = public.received()
    assert public.server_names == [HOOK_HOST]  # SNI named the real host, not the address
    assert request.headers["host"] == f"{HOOK_HOST}:{internal.port}"
    assert outbox_row(saga_db, row_id).status == "delivered"

    # without the sni_hostname extension httpcore would verify the certificate against the IP
    target = WebhookTarget(url=url, host=HOOK_HOST, addresses=(PUBLIC_V4,))
    request_without_sni = pinned_request(dispatcher.client, target, PUBLIC_V4, b"{}", {})
    del request_without_sni.extensions["sni_hostname"]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        dispatcher.client.send(request_without_sni)
    assert len(public.received()) == 1


# -- logs -----------------------------------------------------------------------------------------


def test_deliver__logs_never_carry_the_url_path_or_query(
        live_factory: Callable[..., Live], receivers: Callable[..., Receiver],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included, unless quieted
    live = live_factory(webhook_max_attempts=1)
    live.generate(records=50, files=1)
    token = "capability-" + os.urandom(8).hex()
    receiver = receivers(Reply(status=500))
    for name, url in (("refused", f"{receiver.url}/hooks/{token}?token={token}"),
                      ("closed", f"http://127.0.0.1:9/hooks/{token}?token={token}")):
        created = live.client.post("/consumers", json={"name": name, "dataset": "clickstream",
                                                       "url": url})
        assert created.status_code == 201, created.text
    saga = live.wait(live.submit().json()["id"])
    deadline = time.monotonic() + 15
    while sum(d["status"] == "dead" for d in saga["deliveries"]) < 2:
        assert time.monotonic() < deadline, saga["deliveries"]
        time.sleep(0.05)
        saga = live.client.get(f"/sagas/{saga['id']}").json()

    assert receiver.received()[0].path == f"/hooks/{token}?token={token}"
    dead = [r.getMessage() for r in caplog.records if r.name == "lakesaga.webhooks"]
    assert len(dead) == 2 and all("dead after 1 attempts" in m for m in dead), dead
    assert not [r.name for r in caplog.records if r.name.startswith(("httpx", "httpcore"))
                and r.levelno < logging.WARNING]
    assert token not in caplog.text
