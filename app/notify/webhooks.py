"""Outbox delivery: signed webhook POSTs (Standard Webhooks headers), at least once, with
exponential backoff and jitter, honouring ``Retry-After``, dead-lettered after a limit.

Every attempt re-checks the URL and connects to an address that check resolved (pinned, with the
original ``Host`` header and TLS server name), never to a second DNS answer. Redirects are not
followed: a 3xx is a failed attempt.

A row is leased by pushing its ``next_attempt_at`` forward before the call, so several
dispatchers (threads or processes) never deliver the same row at the same time.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx
from sqlalchemy import select, update

from app.db.models import ConsumerRow, OutboxRow
from app.db.rows import utcnow
from app.db.session import Database
from app.faults import fault_point
from app.notify.deadline import Deadline, attach_deadline, current_deadline_reason
from app.notify.signing import sign
from app.notify.urls import UnsafeUrl, WebhookTarget, resolve_webhook_target

log = logging.getLogger("lakesaga.webhooks")
MAX_RESPONSE_BYTES = 64 * 1024
MAX_RETRY_AFTER_S = 3600.0


def pinned_request(client: httpx.Client, target: WebhookTarget, address: str | None,
                   body: bytes, headers: dict[str, str]) -> httpx.Request:
    """A POST to ``address`` (one of the target's checked addresses) that the server and TLS
    still see as addressed to the URL's host; ``address=None`` lets httpx resolve the host."""
    url = httpx.URL(target.url)
    extensions: dict[str, str] = {}
    if address is not None and address != target.host:
        headers = {**headers, "host": url.netloc.decode("ascii")}
        if url.scheme == "https":
            # httpcore's connection reads this extension as the TLS server_hostname, so SNI and
            # certificate verification use the real host while the socket goes to ``address``.
            extensions["sni_hostname"] = target.host
        url = url.copy_with(host=address)
    return client.build_request("POST", url, content=body, headers=headers, extensions=extensions)


class Dispatcher:
    """Delivers due outbox rows from a pool of ``concurrency`` threads, with at most one
    delivery in flight per consumer in this process (a consumer gets one request at a time;
    its rows are not ordered: a failed one waits for its backoff while later ones go) and each
    attempt bounded by ``deadline_s`` of wall-clock time: a slow consumer costs one thread for
    at most that long and never delays the others."""

    def __init__(self, db: Database, *, allow_hosts: list[str], timeout_s: float,
                 max_attempts: int, poll_interval_s: float = 0.5,
                 verify: ssl.SSLContext | bool = True, deadline_s: float = 15.0,
                 concurrency: int = 4) -> None:
        self.db = db
        self.allow_hosts = allow_hosts
        self.max_attempts = max_attempts
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.concurrency = concurrency
        # the attempt (deadline), then the body read after it (timeout_s) and the record
        self.lease_s = deadline_s + timeout_s * 2
        # No proxies from the environment (a proxy would resolve the name itself and drop the TLS
        # server name) and no kept-alive connections (a pooled connection is keyed by address,
        # so it could carry another host's request over a TLS session verified for the first).
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False,
                                   trust_env=False, verify=verify,
                                   limits=httpx.Limits(max_keepalive_connections=0),
                                   event_hooks={"request": [attach_deadline]})
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        #: Consumers with a delivery in flight, and the deadlines of those attempts.
        self._busy: set[str] = set()
        self._deadlines: set[Deadline] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            deadlines = list(self._deadlines)
        for deadline in deadlines:  # cut attempts in flight short: their rows are retried
            deadline.expire("the dispatcher stopped during the delivery")
        self._pool.shutdown(wait=True)
        self.client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                started = self._start_due()
            except Exception as exc:  # database outage: keep polling
                log.warning("outbox poll failed: %s", type(exc).__name__)
                started = 0
            if not started:  # nothing due, or every thread busy: until one is done
                self._wake.wait(self.poll_interval_s)

    def _start_due(self) -> int:
        """Lease due rows for the free threads (one per idle consumer) and start them."""
        with self._lock:
            free, busy = self.concurrency - len(self._busy), set(self._busy)
        if free <= 0:
            return 0
        leased = self._lease_due(free, busy)
        for row_id, consumer_id in leased:
            self._submit(row_id, consumer_id)
        return len(leased)

    def deliver_due(self, limit: int = 20) -> int:
        """Lease due rows (the oldest of each consumer without a delivery in flight) and deliver
        them, different consumers at once; returns how many were attempted, once all are done."""
        with self._lock:
            busy = set(self._busy)
        futures = [self._submit(row_id, consumer_id)
                   for row_id, consumer_id in self._lease_due(limit, busy)]
        wait(futures)
        return len(futures)

    def _lease_due(self, limit: int, busy: set[str]) -> list[tuple[int, str]]:
        """Lease the oldest due row of up to ``limit`` consumers not in ``busy``: push their
        ``next_attempt_at`` past the time an attempt can take."""
        now = utcnow()
        with self.db.transaction() as s:
            query = (select(OutboxRow.id, OutboxRow.consumer_id)
                     .where(OutboxRow.status == "pending", OutboxRow.next_attempt_at <= now)
                     .order_by(OutboxRow.next_attempt_at, OutboxRow.id).limit(limit * 10))
            if busy:
                query = query.where(OutboxRow.consumer_id.not_in(busy))
            if self.db.is_postgres:
                query = query.with_for_update(skip_locked=True)
            picked: dict[str, int] = {}
            for row_id, consumer_id in s.execute(query):
                if len(picked) < limit:
                    picked.setdefault(consumer_id, row_id)
            if picked:
                s.execute(update(OutboxRow).where(OutboxRow.id.in_(picked.values()))
                          .values(next_attempt_at=now + timedelta(seconds=self.lease_s)))
        return [(row_id, consumer_id) for consumer_id, row_id in picked.items()]

    def _submit(self, row_id: int, consumer_id: str) -> Future[None]:
        with self._lock:
            self._busy.add(consumer_id)
        future = self._pool.submit(self._attempt, row_id)
        future.add_done_callback(lambda _: self._done(consumer_id))
        return future

    def _done(self, consumer_id: str) -> None:
        with self._lock:
            self._busy.discard(consumer_id)
        self._wake.set()

    def _attempt(self, row_id: int) -> None:
        """One delivery attempt of the row, ended at ``deadline_s`` if it has no answer by then."""
        with Deadline(self.deadline_s) as deadline:
            with self._lock:
                self._deadlines.add(deadline)
            try:
                self._deliver(row_id)
            except Exception as exc:  # recording it failed (database outage): the lease expires
                log.warning("webhook delivery of outbox row %d failed: %s", row_id,
                            type(exc).__name__)
            finally:
                with self._lock:
                    self._deadlines.discard(deadline)

    def _deliver(self, row_id: int) -> None:
        with self.db.read_sessions() as s:
            found = s.execute(select(OutboxRow, ConsumerRow)
                              .join(ConsumerRow, ConsumerRow.id == OutboxRow.consumer_id)
                              .where(OutboxRow.id == row_id)).first()
        if found is None:
            return
        row, consumer = found
        status_code: int | None = None
        retry_after: float | None = None
        try:
            target = resolve_webhook_target(consumer.url, self.allow_hosts)
            body = json.dumps(row.payload, sort_keys=True).encode()
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": row.idempotency_key,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(consumer.secret, row.idempotency_key, timestamp, body),
                "user-agent": "lakesaga-webhooks",
            }
            fault_point("webhook.before_send")
            resp = self._send(target, body, headers)
            try:
                status_code = resp.status_code
                retry_after = _retry_after_s(resp.headers.get("retry-after"))
                _drain_capped(resp, deadline=time.monotonic() + self.timeout_s)
            finally:
                resp.close()
            if 200 <= status_code < 300:
                error = None
            elif 300 <= status_code < 400:
                error = f"HTTP {status_code} (redirects are not followed)"
            else:
                error = f"HTTP {status_code}"
            fault_point("webhook.after_send")
        except UnsafeUrl as exc:
            error = str(exc)
        except Exception as exc:  # any failure of one delivery must not stall the others
            error = current_deadline_reason() or f"{type(exc).__name__}"
        self._record(row, status_code, error, retry_after)

    def _send(self, target: WebhookTarget, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """Send to the first checked address that accepts the connection (in resolver order)."""
        addresses: tuple[str | None, ...] = target.addresses or (None,)
        for address in addresses[:-1]:
            try:
                return self.client.send(pinned_request(self.client, target, address, body, headers),
                                        stream=True)
            except httpx.ConnectError:
                continue
        return self.client.send(pinned_request(self.client, target, addresses[-1], body, headers),
                                stream=True)

    def _record(self, row: OutboxRow, status_code: int | None, error: str | None,
                retry_after: float | None) -> None:
        now = utcnow()
        attempts = row.attempts + 1
        values: dict[str, object] = {"attempts": attempts, "last_status_code": status_code,
                                     "last_error": error}
        if error is None:
            values.update(status="delivered", delivered_at=now)
        elif attempts >= self.max_attempts:
            values.update(status="dead")
            log.warning("webhook %s dead after %d attempts: %s", row.idempotency_key, attempts, error)
        else:
            backoff = min(300.0, 0.5 * 2 ** (attempts - 1)) * random.uniform(0.5, 1.0)
            values["next_attempt_at"] = now + timedelta(seconds=max(backoff, retry_after or 0))
        with self.db.transaction() as s:
            s.execute(update(OutboxRow).where(OutboxRow.id == row.id).values(**values))


def _retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date (RFC 9110),
    bounded to [0, MAX_RETRY_AFTER_S]; None if absent or unparseable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000" or no zone: HTTP-dates are always GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def _drain_capped(resp: httpx.Response, deadline: float) -> None:
    """Read (and discard) at most MAX_RESPONSE_BYTES, and stop at ``deadline``: a slow-drip
    response must not hold the dispatcher."""
    read = 0
    for chunk in resp.iter_bytes():
        read += len(chunk)
        if read >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
            break
