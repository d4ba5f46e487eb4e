"""Saga and step statuses, and the transitions allowed between them: data, not code paths.

The database mirrors these with CHECK constraints; every status write in ``step_log`` is a
compare-and-set against ``ALLOWED_*_TRANSITIONS``.
"""

from __future__ import annotations

from enum import StrEnum


class SagaStatus(StrEnum):
    #: Accepted, waiting for a worker (or for an earlier saga of the same partition).
    PENDING = "pending"
    #: A worker is executing forward steps.
    RUNNING = "running"
    #: Every step succeeded. Terminal.
    SUCCEEDED = "succeeded"
    #: A step failed (or the saga was cancelled / poisoned): undoing written steps in reverse.
    COMPENSATING = "compensating"
    #: Every written step was undone; the lake is as it was before the saga. Terminal.
    COMPENSATED = "compensated"
    #: Compensation exhausted its retries; an operator must act (``POST /sagas/{id}/retry``).
    FAILED = "failed"


class StepStatus(StrEnum):
    #: Not started.
    PENDING = "pending"
    #: Started; after a crash a running step is re-run (steps are idempotent).
    RUNNING = "running"
    #: Finished; its recorded output is reused, it is never re-run.
    SUCCEEDED = "succeeded"
    #: Failed permanently or ran out of retries.
    FAILED = "failed"
    #: Its compensation is under way (or was interrupted and will resume).
    COMPENSATING = "compensating"
    #: Its compensation finished.
    COMPENSATED = "compensated"
    #: Never started because the saga turned back first.
    SKIPPED = "skipped"


TERMINAL_SAGA_STATUSES = frozenset({SagaStatus.SUCCEEDED, SagaStatus.COMPENSATED})
#: Statuses a saga rests in until someone acts (``failed`` until a retry): it has a
#: ``finished_at``, no worker holds it, and a wait for it to change answers at once.
FINISHED_SAGA_STATUSES = TERMINAL_SAGA_STATUSES | {SagaStatus.FAILED}
#: Statuses a worker may hold a lease on.
ACTIVE_SAGA_STATUSES = frozenset({SagaStatus.RUNNING, SagaStatus.COMPENSATING})

ALLOWED_SAGA_TRANSITIONS: dict[SagaStatus, frozenset[SagaStatus]] = {
    SagaStatus.PENDING: frozenset({SagaStatus.RUNNING, SagaStatus.COMPENSATING}),
    SagaStatus.RUNNING: frozenset({SagaStatus.SUCCEEDED, SagaStatus.COMPENSATING}),
    SagaStatus.COMPENSATING: frozenset({SagaStatus.COMPENSATED, SagaStatus.FAILED}),
    SagaStatus.FAILED: frozenset({SagaStatus.COMPENSATING}),
    SagaStatus.SUCCEEDED: frozenset(),
    SagaStatus.COMPENSATED: frozenset(),
}

ALLOWED_STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset({StepStatus.RUNNING, StepStatus.SKIPPED}),
    # running -> running is the re-run of a step interrupted by a crash.
    StepStatus.RUNNING: frozenset(
        {StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.COMPENSATING}
    ),
    StepStatus.SUCCEEDED: frozenset({StepStatus.COMPENSATING}),
    # failed -> running: a step after the pivot is retried, never compensated.
    StepStatus.FAILED: frozenset({StepStatus.COMPENSATING, StepStatus.RUNNING}),
    StepStatus.COMPENSATING: frozenset({StepStatus.COMPENSATING, StepStatus.COMPENSATED}),
    StepStatus.COMPENSATED: frozenset(),
    StepStatus.SKIPPED: frozenset(),
}

#: Step statuses that mean the step may have written something and must be compensated.
STEP_STATUSES_TO_COMPENSATE = frozenset(
    {StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.COMPENSATING}
)


def sources_of(target: StepStatus) -> list[str]:
    """The step statuses from which ``target`` may be reached (the CAS ``WHERE status IN``)."""
    return sorted(s.value for s, targets in ALLOWED_STEP_TRANSITIONS.items() if target in targets)


def saga_sources_of(target: SagaStatus) -> list[str]:
    return sorted(s.value for s, targets in ALLOWED_SAGA_TRANSITIONS.items() if target in targets)
