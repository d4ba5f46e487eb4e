"""The executor: claims sagas from the log and drives them forward or backward.

Recovery after a crash is nothing but the normal claim of a saga whose lease expired, so running
it twice is harmless; what the log says has succeeded is never re-run, a step found ``running`` is
re-run (steps are idempotent), and a saga found ``compensating`` only ever resumes compensation.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.faults import fault_point
from app.saga.definition import Saga, StepContext, StepSpec
from app.saga.errors import LostOwnership, StepDeferred, UnknownDefinition
from app.saga.fencing import owner_check
from app.saga.retry import RetryPolicy
from app.saga.states import STEP_STATUSES_TO_COMPENSATE, SagaStatus, StepStatus
from app.saga.step_log import Claim, StepLog, utcnow

log = logging.getLogger("lakesaga.executor")


@dataclass(frozen=True)
class ExecutorConfig:
    concurrency: int = 2
    lease_ttl_s: float = 30.0
    poll_interval_s: float = 0.5
    max_saga_attempts: int = 5
    step_retry: RetryPolicy = RetryPolicy()
    #: Backoff before a saga is claimed again after a step past the pivot failed, or after a
    #: step kept failing transiently (an outage).
    after_pivot_retry_s: float = 5.0


def describe_error(exc: BaseException) -> str:
    """A one-line error for the log and the API: never SQL statements or bound parameters."""
    from sqlalchemy.exc import StatementError

    if isinstance(exc, StatementError) and exc.orig is not None:
        exc = exc.orig
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:2000]


class Heartbeat:
    """Renews the lease every third of its TTL while a saga is being worked on."""

    def __init__(self, step_log: StepLog, claim: Claim, owner: str, ttl_s: float) -> None:
        self._log, self._claim, self._owner, self._ttl_s = step_log, claim, owner, ttl_s
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        deadline = time.monotonic() + self._ttl_s
        while not self._stop.wait(self._ttl_s / 3):
            try:
                renewed = self._log.renew_lease(
                    self._claim.saga_id, self._claim.epoch, self._owner, self._ttl_s
                )
            except Exception as exc:  # the database may be restarting: keep trying until the lease ends
                log.warning("heartbeat for %s failed: %s", self._claim.saga_id, describe_error(exc))
                # Give up a third of a TTL early, so the step stops before another worker may
                # claim the saga.
                renewed = time.monotonic() < deadline - self._ttl_s / 3
                if renewed:
                    continue
            if not renewed:
                self.lost.set()
                return
            deadline = time.monotonic() + self._ttl_s


class SagaRunner:
    """Runs one claimed saga to its next resting point (terminal, or waiting for a retry)."""

    def __init__(
        self, step_log: StepLog, definition: Saga, claim: Claim, config: ExecutorConfig,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.log, self.definition, self.claim, self.config = step_log, definition, claim, config
        self.heartbeat = heartbeat
        self.saga_id, self.epoch = claim.saga_id, claim.epoch

    def run(self) -> None:
        saga = self.log.get(self.saga_id)
        assert saga is not None
        self.saga = saga
        if (saga.status == SagaStatus.COMPENSATING
                and self.claim.attempts > 2 * self.config.max_saga_attempts):
            # Compensation itself keeps killing its worker: stop and leave it to an operator.
            self.log.transition_saga(
                self.saga_id, self.epoch, SagaStatus.FAILED,
                error=f"compensation interrupted {self.claim.attempts} times; not rolled back: "
                      + ", ".join(r.step for r in self.log.steps(self.saga_id)
                                  if r.status in STEP_STATUSES_TO_COMPENSATE),
            )
            return
        if saga.status == SagaStatus.RUNNING:
            reason = self._reason_to_turn_back()
            if reason:
                self.log.transition_saga(self.saga_id, self.epoch, SagaStatus.COMPENSATING,
                                         error=reason)
            elif not self._run_forward():
                return
        self._run_compensation()

    def _reason_to_turn_back(self) -> str | None:
        steps = {row.step: row for row in self.log.steps(self.saga_id)}
        pivot = self.definition.steps[self.definition.pivot_index()].name
        if steps[pivot].status == StepStatus.SUCCEEDED:
            return None
        if self.saga.cancel_requested:
            return "cancelled by request"
        if self.claim.attempts > self.config.max_saga_attempts:
            return (f"poison: claimed {self.claim.attempts} times without finishing "
                    f"(limit {self.config.max_saga_attempts})")
        return None

    def _context(self, spec: StepSpec, attempt: int, outputs: dict[str, dict[str, Any]],
                 checkpoint: dict[str, Any] | None, output: dict[str, Any] | None = None,
                 ) -> StepContext:
        return StepContext(
            saga_id=self.saga_id,
            definition=self.definition.name,
            dataset=self.saga.dataset,
            partition_date=self.saga.partition_date,
            epoch=self.epoch,
            step=spec.name,
            attempt=attempt,
            request=self.saga.request,
            manifest=self.saga.manifest,
            outputs=dict(outputs),
            checkpoint=checkpoint,
            output=output,
            _save_checkpoint=lambda data: self.log.save_checkpoint(
                self.saga_id, self.epoch, spec.name, data),
            _ensure_owner=self._ensure_owner,
        )

    def _ensure_owner(self) -> None:
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise LostOwnership(f"saga {self.saga_id}: lease lost")
        self.log.ensure_owner(self.saga_id, self.epoch)

    def _run_forward(self) -> bool:
        """Run the remaining forward steps. True if the saga must now compensate."""
        rows = {row.step: row for row in self.log.steps(self.saga_id)}
        outputs: dict[str, dict[str, Any]] = {}
        pivot_index = self.definition.pivot_index()
        for index, spec in enumerate(self.definition.steps):
            row = rows[spec.name]
            if row.status == StepStatus.SUCCEEDED:
                outputs[spec.name] = row.output or {}
                continue
            after_pivot = index > pivot_index
            if not after_pivot and row.status == StepStatus.FAILED:
                # The step failed but the process died before the saga turned back.
                self.log.transition_saga(self.saga_id, self.epoch, SagaStatus.COMPENSATING,
                                         error=f"{spec.name} failed: {row.error}")
                return True
            if not after_pivot and self.log.cancel_requested(self.saga_id):
                self.log.transition_saga(self.saga_id, self.epoch, SagaStatus.COMPENSATING,
                                         error="cancelled by request")
                return True
            error = self._run_step(spec, outputs, row.attempt, row.checkpoint)
            if error is None:
                continue
            if after_pivot:
                # Past the point of no return: retry later through a normal claim.
                self.log.release(self.saga_id, self.epoch,
                                 retry_after_s=self.config.after_pivot_retry_s)
                return False
            self.log.transition_saga(self.saga_id, self.epoch, SagaStatus.COMPENSATING,
                                     error=f"{spec.name} failed: {error}")
            return True
        self.log.transition_saga(self.saga_id, self.epoch, SagaStatus.SUCCEEDED)
        return False

    def _run_step(self, spec: StepSpec, outputs: dict[str, dict[str, Any]], attempt: int,
                  checkpoint: dict[str, Any] | None) -> str | None:
        """Run one step with retries; record the result. Returns the error text on failure."""
        policy = self.config.step_retry
        tries = 0
        while True:
            attempt += 1
            tries += 1
            self.log.update_step(
                self.saga_id, self.epoch, spec.name, StepStatus.RUNNING, kind="step_started",
                values={"attempt": attempt, "started_at": utcnow(), "error": None},
                payload={"attempt": attempt},
            )
            ctx = self._context(spec, attempt, outputs, checkpoint)
            try:
                fault_point(spec.name)
                with owner_check(self._ensure_owner):
                    output = self.definition.run_action(spec, ctx)
                self._ensure_owner()
                fault_point(f"{spec.name}.before_record")
            except LostOwnership:
                raise
            except Exception as exc:
                error = describe_error(exc)
                checkpoint = ctx.checkpoint
                if self.definition.is_transient(exc):
                    if policy.gives_up_after(tries):
                        raise StepDeferred(f"{spec.name}: {error}") from exc
                    log.info("step %s of %s failed (try %d), retrying: %s",
                             spec.name, self.saga_id, tries, error)
                    time.sleep(policy.delay_s(tries))
                    continue
                log.warning("step %s of %s failed: %s", spec.name, self.saga_id, error)
                self.log.update_step(
                    self.saga_id, self.epoch, spec.name, StepStatus.FAILED, kind="step_failed",
                    values={"error": error, "finished_at": utcnow()}, payload={"error": error},
                )
                return error
            self.log.update_step(
                self.saga_id, self.epoch, spec.name, StepStatus.SUCCEEDED, kind="step_succeeded",
                values={"output": output, "finished_at": utcnow()},
                payload={"attempt": attempt},
            )
            fault_point(f"{spec.name}.after_record")
            outputs[spec.name] = output
            return None

    def _run_compensation(self) -> None:
        """Undo, in reverse order, every step up to the pivot that may have written anything."""
        rows = {row.step: row for row in self.log.steps(self.saga_id)}
        forward = self.definition.steps[: self.definition.pivot_index() + 1]
        self.log.skip_pending_steps(
            self.saga_id, self.epoch,
            [s.name for s in self.definition.steps if rows[s.name].status == StepStatus.PENDING],
        )
        outputs = {name: row.output or {} for name, row in rows.items() if row.output}
        for spec in reversed(forward):
            row = rows[spec.name]
            if row.status not in STEP_STATUSES_TO_COMPENSATE:
                continue
            error = self._compensate_step(spec, outputs, row.compensation_attempt,
                                          row.checkpoint, row.output)
            if error is not None:
                left_behind = [s.name for s in forward
                               if rows[s.name].status in STEP_STATUSES_TO_COMPENSATE
                               and s.name != spec.name] + [spec.name]
                self.log.transition_saga(
                    self.saga_id, self.epoch, SagaStatus.FAILED,
                    error=f"compensation of {spec.name} failed: {error}; "
                          f"not rolled back: {', '.join(dict.fromkeys(left_behind))}",
                )
                return
            rows = {row.step: row for row in self.log.steps(self.saga_id)}
        self.log.transition_saga(self.saga_id, self.epoch, SagaStatus.COMPENSATED)

    def _compensate_step(self, spec: StepSpec, outputs: dict[str, dict[str, Any]], attempt: int,
                         checkpoint: dict[str, Any] | None, output: dict[str, Any] | None,
                         ) -> str | None:
        policy = self.config.step_retry
        tries = 0
        name = spec.compensation or spec.name
        while True:
            attempt += 1
            tries += 1
            self.log.update_step(
                self.saga_id, self.epoch, spec.name, StepStatus.COMPENSATING,
                kind="compensation_started",
                values={"compensation_attempt": attempt, "compensation_started_at": utcnow(),
                        "compensation_error": None},
                payload={"compensation": name, "attempt": attempt},
            )
            try:
                result: dict[str, Any] = {}
                if spec.compensation is not None:
                    fault_point(spec.compensation)
                    ctx = self._context(spec, attempt, outputs, checkpoint, output)
                    with owner_check(self._ensure_owner):
                        result = self.definition.run_compensation(spec, ctx)
                    self._ensure_owner()
                    fault_point(f"{spec.compensation}.before_record")
            except LostOwnership:
                raise
            except Exception as exc:
                error = describe_error(exc)
                self.log.update_step(
                    self.saga_id, self.epoch, spec.name, StepStatus.COMPENSATING,
                    kind="compensation_failed", values={"compensation_error": error},
                    payload={"compensation": name, "error": error},
                )
                if policy.gives_up_after(tries):
                    if self.definition.is_transient(exc):
                        raise StepDeferred(f"{name}: {error}") from exc
                    return error
                time.sleep(policy.delay_s(tries))
                continue
            self.log.update_step(
                self.saga_id, self.epoch, spec.name, StepStatus.COMPENSATED,
                kind="compensation_succeeded",
                values={"compensation_output": result, "compensation_finished_at": utcnow()},
                payload={"compensation": name},
            )
            fault_point(f"{name}.after_record")
            return None


class Executor:
    """Worker threads that claim and run sagas until stopped."""

    def __init__(self, step_log: StepLog, definitions: dict[str, Callable[[], Saga]],
                 config: ExecutorConfig, worker_name: str | None = None) -> None:
        self.log = step_log
        self.definitions = definitions
        self.config = config
        self.owner = worker_name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.config.concurrency):
            thread = threading.Thread(target=self._loop, name=f"saga-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """Look for work now (called after a saga is submitted in this process)."""
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception as exc:  # database outage: back off and keep polling
                log.warning("executor poll failed: %s", describe_error(exc))
                worked = False
            if not worked:
                self._wake.wait(self.config.poll_interval_s)
                self._wake.clear()

    def run_once(self) -> bool:
        """Claim and run one saga. False when there was nothing to do."""
        claim = self.log.claim_next(self.owner, self.config.lease_ttl_s)
        if claim is None:
            return False
        log.info("claimed saga %s (epoch %d, %s)", claim.saga_id, claim.epoch, claim.status)
        factory = self.definitions.get(claim.definition)
        try:
            if factory is None:
                raise UnknownDefinition(f"no saga definition named {claim.definition!r}")
            with Heartbeat(self.log, claim, self.owner, self.config.lease_ttl_s) as heartbeat:
                SagaRunner(self.log, factory(), claim, self.config, heartbeat).run()
        except LostOwnership as exc:
            log.warning("stopped saga %s: %s", claim.saga_id, exc)
        except StepDeferred as exc:
            log.warning("deferred saga %s: %s", claim.saga_id, exc)
            self._release_quietly(claim)
        except Exception as exc:
            # Leave the lease to expire: the saga is retried by a later claim, counted as an attempt.
            log.exception("saga %s interrupted: %s", claim.saga_id, describe_error(exc))
        return True

    def _release_quietly(self, claim: Claim) -> None:
        try:
            self.log.release(claim.saga_id, claim.epoch, retry_after_s=self.config.after_pivot_retry_s)
        except Exception as exc:  # the database is still away: the lease runs out instead
            log.warning("could not release saga %s: %s", claim.saga_id, describe_error(exc))

    def drain(self, timeout_s: float = 60.0) -> None:
        """Run sagas in the calling thread until none is runnable (tests and one-shot runs)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.run_once():
            pass
