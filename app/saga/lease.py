"""Leases of the sagas an executor is running, renewed by one heartbeat thread per executor.

Every third of the lease TTL the thread renews each held lease (``WHERE id AND epoch AND
lease_owner``). A lease that cannot be renewed — another worker claimed the saga, or the
database stayed unreachable until a third of a TTL before the lease ends — is marked lost, and
the step running under it stops at its next ownership check, before another worker may claim
the saga. The thread exits when it finds nothing to renew and is started again by the next
claim, so an idle executor holds no thread.

A step past its deadline (``ExecutorConfig.step_timeout_s``) gets its lease no longer renewed:
a step that cannot make progress (a read that never returns) must not keep its saga forever.
The lease runs out, another worker claims the saga (counted towards its poison limit), and the
stuck step, should it ever return, stops at its ownership check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from app.saga.step_log import Claim, StepLog

log = logging.getLogger("lakesaga.executor")


class Lease:
    """One claimed saga's lease as its heartbeat sees it."""

    def __init__(self, claim: Claim, ttl_s: float) -> None:
        self.saga_id, self.epoch = claim.saga_id, claim.epoch
        #: Set once the lease could not be renewed: the saga may belong to someone else soon.
        self.lost = threading.Event()
        #: ``time.monotonic()`` at which the lease ends unless renewed.
        self.ends_at = time.monotonic() + ttl_s
        #: ``time.monotonic()`` after which the running step counts as stuck (None: no step
        #: runs, or it has no deadline); set by the runner around each step's work.
        self.step_deadline: float | None = None


class LeaseKeeper:
    """Renews the leases of every saga an executor runs, from one thread."""

    def __init__(self, step_log: StepLog, owner: str, ttl_s: float,
                 describe_error: Callable[[BaseException], str] = str) -> None:
        self._log, self._owner, self._ttl_s = step_log, owner, ttl_s
        self._describe_error = describe_error
        self._held: dict[tuple[str, int], Lease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @contextmanager
    def hold(self, claim: Claim) -> Iterator[Lease]:
        """Keep the claim's lease renewed while the block runs."""
        lease = Lease(claim, self._ttl_s)
        key = (claim.saga_id, claim.epoch)
        with self._lock:
            self._held[key] = lease
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"heartbeat {self._owner}")
                self._thread.start()
        try:
            yield lease
        finally:
            with self._lock:
                self._held.pop(key, None)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop renewing (the executor is stopping; a later claim starts renewing again)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._ttl_s / 3):
            with self._lock:
                leases = list(self._held.values())
                if not leases:  # idle: the next claim starts a new thread
                    self._thread = None
                    return
            for lease in leases:
                self._renew(lease)

    def _renew(self, lease: Lease) -> None:
        if lease.lost.is_set():
            return
        started = time.monotonic()
        deadline = lease.step_deadline
        if deadline is not None and started > deadline:
            log.warning("saga %s: its step has run past LAKESAGA_STEP_TIMEOUT_S; the lease is "
                        "no longer renewed and another worker will take the saga over",
                        lease.saga_id)
            lease.lost.set()
            return
        try:
            renewed = self._log.renew_lease(lease.saga_id, lease.epoch, self._owner, self._ttl_s)
        except Exception as exc:  # the database may be restarting: keep trying until the lease ends
            log.warning("heartbeat for %s failed: %s", lease.saga_id, self._describe_error(exc))
            # Give up a third of a TTL early, so the step stops before another worker may
            # claim the saga.
            if time.monotonic() < lease.ends_at - self._ttl_s / 3:
                return
            renewed = False
        if renewed:
            lease.ends_at = started + self._ttl_s
        else:
            lease.lost.set()
