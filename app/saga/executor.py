"""The executor: claims sagas from the log and drives them forward or backward.

Recovery after a crash is nothing but the normal claim of a saga whose lease expired, so running
it twice is harmless; what the log says has succeeded is never re-run, a step found ``running`` is
re-run (steps are idempotent), and a saga found ``compensating`` only ever resumes compensation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from app.db.rows import utcnow
from app.faults import fault_point
from app.saga.definition import Saga, StepContext, StepSpec
from app.saga.errors import CancelRequested, LostOwnership, StepDeferred, UnknownDefinition
from app.saga.fencing import owner_check
from app.saga.lease import Lease, LeaseKeeper
from app.saga.retry import RetryPolicy
from app.saga.states import STEP_STATUSES_TO_COMPENSATE, SagaStatus, StepStatus
from app.saga.step_log import Claim, StepLog, StepStart

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
    #: A step's own work running longer than this is taken as stuck: its lease is no longer
    #: renewed (``LeaseKeeper``). 0: no limit.
    step_timeout_s: float = 0.0


def describe_error(exc: BaseException) -> str:
    """A one-line error for the log and the API: never SQL statements or bound parameters."""
    from sqlalchemy.exc import StatementError

    if isinstance(exc, StatementError) and exc.orig is not None:
        exc = exc.orig
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:2000]


class SagaRunner:
    """Runs one claimed saga to its next resting point (terminal, or waiting for a retry).

    The claim carries the saga and its steps as the log had them; the runner keeps that view
    current with its own writes (nobody else writes the steps of a saga it owns), and reads the
    steps again only when the saga turns back.
    """

    def __init__(
        self, step_log: StepLog, definition: Saga, claim: Claim, config: ExecutorConfig,
        lease: Lease | None = None, turn: threading.Lock | None = None,
    ) -> None:
        self.log, self.definition, self.claim, self.config = step_log, definition, claim, config
        self.lease = lease
        #: The executor's turn (SQLite), held by the calling thread: let go while a step's own
        #: work runs (``_outside_turn``).
        self.turn = turn
        self.saga_id, self.epoch = claim.saga_id, claim.epoch
        self.steps = {record.step: record for record in claim.steps}

    def run(self) -> None:
        claim = self.claim
        if (claim.status == SagaStatus.COMPENSATING
                and claim.attempts > 2 * self.config.max_saga_attempts):
            # Compensation itself keeps killing its worker: stop and leave it to an operator.
            self.log.transition_saga(
                self.saga_id, self.epoch, SagaStatus.FAILED,
                error=f"compensation interrupted {claim.attempts} times; not rolled back: "
                      + ", ".join(r.step for r in self.steps.values()
                                  if r.status in STEP_STATUSES_TO_COMPENSATE),
            )
            return
        if claim.status == SagaStatus.RUNNING:
            reason = self._reason_to_turn_back()
            if reason:
                self.log.transition_saga(self.saga_id, self.epoch, SagaStatus.COMPENSATING,
                                         error=reason)
            elif not self._run_forward():
                return
        self._run_compensation()

    def _reason_to_turn_back(self) -> str | None:
        pivot = self.definition.steps[self.definition.pivot_index()].name
        if self.steps[pivot].status == StepStatus.SUCCEEDED:
            return None
        if self.claim.cancel_requested:
            return "cancelled by request"
        if self.claim.attempts > self.config.max_saga_attempts:
            return (f"poison: claimed {self.claim.attempts} times without finishing "
                    f"(limit {self.config.max_saga_attempts})")
        return None

    @contextlib.contextmanager
    def _outside_turn(self) -> Iterator[None]:
        """Let the process's other executor threads take their turn while this one runs a
        step's own work (an action, a compensation) or waits to retry it."""
        if self.turn is None:
            yield
            return
        self.turn.release()
        try:
            yield
        finally:
            self.turn.acquire()

    def _work(self, point: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A step's own work (``run``: its action or compensation) between its fault points
        ``<point>`` and ``<point>.before_record``, outside the executor's turn."""
        with self._outside_turn():
            fault_point(point)
            with owner_check(self._ensure_owner), self._step_deadline():
                result = run()
            # The record that follows is fenced by the epoch; a lost lease stops the step sooner.
            self._check_lease()
            fault_point(f"{point}.before_record")
        return result

    @contextlib.contextmanager
    def _step_deadline(self) -> Iterator[None]:
        """Tell the heartbeat when the step running in the block counts as stuck."""
        if self.lease is None or not self.config.step_timeout_s:
            yield
            return
        self.lease.step_deadline = time.monotonic() + self.config.step_timeout_s
        try:
            yield
        finally:
            self.lease.step_deadline = None

    def _wait_to_retry(self, tries: int) -> None:
        with self._outside_turn():
            time.sleep(self.config.step_retry.delay_s(tries))

    def _recorded(self, step: str, **changes: Any) -> None:
        """Apply a change this runner has just committed to its view of the step."""
        self.steps[step] = replace(self.steps[step], **changes)

    def _context(self, spec: StepSpec, attempt: int, outputs: dict[str, dict[str, Any]],
                 checkpoint: dict[str, Any] | None, output: dict[str, Any] | None = None,
                 ) -> StepContext:
        return StepContext(
            saga_id=self.saga_id,
            definition=self.definition.name,
            dataset=self.claim.dataset,
            partition_date=self.claim.partition_date,
            epoch=self.epoch,
            step=spec.name,
            attempt=attempt,
            request=self.claim.request,
            manifest=self.claim.manifest,
            outputs=dict(outputs),
            checkpoint=checkpoint,
            output=output,
            _save_checkpoint=lambda data: self._save_checkpoint(spec.name, data),
            _ensure_owner=self._ensure_owner,
        )

    def _save_checkpoint(self, step: str, data: dict[str, Any]) -> None:
        self.log.save_checkpoint(self.saga_id, self.epoch, step, data)
        self._recorded(step, checkpoint=data)

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.lost.is_set():
            raise LostOwnership(f"saga {self.saga_id}: lease lost")

    def _ensure_owner(self) -> None:
        """The ownership check of external writes (lake commits): the lease, then the log."""
        self._check_lease()
        self.log.ensure_owner(self.saga_id, self.epoch)

    def _run_forward(self) -> bool:
        """Run the remaining forward steps. True if the saga must now compensate."""
        outputs: dict[str, dict[str, Any]] = {}
        steps = self.definition.steps
        pivot_index = self.definition.pivot_index()
        # The step started by the last write (the claim's, or the previous step's record).
        started_step = self.claim.started
        for index, spec in enumerate(steps):
            row = self.steps[spec.name]
            if row.status == StepStatus.SUCCEEDED:
                outputs[spec.name] = row.output or {}
                continue
            after_pivot = index > pivot_index
            if not after_pivot and row.status == StepStatus.FAILED:
                # The step failed but the process died before the saga turned back.
                self.log.transition_saga(self.saga_id, self.epoch, SagaStatus.COMPENSATING,
                                         error=f"{spec.name} failed: {row.error}")
                return True
            last = index == len(steps) - 1
            start = None if last else self._start_of(index + 1)
            try:
                # Cancellation is checked under the saga's lock as the step starts; past the
                # pivot it is ignored.
                error = self._run_step(spec, outputs, row.attempt, row.checkpoint,
                                       unless_cancelled=not after_pivot,
                                       started=started_step == spec.name, then=start, last=last)
            except CancelRequested:
                self.log.transition_saga(self.saga_id, self.epoch, SagaStatus.COMPENSATING,
                                         error="cancelled by request")
                return True
            if error is None:
                if last:  # its record was the saga's success too
                    return False
                # (a start that cancellation left out raised CancelRequested)
                started_step = start.step if start is not None else None
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

    def _start_of(self, index: int) -> StepStart | None:
        """The start of step ``index``, to record with its predecessor's success: only if it
        has not run yet (a step found running or failed is dealt with on its own)."""
        spec = self.definition.steps[index]
        row = self.steps[spec.name]
        if row.status != StepStatus.PENDING:
            return None
        return StepStart(spec.name, row.attempt + 1,
                         unless_cancelled=index <= self.definition.pivot_index())

    def _run_step(self, spec: StepSpec, outputs: dict[str, dict[str, Any]], attempt: int,
                  checkpoint: dict[str, Any] | None, *, unless_cancelled: bool,
                  started: bool = False, then: StepStart | None = None, last: bool = False,
                  ) -> str | None:
        """Run one step with retries; record the result. Returns the error text on failure.

        ``started``: the step's first try was already started (its ``attempt`` recorded).
        The success is recorded in one write with what follows it: ``then``, the next step's
        start (if cancellation leaves that out, CancelRequested is raised once the success is
        recorded), or with ``last`` the saga's success.
        """
        policy = self.config.step_retry
        tries = 0
        while True:
            tries += 1
            if not (started and tries == 1):
                attempt += 1
                self.log.update_step(
                    self.saga_id, self.epoch, spec.name, StepStatus.RUNNING,
                    kind="step_started", values=StepStart(spec.name, attempt).values(utcnow()),
                    payload={"attempt": attempt},
                    unless_cancelled=unless_cancelled and tries == 1,
                )
                self._recorded(spec.name, status=StepStatus.RUNNING, attempt=attempt, error=None)
            ctx = self._context(spec, attempt, outputs, checkpoint)
            try:
                output = self._work(spec.name, partial(self.definition.run_action, spec, ctx))
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
                    self._wait_to_retry(tries)
                    continue
                log.warning("step %s of %s failed: %s", spec.name, self.saga_id, error)
                self.log.update_step(
                    self.saga_id, self.epoch, spec.name, StepStatus.FAILED, kind="step_failed",
                    values={"error": error, "finished_at": utcnow()}, payload={"error": error},
                )
                self._recorded(spec.name, status=StepStatus.FAILED, error=error)
                return error
            values = {"output": output, "finished_at": utcnow()}
            next_started = False
            if then is None and not last:
                self.log.update_step(
                    self.saga_id, self.epoch, spec.name, StepStatus.SUCCEEDED,
                    kind="step_succeeded", values=values, payload={"attempt": attempt},
                )
            else:
                next_started = self.log.advance(self.saga_id, self.epoch, spec.name,
                                                values=values, payload={"attempt": attempt},
                                                start=then)
                if then is not None and next_started:
                    self._recorded(then.step, status=StepStatus.RUNNING, attempt=then.attempt,
                                   error=None)
            self._recorded(spec.name, status=StepStatus.SUCCEEDED, output=output)
            fault_point(f"{spec.name}.after_record")
            outputs[spec.name] = output
            if then is not None and not next_started:
                raise CancelRequested(f"saga {self.saga_id}: cancelled by request")
            return None

    def _run_compensation(self) -> None:
        """Undo, in reverse order, every step up to the pivot that may have written anything."""
        # Turning back is rare: read what the log says rather than trust the runner's view.
        self.steps = {record.step: record for record in self.log.step_records(self.saga_id)}
        rows = self.steps
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
            self._recorded(spec.name, status=StepStatus.COMPENSATED)
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
                    ctx = self._context(spec, attempt, outputs, checkpoint, output)
                    result = self._work(spec.compensation,
                                        partial(self.definition.run_compensation, spec, ctx))
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
                self._wait_to_retry(tries)
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
    """Worker threads that claim and run sagas until stopped.

    On SQLite the threads take turns: a thread holds the executor's turn while it claims a saga
    and records its transitions, and lets it go while a step's own work runs (an action or a
    compensation: the lake work) and while it waits to retry one. The process's writes run one
    at a time anyway (``Database.one_writer``), and the bookkeeping around them is Python under
    the GIL; threads interleaving there gain nothing and pay a thread switch at almost every
    statement (each SQLite call releases the GIL to a thread that soon waits for the writer).
    On PostgreSQL each write is a round trip that other threads overlap: no turns.
    """

    def __init__(self, step_log: StepLog, definitions: dict[str, Callable[[], Saga]],
                 config: ExecutorConfig, worker_name: str | None = None) -> None:
        self.log = step_log
        self.definitions = definitions
        self.config = config
        self.owner = worker_name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._leases = LeaseKeeper(step_log, self.owner, config.lease_ttl_s, describe_error)
        self._turn = threading.Lock() if step_log.db.one_writer else None
        #: The definitions this executor claims sagas of (others wait for a worker that knows
        #: them: claiming one would count an attempt towards its poison limit for nothing).
        self._known = tuple(sorted(definitions))

    def start(self) -> None:
        for i in range(self.config.concurrency):
            thread = threading.Thread(target=self._loop, name=f"saga-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """Look for work now (called after a saga is submitted in this process)."""
        self._wake.set()

    def workers_alive(self) -> tuple[int, int]:
        """(worker threads alive, worker threads configured), for readiness probes."""
        return sum(t.is_alive() for t in self._threads), self.config.concurrency

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop claiming and wait for the running sagas' current steps; False if a thread was
        still running one after ``timeout_s`` (its lease runs out and the saga resumes)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._leases.stop()
        return not any(thread.is_alive() for thread in self._threads)

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
        # The claim and the saga's transitions share one connection of the pool.
        with self.log.db.pinned(), self._turn or contextlib.nullcontext():
            return self._claim_and_run()

    def _claim_and_run(self) -> bool:
        claim = self.log.claim_next(self.owner, self.config.lease_ttl_s, self._known)
        if claim is None:
            return False
        log.info("claimed saga %s (epoch %d, %s)", claim.saga_id, claim.epoch, claim.status)
        factory = self.definitions.get(claim.definition)
        try:
            if factory is None:
                raise UnknownDefinition(f"no saga definition named {claim.definition!r}")
            with self._leases.hold(claim) as lease:
                SagaRunner(self.log, factory(), claim, self.config, lease, self._turn).run()
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
