"""Engine scenarios on a real saga log (SQLite and PostgreSQL) with a fake four-step saga.

``Pipeline`` runs a -> b -> c (pivot) -> d; each step and compensation appends to a journal and
consumes the failures a test scripted for it, so every scenario is driven in the test thread by
``Executor.run_once`` / ``drain``. Crashes are simulated by a ``BaseException`` the executor does
not catch, and lease expiry by moving ``lease_expires_at`` into the past.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from app.db.models import SagaRow
from app.db.rows import utcnow
from app.db.session import Database
from app.saga.definition import Saga, StepContext, action, compensate
from app.saga.errors import (
    CancelRequested,
    InvalidTransition,
    LostOwnership,
    PermanentError,
    TransientError,
)
from app.saga.executor import Executor, ExecutorConfig
from app.saga.retry import RetryPolicy
from app.saga.states import (
    ALLOWED_SAGA_TRANSITIONS,
    FINISHED_SAGA_STATUSES,
    SagaStatus,
    StepStatus,
)
from app.saga.step_log import NewSaga, StepLog, StepStart

pytestmark = pytest.mark.timeout(60)

PARTITION = date(2026, 1, 6)
CONFIG = ExecutorConfig(
    step_retry=RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.005),
    lease_ttl_s=30.0,
    max_saga_attempts=3,
    after_pivot_retry_s=60.0,
)


class Crash(BaseException):
    """Stands for a process dying mid-step: the executor catches only ``Exception``."""


@dataclass
class Script:
    """Scripted behaviour shared by the saga instances of one test."""

    #: ("do" | "undo", step) in call order.
    journal: list[tuple[str, str]] = field(default_factory=list)
    #: Per step: what its next calls raise, one item per call (then it succeeds).
    failures: dict[str, list[BaseException]] = field(default_factory=dict)
    undo_failures: dict[str, list[BaseException]] = field(default_factory=dict)
    #: Per step: called with the context before the step returns (e.g. to race a claim).
    hooks: dict[str, Callable[[StepContext], object]] = field(default_factory=dict)

    def play(self, kind: str, ctx: StepContext) -> None:
        self.journal.append((kind, ctx.step))
        queue = (self.failures if kind == "do" else self.undo_failures).get(ctx.step)
        if queue:
            raise queue.pop(0)
        hook = self.hooks.get(ctx.step) if kind == "do" else None
        if hook is not None:
            hook(ctx)

    def done(self, kind: str = "do") -> list[str]:
        return [step for k, step in self.journal if k == kind]


class Pipeline(Saga):
    name = "unit_pipeline"
    pivot = "c"

    def __init__(self, script: Script) -> None:
        self.script = script

    @action("a")
    def do_a(self, ctx: StepContext) -> dict[str, Any]:
        self.script.play("do", ctx)
        return {"key": f"token-{uuid.uuid4().hex}", "rows": 1}

    @compensate("a")
    def undo_a(self, ctx: StepContext) -> dict[str, Any]:
        self.script.play("undo", ctx)
        return {"undid": ctx.output}

    @action("b", depends_on=["a"])
    async def do_b(self, ctx: StepContext) -> dict[str, Any]:
        self.script.play("do", ctx)
        return {"seen_key": ctx["key"], "rows": 2}

    @compensate("b")
    async def undo_b(self, ctx: StepContext) -> None:
        self.script.play("undo", ctx)

    @action("c", depends_on=["b"])
    def do_c(self, ctx: StepContext) -> dict[str, Any]:
        self.script.play("do", ctx)
        return {"snapshot": 7}

    @compensate("c")
    def undo_c(self, ctx: StepContext) -> None:
        self.script.play("undo", ctx)

    @action("d", depends_on=["c"])
    def do_d(self, ctx: StepContext) -> dict[str, Any]:
        self.script.play("do", ctx)
        return {"notified": True}

    @compensate("d")
    def undo_d(self, ctx: StepContext) -> None:
        self.script.play("undo", ctx)


@pytest.fixture
def script() -> Script:
    return Script()


def make_executor(step_log: StepLog, script: Script, config: ExecutorConfig = CONFIG,
                  name: str = "worker-1") -> Executor:
    return Executor(step_log, {Pipeline.name: lambda: Pipeline(script)}, config, worker_name=name)


def create(step_log: StepLog, *, dataset: str = "clicks", partition: date = PARTITION,
           request: dict[str, Any] | None = None, definition: str = Pipeline.name) -> str:
    saga_id = str(uuid.uuid4())
    step_log.create_saga(
        NewSaga(
            id=saga_id,
            definition=definition,
            dataset=dataset,
            partition_date=partition,
            request=request if request is not None else {"source": "s3://raw", "key": "req"},
            manifest={"files": [{"path": "events-0.ndjson", "size": 10, "sha256": "0" * 64}]},
            request_fingerprint="f" * 64,
            idempotency_key=None,
            steps=Pipeline.step_names(),
        )
    )
    return saga_id


def set_saga(db: Database, saga_id: str, **values: Any) -> None:
    with db.transaction() as s:
        s.execute(update(SagaRow).where(SagaRow.id == saga_id).values(**values))


def expire_lease(db: Database, saga_id: str) -> None:
    set_saga(db, saga_id, lease_expires_at=utcnow() - timedelta(minutes=5))


def saga(step_log: StepLog, saga_id: str) -> SagaRow:
    row = step_log.get(saga_id)
    assert row is not None
    return row


def step_statuses(step_log: StepLog, saga_id: str) -> dict[str, str]:
    return {row.step: row.status for row in step_log.steps(saga_id)}


def compensated_statuses(step_log: StepLog, saga_id: str) -> dict[str, str]:
    """Statuses of the compensable steps; checks the step after the pivot never started."""
    statuses = step_statuses(step_log, saga_id)
    # After-pivot steps are left "pending" today; "skipped" would be as correct.
    assert statuses.pop("d") in (StepStatus.PENDING, StepStatus.SKIPPED)
    return statuses


def assert_valid_log(step_log: StepLog, saga_id: str) -> None:
    """Events are numbered 1..n, epochs never go back, and status changes chain legally."""
    events = step_log.events(saga_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    epochs = [e.epoch for e in events]
    assert epochs == sorted(epochs)
    assert events[0].kind == "created"
    status = SagaStatus.PENDING
    for event in events:
        if "from" in event.payload and event.step is None:
            assert event.payload["from"] == status, (event.seq, event.kind, event.payload)
            target = SagaStatus(event.payload["to"])
            assert target in ALLOWED_SAGA_TRANSITIONS[status], (event.seq, event.payload)
            status = target
    assert saga(step_log, saga_id).status == status


def test_definition__order_respects_depends_on() -> None:
    class Backwards(Saga):
        @action("load", depends_on=["fetch", "clean"])
        def load(self, ctx: StepContext) -> None: ...

        @action("clean", depends_on=["fetch"])
        def clean(self, ctx: StepContext) -> None: ...

        @action("fetch")
        def fetch(self, ctx: StepContext) -> None: ...

        @action("report")
        def report(self, ctx: StepContext) -> None: ...

    assert Backwards.step_names() == ["fetch", "clean", "load", "report"]
    assert Backwards.name == "Backwards"
    assert Pipeline.step_names() == ["a", "b", "c", "d"]
    assert Pipeline.pivot_index() == 2


def test_definition__subclass_overrides_one_step_by_action_name() -> None:
    class Patched(Pipeline):
        name = "patched"

        @action("b", depends_on=["a"])
        def other_b(self, ctx: StepContext) -> dict[str, Any]:
            return {"patched": True}

    assert Patched.step_names() == Pipeline.step_names()
    by_name = {s.name: s for s in Patched.steps}
    parent = {s.name: s for s in Pipeline.steps}
    assert by_name["b"].method == "other_b"
    assert by_name["b"].compensation == "undo_b"
    assert {n: s for n, s in by_name.items() if n != "b"} == {
        n: s for n, s in parent.items() if n != "b"
    }
    assert Patched.pivot == "c"


@pytest.mark.parametrize(
    ("case", "message"),
    [("unknown_dependency", "depends on unknown"), ("cycle", "cycle"),
     ("unknown_compensation", "compensation for unknown"), ("unknown_pivot", "pivot")],
)
def test_definition__invalid_raises_type_error(case: str, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        if case == "unknown_dependency":
            class _Missing(Saga):
                @action("x", depends_on=["nope"])
                def x(self, ctx: StepContext) -> None: ...
        elif case == "cycle":
            class _Cycle(Saga):
                @action("x", depends_on=["y"])
                def x(self, ctx: StepContext) -> None: ...

                @action("y", depends_on=["x"])
                def y(self, ctx: StepContext) -> None: ...
        elif case == "unknown_compensation":
            class _Orphan(Saga):
                @action("x")
                def x(self, ctx: StepContext) -> None: ...

                @compensate("z")
                def undo_z(self, ctx: StepContext) -> None: ...
        else:
            class _Pivot(Saga):
                pivot = "z"

                @action("x")
                def x(self, ctx: StepContext) -> None: ...


def _bare_context(step: str, outputs: dict[str, dict[str, Any]]) -> StepContext:
    return StepContext(
        saga_id="s", definition=Pipeline.name, dataset="clicks", partition_date=PARTITION,
        epoch=1, step=step, attempt=1, request={"key": "req", "only_in_request": 1},
        manifest={}, outputs=outputs,
    )


def test_definition__async_step_methods_are_awaited(script: Script) -> None:
    spec = {s.name: s for s in Pipeline.steps}["b"]
    ctx = _bare_context("b", {"a": {"key": "from-a"}})
    assert Pipeline(script).run_action(spec, ctx) == {"seen_key": "from-a", "rows": 2}
    assert Pipeline(script).run_compensation(spec, ctx) == {}
    assert script.journal == [("do", "b"), ("undo", "b")]


def test_definition__context_lookup_prefers_latest_output_then_request() -> None:
    ctx = _bare_context("c", {"a": {"key": "a", "x": 1}, "b": {"key": "b"}})
    assert ctx["key"] == "b"
    assert ctx["x"] == 1
    assert ctx["only_in_request"] == 1
    with pytest.raises(KeyError):
        ctx["missing"]


def test_definition__non_dict_result_is_a_type_error() -> None:
    class Odd(Saga):
        @action("x")
        def x(self, ctx: StepContext) -> Any:
            return [1]

    with pytest.raises(TypeError, match="expected a dict"):
        Odd().run_action(Odd.steps[0], _bare_context("x", {}))


def test_happy_path__succeeds_with_outputs_and_a_valid_log(
    step_log: StepLog, script: Script
) -> None:
    saga_id = create(step_log)
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.SUCCEEDED
    assert row.epoch == 1 and row.attempts == 1
    assert row.lease_owner is None and row.finished_at is not None
    steps = {s.step: s for s in step_log.steps(saga_id)}
    assert {n: s.status for n, s in steps.items()} == dict.fromkeys("abcd", "succeeded")
    assert all(s.attempt == 1 and s.finished_at is not None for s in steps.values())
    assert steps["a"].output is not None and steps["a"].output["key"].startswith("token-")
    assert steps["b"].output == {"seen_key": steps["a"].output["key"], "rows": 2}
    assert steps["c"].output == {"snapshot": 7}
    assert steps["d"].output == {"notified": True}
    assert script.journal == [("do", s) for s in "abcd"]
    assert_valid_log(step_log, saga_id)
    kinds = [e.kind for e in step_log.events(saga_id)]
    assert kinds.count("step_succeeded") == 4 and kinds[-1] == "status"


def test_permanent_failure__compensates_failed_step_and_earlier_in_reverse(
    step_log: StepLog, script: Script
) -> None:
    script.failures["b"] = [PermanentError("bad rows in events-0")]
    saga_id = create(step_log)
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.COMPENSATED
    assert row.error is not None and row.error.startswith("b failed: PermanentError")
    assert "bad rows" in row.error
    assert script.journal == [("do", "a"), ("do", "b"), ("undo", "b"), ("undo", "a")]
    assert compensated_statuses(step_log, saga_id) == {
        "a": "compensated", "b": "compensated", "c": "skipped",
    }
    steps = {s.step: s for s in step_log.steps(saga_id)}
    assert steps["b"].attempt == 1 and "PermanentError" in (steps["b"].error or "")
    assert steps["a"].compensation_output == {"undid": steps["a"].output}
    assert_valid_log(step_log, saga_id)


def test_transient_failure__retried_then_succeeds_with_attempts_recorded(
    step_log: StepLog, script: Script
) -> None:
    script.failures["b"] = [TransientError("conflict"), TransientError("conflict")]
    saga_id = create(step_log)
    make_executor(step_log, script).drain()

    assert saga(step_log, saga_id).status == SagaStatus.SUCCEEDED
    steps = {s.step: s for s in step_log.steps(saga_id)}
    assert steps["b"].attempt == 3 and steps["b"].error is None
    assert steps["a"].attempt == 1
    assert script.done() == ["a", "b", "b", "b", "c", "d"]
    assert [e.payload["attempt"] for e in step_log.events(saga_id)
            if e.kind == "step_started" and e.step == "b"] == [1, 2, 3]
    assert_valid_log(step_log, saga_id)


def test_transient_failure__exhausting_retries_defers_the_saga(
    db: Database, step_log: StepLog, script: Script
) -> None:
    # An outage must not turn a good ingestion into a compensated one: the saga is given back
    # and retried later; only the poison limit turns it back.
    script.failures["a"] = [TransientError("down")] * 3
    saga_id = create(step_log)
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.RUNNING
    assert row.lease_owner is None and row.not_before is not None
    assert step_statuses(step_log, saga_id)["a"] == "running"
    assert script.journal == [("do", "a")] * 3

    set_saga(db, saga_id, not_before=utcnow() - timedelta(seconds=1))
    make_executor(step_log, script).drain()
    assert saga(step_log, saga_id).status == SagaStatus.SUCCEEDED


def test_transient_failure__outage_that_never_ends_is_compensated_as_poison(
    db: Database, step_log: StepLog, script: Script
) -> None:
    script.failures["a"] = [TransientError("down")] * 1000
    saga_id = create(step_log)
    for _ in range(CONFIG.max_saga_attempts + 1):
        make_executor(step_log, script).drain()
        set_saga(db, saga_id, not_before=utcnow() - timedelta(seconds=1))

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.COMPENSATED
    assert row.error is not None and "poison" in row.error
    assert ("undo", "a") in script.journal


def test_check_before_run__succeeded_step_is_not_rerun_and_output_reused(
    db: Database, step_log: StepLog, script: Script
) -> None:
    script.failures["b"] = [Crash()]
    saga_id = create(step_log)
    with pytest.raises(Crash):
        make_executor(step_log, script).run_once()
    assert step_statuses(step_log, saga_id) == {
        "a": "succeeded", "b": "running", "c": "pending", "d": "pending",
    }
    first_key = step_log.steps(saga_id)[0].output["key"]  # type: ignore[index]

    assert make_executor(step_log, script, name="worker-2").run_once() is False  # lease held
    expire_lease(db, saga_id)
    make_executor(step_log, script, name="worker-2").drain()

    assert saga(step_log, saga_id).status == SagaStatus.SUCCEEDED
    assert script.done() == ["a", "b", "b", "c", "d"]
    steps = {s.step: s for s in step_log.steps(saga_id)}
    assert steps["a"].output["key"] == first_key  # type: ignore[index]
    assert steps["b"].output == {"seen_key": first_key, "rows": 2}
    assert steps["a"].attempt == 1 and steps["b"].attempt == 2
    assert_valid_log(step_log, saga_id)


def test_crash_recovery__expired_claim_is_reclaimed_and_running_step_rerun(
    db: Database, step_log: StepLog, script: Script
) -> None:
    saga_id = create(step_log)
    dead = step_log.claim_next("dead-worker", lease_ttl_s=30)
    assert dead is not None and dead.saga_id == saga_id and dead.epoch == 1
    step_log.update_step(saga_id, dead.epoch, "a", StepStatus.RUNNING, kind="step_started",
                         values={"attempt": 1, "started_at": utcnow()}, payload={"attempt": 1})
    expire_lease(db, saga_id)

    make_executor(step_log, script, name="rescuer").drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.SUCCEEDED
    assert (row.epoch, row.attempts) == (2, 2)
    assert script.done() == ["a", "b", "c", "d"]
    assert step_log.steps(saga_id)[0].attempt == 2
    claims = [e for e in step_log.events(saga_id) if e.kind == "claimed"]
    assert [(e.epoch, e.payload["owner"]) for e in claims] == [(1, "dead-worker"), (2, "rescuer")]
    assert_valid_log(step_log, saga_id)


def test_crash_recovery__step_failed_before_saga_turned_back_is_compensated_not_rerun(
    db: Database, step_log: StepLog, script: Script
) -> None:
    # The worker recorded "a failed" and died before moving the saga to compensating.
    saga_id = create(step_log)
    dead = step_log.claim_next("dead-worker", lease_ttl_s=30)
    assert dead is not None
    step_log.update_step(saga_id, dead.epoch, "a", StepStatus.RUNNING, kind="step_started",
                         values={"attempt": 1, "started_at": utcnow()}, payload={"attempt": 1})
    step_log.update_step(saga_id, dead.epoch, "a", StepStatus.FAILED, kind="step_failed",
                         values={"error": "PermanentError: bad input"}, payload={})
    expire_lease(db, saga_id)

    make_executor(step_log, script, name="rescuer").drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.COMPENSATED
    assert row.error is not None and "a failed: PermanentError: bad input" in row.error
    assert script.done() == []
    assert ("undo", "a") in script.journal
    assert_valid_log(step_log, saga_id)


def test_crash_recovery__live_lease_is_not_reclaimed(step_log: StepLog, script: Script) -> None:
    saga_id = create(step_log)
    assert step_log.claim_next("holder", lease_ttl_s=30) is not None
    assert step_log.claim_next("other", lease_ttl_s=30) is None
    assert saga(step_log, saga_id).epoch == 1


def test_fencing__writes_with_a_superseded_epoch_raise_lost_ownership(
    db: Database, step_log: StepLog
) -> None:
    saga_id = create(step_log)
    old = step_log.claim_next("old", lease_ttl_s=30)
    assert old is not None
    expire_lease(db, saga_id)
    new = step_log.claim_next("new", lease_ttl_s=30)
    assert new is not None and new.epoch == old.epoch + 1

    with pytest.raises(LostOwnership):
        step_log.update_step(saga_id, old.epoch, "a", StepStatus.RUNNING, kind="step_started",
                             values={"attempt": 1})
    with pytest.raises(LostOwnership):
        step_log.transition_saga(saga_id, old.epoch, SagaStatus.COMPENSATING, error="stale")
    with pytest.raises(LostOwnership):
        step_log.save_checkpoint(saga_id, old.epoch, "a", {"snapshot": 1})
    with pytest.raises(LostOwnership):
        step_log.ensure_owner(saga_id, old.epoch)
    with pytest.raises(LostOwnership):
        step_log.skip_pending_steps(saga_id, old.epoch, ["d"])
    with pytest.raises(LostOwnership):
        step_log.advance(saga_id, old.epoch, "a", values={"output": {}}, payload={},
                         start=StepStart("b", 1))

    # The first claim started a; the second (a takeover) starts nothing itself.
    assert (old.started, new.started) == ("a", None)
    assert step_statuses(step_log, saga_id) == {"a": "running", "b": "pending", "c": "pending",
                                                "d": "pending"}
    assert [row.attempt for row in step_log.steps(saga_id)] == [1, 0, 0, 0]
    assert saga(step_log, saga_id).status == SagaStatus.RUNNING
    step_log.save_checkpoint(saga_id, new.epoch, "a", {"snapshot": 2})
    step_log.transition_saga(saga_id, new.epoch, SagaStatus.COMPENSATING, error="fresh")
    assert step_log.steps(saga_id)[0].checkpoint == {"snapshot": 2}
    assert saga(step_log, saga_id).error == "fresh"
    assert_valid_log(step_log, saga_id)


def test_fencing__stale_worker_does_not_record_its_step(
    db: Database, step_log: StepLog, script: Script
) -> None:
    saga_id = create(step_log)
    stolen: list[int] = []

    def lose_lease(ctx: StepContext) -> None:
        expire_lease(db, ctx.saga_id)
        claim = step_log.claim_next("thief", lease_ttl_s=30)
        assert claim is not None
        stolen.append(claim.epoch)

    script.hooks["b"] = lose_lease
    assert make_executor(step_log, script).run_once() is True

    assert stolen == [2]
    assert step_statuses(step_log, saga_id) == {
        "a": "succeeded", "b": "running", "c": "pending", "d": "pending",
    }
    assert script.done() == ["a", "b"]
    events = step_log.events(saga_id)
    stolen_at = next(e.seq for e in events if e.kind == "claimed" and e.epoch == 2)
    assert all(e.epoch == 2 for e in events if e.seq >= stolen_at)
    assert not [e for e in events if e.kind == "step_succeeded" and e.step == "b"]
    assert saga(step_log, saga_id).lease_owner == "thief"


def test_invalid_transition__is_refused(step_log: StepLog) -> None:
    saga_id = create(step_log)
    claim = step_log.claim_next("w", lease_ttl_s=30)
    assert claim is not None
    with pytest.raises(InvalidTransition):
        step_log.transition_saga(saga_id, claim.epoch, SagaStatus.COMPENSATED)
    with pytest.raises(InvalidTransition):
        step_log.update_step(saga_id, claim.epoch, "a", StepStatus.COMPENSATED,
                             kind="compensation_succeeded", values={})
    assert saga(step_log, saga_id).status == SagaStatus.RUNNING


def test_compensation__failing_twice_then_succeeding_compensates(
    step_log: StepLog, script: Script
) -> None:
    script.failures["b"] = [PermanentError("no")]
    script.undo_failures["a"] = [RuntimeError("s3 flake"), RuntimeError("s3 flake")]
    saga_id = create(step_log)
    make_executor(step_log, script).drain()

    assert saga(step_log, saga_id).status == SagaStatus.COMPENSATED
    steps = {s.step: s for s in step_log.steps(saga_id)}
    assert steps["a"].status == "compensated" and steps["a"].compensation_attempt == 3
    assert steps["a"].compensation_error is None
    assert steps["b"].compensation_attempt == 1
    assert script.done("undo") == ["b", "a", "a", "a"]
    kinds = [e.kind for e in step_log.events(saga_id) if e.step == "a"]
    assert kinds.count("compensation_failed") == 2
    assert_valid_log(step_log, saga_id)


def test_compensation__always_failing_leaves_saga_failed_then_operator_retry_compensates(
    step_log: StepLog, script: Script
) -> None:
    script.failures["b"] = [PermanentError("no")]
    script.undo_failures["b"] = [RuntimeError("stuck")] * 3
    saga_id = create(step_log)
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.FAILED
    assert row.error is not None
    assert row.error.startswith("compensation of b failed: RuntimeError: stuck")
    assert row.error.endswith("not rolled back: a, b")
    assert row.lease_owner is None
    assert step_statuses(step_log, saga_id)["a"] == "succeeded"
    assert script.done("undo") == ["b", "b", "b"]
    assert make_executor(step_log, script).run_once() is False  # failed waits for an operator

    assert SagaStatus.COMPENSATING in ALLOWED_SAGA_TRANSITIONS[SagaStatus.FAILED]
    step_log.transition_saga(saga_id, row.epoch, SagaStatus.COMPENSATING, error="operator retry")
    make_executor(step_log, script).drain()

    assert saga(step_log, saga_id).status == SagaStatus.COMPENSATED
    assert script.done("undo") == ["b", "b", "b", "b", "a"]
    assert "b" not in script.done()[2:]  # the forward path never resumes
    assert_valid_log(step_log, saga_id)


def test_compensation__crash_mid_compensation_resumes_compensation(
    db: Database, step_log: StepLog, script: Script
) -> None:
    script.failures["c"] = [PermanentError("no")]
    script.undo_failures["b"] = [Crash()]
    saga_id = create(step_log)
    with pytest.raises(Crash):
        make_executor(step_log, script).run_once()
    assert saga(step_log, saga_id).status == SagaStatus.COMPENSATING
    assert step_statuses(step_log, saga_id)["c"] == "compensated"

    expire_lease(db, saga_id)
    make_executor(step_log, script, name="worker-2").drain()

    assert saga(step_log, saga_id).status == SagaStatus.COMPENSATED
    assert script.done() == ["a", "b", "c"]
    assert script.done("undo") == ["c", "b", "b", "a"]
    assert compensated_statuses(step_log, saga_id) == dict.fromkeys("abc", "compensated")
    assert_valid_log(step_log, saga_id)


def test_poison__too_many_claims_compensates_instead_of_running(
    db: Database, step_log: StepLog, script: Script
) -> None:
    saga_id = create(step_log)
    set_saga(db, saga_id, attempts=CONFIG.max_saga_attempts)
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.COMPENSATED
    assert row.error is not None and row.error.startswith("poison: claimed 4 times")
    assert script.journal == []
    assert compensated_statuses(step_log, saga_id) == dict.fromkeys("abc", "skipped")
    assert_valid_log(step_log, saga_id)


def test_poison__repeated_crashes_compensate_the_interrupted_step(
    db: Database, step_log: StepLog, script: Script
) -> None:
    script.failures["b"] = [Crash()] * CONFIG.max_saga_attempts
    saga_id = create(step_log)
    for _ in range(CONFIG.max_saga_attempts):
        with pytest.raises(Crash):
            make_executor(step_log, script).run_once()
        expire_lease(db, saga_id)
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.COMPENSATED
    assert row.attempts == CONFIG.max_saga_attempts + 1
    assert row.error is not None and "poison" in row.error
    assert script.done() == ["a"] + ["b"] * CONFIG.max_saga_attempts
    assert script.done("undo") == ["b", "a"]
    assert_valid_log(step_log, saga_id)


def test_poison__after_pivot_keeps_going_forward(
    db: Database, step_log: StepLog, script: Script
) -> None:
    script.failures["d"] = [Crash()]
    saga_id = create(step_log)
    with pytest.raises(Crash):
        make_executor(step_log, script).run_once()
    set_saga(db, saga_id, attempts=CONFIG.max_saga_attempts + 5,
             lease_expires_at=utcnow() - timedelta(minutes=5))
    make_executor(step_log, script).drain()

    assert saga(step_log, saga_id).status == SagaStatus.SUCCEEDED
    assert script.done("undo") == []


def test_fifo__same_partition_waits_for_the_older_saga(step_log: StepLog) -> None:
    first = create(step_log)
    second = create(step_log)
    other = create(step_log, partition=PARTITION + timedelta(days=1))

    claim = step_log.claim_next("w1", lease_ttl_s=30)
    assert claim is not None and claim.saga_id == first
    claim_other = step_log.claim_next("w2", lease_ttl_s=30)
    assert claim_other is not None and claim_other.saga_id == other
    assert step_log.claim_next("w3", lease_ttl_s=30) is None

    step_log.transition_saga(first, claim.epoch, SagaStatus.SUCCEEDED)
    claim_second = step_log.claim_next("w3", lease_ttl_s=30)
    assert claim_second is not None and claim_second.saga_id == second


def test_fifo__failed_saga_blocks_its_partition(step_log: StepLog, script: Script) -> None:
    script.failures["a"] = [PermanentError("no")]
    script.undo_failures["a"] = [RuntimeError("stuck")] * 3
    first = create(step_log)
    second = create(step_log)
    make_executor(step_log, script).drain()

    assert saga(step_log, first).status == SagaStatus.FAILED
    assert saga(step_log, second).status == SagaStatus.PENDING
    assert step_log.claim_next("w", lease_ttl_s=30) is None


def test_after_pivot_failure__is_retried_not_compensated(
    db: Database, step_log: StepLog, script: Script
) -> None:
    script.failures["d"] = [PermanentError("webhook 500")]
    saga_id = create(step_log)
    before = utcnow()
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.RUNNING
    assert row.lease_owner is None and row.lease_expires_at is None
    assert row.not_before is not None
    assert row.not_before >= before + timedelta(seconds=CONFIG.after_pivot_retry_s - 1)
    assert step_statuses(step_log, saga_id) == {
        "a": "succeeded", "b": "succeeded", "c": "succeeded", "d": "failed",
    }
    assert make_executor(step_log, script).run_once() is False

    set_saga(db, saga_id, not_before=utcnow() - timedelta(seconds=1))
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.SUCCEEDED and row.epoch == 2
    assert script.done() == ["a", "b", "c", "d", "d"]
    assert script.done("undo") == []
    steps = {s.step: s for s in step_log.steps(saga_id)}
    assert steps["d"].status == "succeeded" and steps["d"].attempt == 2
    assert_valid_log(step_log, saga_id)


def test_cancel__before_the_run_compensates_without_running_steps(
    step_log: StepLog, script: Script
) -> None:
    saga_id = create(step_log)
    assert step_log.request_cancel(saga_id) is not None
    assert step_log.request_cancel(str(uuid.uuid4())) is None
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.COMPENSATED
    assert row.error is not None and "cancelled" in row.error
    assert script.journal == []
    assert [e.kind for e in step_log.events(saga_id)].count("cancel_requested") == 1
    assert_valid_log(step_log, saga_id)


def test_cancel__mid_run_stops_at_the_next_step_and_compensates(
    step_log: StepLog, script: Script
) -> None:
    saga_id = create(step_log)
    script.hooks["a"] = lambda ctx: step_log.request_cancel(ctx.saga_id)
    make_executor(step_log, script).drain()

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.COMPENSATED
    assert row.error is not None and "cancelled" in row.error
    assert script.journal == [("do", "a"), ("undo", "a")]
    assert_valid_log(step_log, saga_id)


def test_cancel__after_the_pivot_is_ignored(step_log: StepLog, script: Script) -> None:
    saga_id = create(step_log)
    script.hooks["c"] = lambda ctx: step_log.request_cancel(ctx.saga_id)
    make_executor(step_log, script).drain()

    assert saga(step_log, saga_id).status == SagaStatus.SUCCEEDED
    assert script.done("undo") == []


def test_concurrency__every_saga_claimed_exactly_once(step_log: StepLog, script: Script) -> None:
    saga_ids = [create(step_log, partition=PARTITION + timedelta(days=i)) for i in range(20)]
    errors: list[BaseException] = []
    runs: Counter[str] = Counter()

    def work(index: int) -> None:
        executor = make_executor(step_log, script, name=f"worker-{index}")
        try:
            while executor.run_once():
                runs[executor.owner] += 1
        except BaseException as exc:  # surfaced below: a thread must not fail silently
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=45)
    assert not any(t.is_alive() for t in threads), "workers still running"
    assert errors == []
    assert time.monotonic() - started < 45

    assert sum(runs.values()) == 20
    for saga_id in saga_ids:
        assert saga(step_log, saga_id).status == SagaStatus.SUCCEEDED
        claims = [e for e in step_log.events(saga_id) if e.kind == "claimed"]
        assert len(claims) == 1, saga_id
        assert_valid_log(step_log, saga_id)
    assert Counter(script.done()) == dict.fromkeys("abcd", 20)


def run_threads_until_done(step_log: StepLog, script: Script, config: ExecutorConfig,
                           saga_ids: list[str], timeout_s: float = 30) -> None:
    """Run an executor with its own threads (``config.concurrency``) until every saga rests."""
    executor = make_executor(step_log, script, config)
    executor.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
                saga(step_log, saga_id).status not in FINISHED_SAGA_STATUSES
                for saga_id in saga_ids):
            time.sleep(0.02)
    finally:
        assert executor.stop(timeout_s=10)


def test_concurrency__the_steps_of_one_executors_threads_run_side_by_side(
    step_log: StepLog, script: Script
) -> None:
    """On SQLite the threads take turns at the bookkeeping, never at a step's own work: each
    saga's first step waits until the other one runs it too (or fails after 10 s)."""
    saga_ids = [create(step_log, partition=PARTITION + timedelta(days=i)) for i in range(2)]
    both = threading.Barrier(2, timeout=10)
    script.hooks["a"] = lambda ctx: both.wait()
    run_threads_until_done(step_log, script, replace(CONFIG, concurrency=2), saga_ids)

    assert [saga(step_log, saga_id).status for saga_id in saga_ids] == [SagaStatus.SUCCEEDED] * 2
    assert Counter(script.done()) == dict.fromkeys("abcd", 2)


def test_concurrency__a_step_waiting_to_retry_lets_the_other_sagas_go_on(
    step_log: StepLog, script: Script
) -> None:
    """The first try of ``a`` fails transiently and waits 1.5 to 3 s to retry; meanwhile the
    other saga runs from start to end."""
    saga_ids = [create(step_log, partition=PARTITION + timedelta(days=i)) for i in range(2)]
    script.failures["a"] = [TransientError("busy")]
    done: list[tuple[str, str]] = []  # (step, saga) of each try of a or d that succeeded
    for step in "ad":
        script.hooks[step] = lambda ctx: done.append((ctx.step, ctx.saga_id))
    config = replace(CONFIG, concurrency=2,
                     step_retry=RetryPolicy(max_attempts=3, base_delay_s=3, max_delay_s=3))
    run_threads_until_done(step_log, script, config, saga_ids)

    assert [saga(step_log, saga_id).status for saga_id in saga_ids] == [SagaStatus.SUCCEEDED] * 2
    retried = next(i for i in saga_ids if step_log.steps(i)[0].attempt == 2)
    (other,) = set(saga_ids) - {retried}
    assert done == [("a", other), ("d", other), ("a", retried), ("d", retried)]


def test_create_saga__same_idempotency_key_returns_the_existing_saga(step_log: StepLog) -> None:
    def new(saga_id: str) -> NewSaga:
        return NewSaga(
            id=saga_id, definition=Pipeline.name, dataset="clicks", partition_date=PARTITION,
            request={}, manifest={}, request_fingerprint="f" * 64, idempotency_key="k-1",
            steps=Pipeline.step_names(),
        )

    first_id, second_id = str(uuid.uuid4()), str(uuid.uuid4())
    row, created = step_log.create_saga(new(first_id))
    assert created and row.id == first_id and row.status == SagaStatus.PENDING
    again, created_again = step_log.create_saga(new(second_id))
    assert not created_again and again.id == first_id
    assert step_log.get(second_id) is None
    assert [s.step for s in step_log.steps(first_id)] == ["a", "b", "c", "d"]


def test_lease__renewal_needs_the_current_epoch_and_owner(
    db: Database, step_log: StepLog
) -> None:
    saga_id = create(step_log)
    claim = step_log.claim_next("w", lease_ttl_s=30)
    assert claim is not None
    expire_lease(db, saga_id)
    assert step_log.renew_lease(saga_id, claim.epoch, "w", lease_ttl_s=30) is True
    assert step_log.claim_next("thief", lease_ttl_s=30) is None
    assert step_log.renew_lease(saga_id, claim.epoch, "someone-else", lease_ttl_s=30) is False
    assert step_log.renew_lease(saga_id, claim.epoch - 1, "w", lease_ttl_s=30) is False


#: Lease TTL of the heartbeat tests. The heartbeat renews every third of it, so a lease lapses
#: only if the heartbeat stalls for 2 s; a 0.6 s TTL lapsed once on a loaded CI machine.
HEARTBEAT_TTL_S = 2.0


def outlive_the_claimed_lease(step_log: StepLog, saga_id: str) -> bool:
    """Wait (inside a step) until the lease the saga was claimed with has ended by its own
    clock; return whether a renewal has moved its end past now."""
    claimed_until = saga(step_log, saga_id).lease_expires_at
    assert claimed_until is not None
    deadline = time.monotonic() + 20
    while utcnow() <= claimed_until + timedelta(seconds=0.1) and time.monotonic() < deadline:
        time.sleep(0.05)
    renewed_until = saga(step_log, saga_id).lease_expires_at
    return renewed_until is not None and renewed_until > utcnow()


def test_heartbeat__keeps_the_lease_during_a_long_step(step_log: StepLog, script: Script) -> None:
    config = ExecutorConfig(step_retry=CONFIG.step_retry, lease_ttl_s=HEARTBEAT_TTL_S)
    saga_id = create(step_log)
    renewed: list[bool] = []
    thief_claims: list[object] = []

    def slow(ctx: StepContext) -> None:
        renewed.append(outlive_the_claimed_lease(step_log, ctx.saga_id))
        thief_claims.append(step_log.claim_next("thief", lease_ttl_s=30))

    script.hooks["a"] = slow
    make_executor(step_log, script, config).drain()

    assert renewed == [True]
    assert thief_claims == [None]
    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.SUCCEEDED and row.epoch == 1


def test_heartbeat__stops_renewing_a_step_past_its_deadline(
    step_log: StepLog, script: Script
) -> None:
    """A step that cannot make progress (a read that never returns) loses its lease: another
    worker may claim the saga, and the stuck step, once it returns, records nothing."""
    config = ExecutorConfig(step_retry=CONFIG.step_retry, lease_ttl_s=HEARTBEAT_TTL_S,
                            step_timeout_s=0.2)
    saga_id = create(step_log)
    renewed: list[bool] = []
    thief_claims: list[object] = []

    def stuck(ctx: StepContext) -> None:
        renewed.append(outlive_the_claimed_lease(step_log, ctx.saga_id))
        thief_claims.append(step_log.claim_next("thief", lease_ttl_s=30))

    script.hooks["a"] = stuck
    make_executor(step_log, script, config).run_once()

    assert renewed == [False]
    assert thief_claims[0] is not None
    row = saga(step_log, saga_id)
    assert row.lease_owner == "thief" and row.epoch == 2
    assert step_statuses(step_log, saga_id)["a"] == "running"  # the stuck try recorded nothing


def test_stop__says_whether_the_running_step_finished_in_time(
    step_log: StepLog, script: Script
) -> None:
    saga_id = create(step_log)
    started, release = threading.Event(), threading.Event()

    def long_step(ctx: StepContext) -> None:
        started.set()
        release.wait(30)

    script.hooks["a"] = long_step
    executor = make_executor(step_log, script)
    executor.start()
    assert started.wait(30)
    assert executor.stop(timeout_s=0.2) is False  # the step is still running: say so
    release.set()
    assert executor.stop(timeout_s=30) is True
    assert step_statuses(step_log, saga_id)["a"] == "succeeded"


def test_poison__compensation_that_keeps_dying_ends_failed(
    db: Database, step_log: StepLog, script: Script
) -> None:
    script.failures["b"] = [PermanentError("no")]
    script.undo_failures["b"] = [Crash()] * (3 * CONFIG.max_saga_attempts)
    saga_id = create(step_log)
    for _ in range(3 * CONFIG.max_saga_attempts):
        try:
            make_executor(step_log, script).run_once()
        except Crash:
            expire_lease(db, saga_id)
        if saga(step_log, saga_id).status == SagaStatus.FAILED:
            break

    row = saga(step_log, saga_id)
    assert row.status == SagaStatus.FAILED
    assert row.error is not None and row.error.endswith("not rolled back: a, b")
    assert row.lease_owner is None
    assert script.done() == ["a", "b"]
    assert set(script.done("undo")) == {"b"}
    assert_valid_log(step_log, saga_id)


def events_numbered(step_log: StepLog, saga_id: str) -> int:
    """The saga's event count, checking that ``sagas.event_seq`` is the last event's number."""
    seqs = [e.seq for e in step_log.events(saga_id)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert saga(step_log, saga_id).event_seq == len(seqs)
    return len(seqs)


def test_event_numbering__event_seq_follows_every_kind_of_write(
    step_log: StepLog, script: Script
) -> None:
    script.failures["b"] = [PermanentError("no")]
    saga_id = create(step_log)
    assert events_numbered(step_log, saga_id) == 1
    make_executor(step_log, script).drain()

    assert saga(step_log, saga_id).status == SagaStatus.COMPENSATED
    kinds = {e.kind for e in step_log.events(saga_id)}
    assert {"claimed", "status", "step_failed", "steps_skipped",
            "compensation_succeeded"} <= kinds
    numbered = events_numbered(step_log, saga_id)
    step_log.request_cancel(saga_id)
    step_log.request_cancel(saga_id)  # already flagged: no second event
    assert events_numbered(step_log, saga_id) == numbered + 1


def test_event_numbering__a_refused_transition_writes_nothing(step_log: StepLog) -> None:
    saga_id = create(step_log)
    claim = step_log.claim_next("w", lease_ttl_s=30)
    assert claim is not None
    before = events_numbered(step_log, saga_id)
    with pytest.raises(InvalidTransition):  # b has not started
        step_log.update_step(saga_id, claim.epoch, "b", StepStatus.SUCCEEDED,
                             kind="step_succeeded", values={"output": {}})
    with pytest.raises(InvalidTransition):
        step_log.transition_saga(saga_id, claim.epoch, SagaStatus.COMPENSATED)
    with pytest.raises(LostOwnership):
        step_log.update_step(saga_id, claim.epoch + 1, "b", StepStatus.RUNNING,
                             kind="step_started", values={"attempt": 1})
    assert events_numbered(step_log, saga_id) == before
    assert step_statuses(step_log, saga_id)["b"] == "pending"

    step_log.update_step(saga_id, claim.epoch, "b", StepStatus.RUNNING, kind="step_started",
                         values={"attempt": 1})
    assert events_numbered(step_log, saga_id) == before + 1


def test_event_numbering__concurrent_writers_of_one_saga_stay_contiguous(
    step_log: StepLog
) -> None:
    # The runner, the API (cancel) and catalog/outbox writes may touch one saga at once: each
    # numbers its event under the saga's row lock.
    saga_id = create(step_log)
    claim = step_log.claim_next("w", lease_ttl_s=30)
    assert claim is not None
    errors: list[BaseException] = []

    def steps() -> None:
        try:
            for i in range(40):
                step_log.update_step(saga_id, claim.epoch, "a", StepStatus.RUNNING,
                                     kind="step_started", values={"attempt": i + 1})
        except BaseException as exc:
            errors.append(exc)

    def notes() -> None:
        try:
            for i in range(40):
                step_log.record_event(saga_id, claim.epoch, "note", None, {"i": i})
                step_log.renew_lease(saga_id, claim.epoch, "w", lease_ttl_s=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=steps), threading.Thread(target=notes),
               threading.Thread(target=lambda: step_log.request_cancel(saga_id))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=45)
    assert errors == []
    # created, claimed and a's start by the claim; then 40 starts, 40 notes and the cancel
    assert events_numbered(step_log, saga_id) == 3 + 40 + 40 + 1


def started_a(step_log: StepLog) -> tuple[str, int]:
    """A claimed saga whose step ``a`` is running (the first claim started it)."""
    saga_id = create(step_log)
    claim = step_log.claim_next("w", lease_ttl_s=30)
    assert claim is not None and claim.started == "a"
    return saga_id, claim.epoch


def test_claim__a_first_claim_starts_the_first_step_in_its_write(step_log: StepLog) -> None:
    saga_id = create(step_log)
    claim = step_log.claim_next("w", lease_ttl_s=30)

    assert claim is not None and claim.started == "a"
    assert [(r.step, r.status, r.attempt) for r in claim.steps] == [
        ("a", "running", 1), ("b", "pending", 0), ("c", "pending", 0), ("d", "pending", 0)]
    rows = step_log.steps(saga_id)
    assert [(r.step, r.status, r.attempt) for r in rows] == [
        (r.step, r.status, r.attempt) for r in claim.steps]
    assert rows[0].started_at is not None
    events = step_log.events(saga_id)
    assert [(e.kind, e.step, e.epoch) for e in events] == [
        ("created", None, 0), ("claimed", None, 1), ("step_started", "a", 1)]
    assert events[2].payload == {"to": "running", "attempt": 1}
    assert events_numbered(step_log, saga_id) == 3


def test_claim__a_cancelled_saga_is_claimed_without_a_start(step_log: StepLog) -> None:
    saga_id = create(step_log)
    step_log.request_cancel(saga_id)
    claim = step_log.claim_next("w", lease_ttl_s=30)

    assert claim is not None and claim.started is None and claim.cancel_requested
    assert step_statuses(step_log, saga_id) == dict.fromkeys("abcd", "pending")
    assert [e.kind for e in step_log.events(saga_id)] == ["created", "cancel_requested",
                                                          "claimed"]


def test_claim__a_worker_leaves_the_sagas_of_definitions_it_does_not_know(
    step_log: StepLog, script: Script
) -> None:
    """A saga of another release's definition is neither claimed nor counted as an attempt by
    this worker; a later saga of its partition waits behind it; a worker that knows it runs it
    as a first claim."""
    foreign = create(step_log, definition="next_release_pipeline")
    behind = create(step_log)
    elsewhere = create(step_log, partition=PARTITION + timedelta(days=1))
    executor = make_executor(step_log, script)
    executor.drain()

    assert saga(step_log, elsewhere).status == SagaStatus.SUCCEEDED
    for saga_id in (foreign, behind):
        row = saga(step_log, saga_id)
        assert (row.status, row.attempts, row.epoch) == (SagaStatus.PENDING, 0, 0)
    assert not executor.run_once()

    claim = step_log.claim_next("next-release-worker", 30, ("next_release_pipeline",))
    assert claim is not None and claim.saga_id == foreign
    assert (claim.attempts, claim.epoch, claim.started) == (1, 1, "a")
    assert step_log.claim_next("next-release-worker", 30, ("next_release_pipeline",)) is None


def test_advance__records_a_success_and_the_next_start_in_one_write(step_log: StepLog) -> None:
    saga_id, epoch = started_a(step_log)
    numbered = events_numbered(step_log, saga_id)

    started = step_log.advance(saga_id, epoch, "a", values={"output": {"n": 1}},
                               payload={"attempt": 1},
                               start=StepStart("b", 1, unless_cancelled=True))

    assert started is True
    rows = {row.step: row for row in step_log.steps(saga_id)}
    assert (rows["a"].status, rows["a"].output) == ("succeeded", {"n": 1})
    assert (rows["b"].status, rows["b"].attempt) == ("running", 1)
    assert rows["b"].started_at is not None
    events = step_log.events(saga_id)[numbered:]
    assert [(e.seq, e.kind, e.step, e.epoch) for e in events] == [
        (numbered + 1, "step_succeeded", "a", epoch), (numbered + 2, "step_started", "b", epoch)]
    assert events[1].payload == {"to": "running", "attempt": 1}
    assert events_numbered(step_log, saga_id) == numbered + 2


def test_advance__a_cancelled_saga_gets_the_success_only(step_log: StepLog) -> None:
    saga_id, epoch = started_a(step_log)
    step_log.request_cancel(saga_id)
    numbered = events_numbered(step_log, saga_id)

    assert step_log.advance(saga_id, epoch, "a", values={"output": {}}, payload={},
                            start=StepStart("b", 1, unless_cancelled=True)) is False

    assert step_statuses(step_log, saga_id) == {"a": "succeeded", "b": "pending",
                                                "c": "pending", "d": "pending"}
    assert [e.kind for e in step_log.events(saga_id)[numbered:]] == ["step_succeeded"]
    assert events_numbered(step_log, saga_id) == numbered + 1


def test_advance__refused_or_superseded_writes_nothing(step_log: StepLog) -> None:
    saga_id, epoch = started_a(step_log)
    set_step = "UPDATE saga_steps SET status = 'skipped' WHERE saga_id = :s AND step = 'b'"
    with step_log.db.transaction() as s:  # b can no longer start
        s.execute(text(set_step), {"s": saga_id})
    numbered = events_numbered(step_log, saga_id)

    with pytest.raises(InvalidTransition):
        step_log.advance(saga_id, epoch, "a", values={"output": {}}, payload={},
                         start=StepStart("b", 1))
    with pytest.raises(InvalidTransition):  # a is not running: no success, no saga success
        step_log.advance(saga_id, epoch, "c", values={"output": {}}, payload={}, start=None)
    with pytest.raises(LostOwnership):
        step_log.advance(saga_id, epoch + 1, "a", values={"output": {}}, payload={},
                         start=None)

    assert step_statuses(step_log, saga_id)["a"] == "running"
    assert saga(step_log, saga_id).status == "running"
    assert events_numbered(step_log, saga_id) == numbered


def test_advance__the_last_success_finishes_the_saga_with_it(step_log: StepLog) -> None:
    saga_id, epoch = started_a(step_log)
    numbered = events_numbered(step_log, saga_id)
    set_saga(step_log.db, saga_id, status=SagaStatus.COMPENSATING.value)
    with pytest.raises(InvalidTransition):  # only a running saga succeeds
        step_log.advance(saga_id, epoch, "a", values={"output": {}}, payload={}, start=None)
    assert step_statuses(step_log, saga_id)["a"] == "running"
    set_saga(step_log.db, saga_id, status=SagaStatus.RUNNING.value)

    assert step_log.advance(saga_id, epoch, "a", values={"output": {}}, payload={"attempt": 1},
                            start=None) is False

    row = saga(step_log, saga_id)
    assert row.status == "succeeded" and row.finished_at is not None
    assert row.lease_owner is None and row.lease_expires_at is None
    events = step_log.events(saga_id)[numbered:]
    assert [(e.kind, e.step) for e in events] == [("step_succeeded", "a"), ("status", None)]
    assert events[1].payload == {"from": "running", "to": "succeeded"}
    assert events_numbered(step_log, saga_id) == numbered + 2


def test_advance__a_forward_run_takes_one_write_per_step_and_one_more(
    step_log: StepLog, script: Script
) -> None:
    """The claim with a's start, then each success with what follows it: 5 writes for 4
    steps."""
    saga_id = create(step_log)
    writes: list[str] = []
    step_log.on_change = lambda changed: writes.append(changed)
    assert make_executor(step_log, script).run_once()
    assert saga(step_log, saga_id).status == "succeeded"
    assert len(writes) == 5
    kinds = [e.kind for e in step_log.events(saga_id)]
    assert kinds == ["created", "claimed"] + ["step_started", "step_succeeded"] * 4 + ["status"]
    assert [row.attempt for row in step_log.steps(saga_id)] == [1, 1, 1, 1]


def test_cancel__requested_after_a_step_is_seen_as_the_next_one_starts(
    step_log: StepLog
) -> None:
    saga_id = create(step_log)
    claim = step_log.claim_next("w", lease_ttl_s=30)
    assert claim is not None and claim.cancel_requested is False
    state = step_log.update_step(saga_id, claim.epoch, "a", StepStatus.RUNNING,
                                 kind="step_started", values={"attempt": 1},
                                 unless_cancelled=True)
    assert state.status == SagaStatus.RUNNING and state.cancel_requested is False
    step_log.request_cancel(saga_id)
    numbered = events_numbered(step_log, saga_id)

    with pytest.raises(CancelRequested):
        step_log.update_step(saga_id, claim.epoch, "b", StepStatus.RUNNING,
                             kind="step_started", values={"attempt": 1}, unless_cancelled=True)

    assert step_statuses(step_log, saga_id)["b"] == "pending"
    assert events_numbered(step_log, saga_id) == numbered
    # Past the pivot a cancellation is ignored: the caller does not ask.
    state = step_log.update_step(saga_id, claim.epoch, "b", StepStatus.RUNNING,
                                 kind="step_started", values={"attempt": 1})
    assert state.cancel_requested is True


def test_new_saga__without_steps_is_refused() -> None:
    class Empty(Saga):
        pass

    with pytest.raises(ValueError, match="'Empty' has no steps"):
        NewSaga(id=str(uuid.uuid4()), definition=Empty.name, dataset="clicks",
                partition_date=PARTITION, request={}, manifest={"files": []},
                request_fingerprint="f" * 64, idempotency_key=None, steps=Empty.step_names())


def test_claim__carries_the_saga_and_its_steps(step_log: StepLog) -> None:
    saga_id = create(step_log, request={"source": "s3://raw", "n": 3})
    step_log.request_cancel(saga_id)

    claim = step_log.claim_next("w", lease_ttl_s=30)

    assert claim is not None
    assert (claim.saga_id, claim.epoch, claim.status, claim.attempts) == (
        saga_id, 1, SagaStatus.RUNNING, 1)
    assert claim.definition == Pipeline.name
    assert (claim.dataset, claim.partition_date) == ("clicks", PARTITION)
    assert claim.request == {"source": "s3://raw", "n": 3}
    assert claim.manifest["files"][0]["sha256"] == "0" * 64
    assert claim.cancel_requested is True
    assert [(s.step, s.status, s.attempt, s.output) for s in claim.steps] == [
        (name, StepStatus.PENDING, 0, None) for name in "abcd"]
    claimed = [e for e in step_log.events(saga_id) if e.kind == "claimed"]
    assert [(e.epoch, e.payload) for e in claimed] == [
        (1, {"owner": "w", "attempts": 1, "from": "pending", "to": "running"})]


def test_claim__takes_the_oldest_of_pending_and_abandoned_sagas(
    db: Database, step_log: StepLog
) -> None:
    first = create(step_log)
    second = create(step_log, partition=PARTITION + timedelta(days=1))
    third = create(step_log, partition=PARTITION + timedelta(days=2))
    claims = [step_log.claim_next("w", lease_ttl_s=30) for _ in range(2)]
    assert [c.saga_id for c in claims if c] == [first, second]
    expire_lease(db, first)

    again = step_log.claim_next("rescuer", lease_ttl_s=30)
    assert again is not None and (again.saga_id, again.epoch) == (first, 2)
    assert again.status == SagaStatus.RUNNING
    recovered = [e for e in step_log.events(first) if e.kind == "claimed"][-1]
    assert recovered.payload == {"owner": "rescuer", "attempts": 2}
    last = step_log.claim_next("w", lease_ttl_s=30)
    assert last is not None and last.saga_id == third
    assert step_log.claim_next("w", lease_ttl_s=30) is None


def test_lease__one_heartbeat_thread_renews_every_saga_of_an_executor(
    step_log: StepLog, script: Script
) -> None:
    config = ExecutorConfig(step_retry=CONFIG.step_retry, lease_ttl_s=HEARTBEAT_TTL_S)
    saga_ids = [create(step_log, partition=PARTITION + timedelta(days=i)) for i in range(3)]
    executor = make_executor(step_log, script, config, name=f"worker-{uuid.uuid4().hex[:6]}")
    heartbeats: list[int] = []
    thief_claims: list[object] = []
    renewed: list[bool] = []

    def slow(ctx: StepContext) -> None:
        renewed.append(outlive_the_claimed_lease(step_log, ctx.saga_id))
        heartbeats.append(sum(t.name == f"heartbeat {executor.owner}" and t.is_alive()
                              for t in threading.enumerate()))
        thief_claims.append(step_log.claim_next("thief", lease_ttl_s=30))

    script.hooks["a"] = slow
    threads = [threading.Thread(target=executor.run_once) for _ in saga_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    executor.stop()

    assert renewed == [True, True, True]
    assert thief_claims == [None, None, None]
    assert heartbeats == [1, 1, 1]
    for saga_id in saga_ids:
        row = saga(step_log, saga_id)
        assert row.status == SagaStatus.SUCCEEDED and row.epoch == 1


def test_lease__a_lease_taken_over_stops_the_step_before_it_records(
    db: Database, step_log: StepLog, script: Script
) -> None:
    config = ExecutorConfig(step_retry=CONFIG.step_retry, lease_ttl_s=0.6)
    saga_id = create(step_log)

    def taken_over(ctx: StepContext) -> None:
        expire_lease(db, ctx.saga_id)
        assert step_log.claim_next("thief", lease_ttl_s=30) is not None
        time.sleep(0.8)  # the heartbeat finds the lease gone

    script.hooks["a"] = taken_over
    assert make_executor(step_log, script, config).run_once() is True

    assert step_statuses(step_log, saga_id)["a"] == "running"
    assert not [e for e in step_log.events(saga_id) if e.kind == "step_succeeded"]
    assert saga(step_log, saga_id).lease_owner == "thief"


def test_connections__one_the_server_closed_is_replaced(
    db: Database, step_log: StepLog
) -> None:
    if not db.is_postgres:
        pytest.skip("SQLite connections are files")
    import psycopg

    saga_id = create(step_log)

    def end_every_session() -> None:
        with psycopg.connect(db.engine.url.set(drivername="postgresql").render_as_string(
                hide_password=False), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        time.sleep(0.2)

    with db.pinned():
        claim = step_log.claim_next("w", lease_ttl_s=30)
        assert claim is not None
        end_every_session()  # the pinned connection and the pooled ones
        step_log.update_step(saga_id, claim.epoch, "a", StepStatus.RUNNING,
                             kind="step_started", values={"attempt": 1})
    end_every_session()
    step_log.renew_lease(saga_id, claim.epoch, "w", lease_ttl_s=30)
    assert saga(step_log, saga_id).lease_owner == "w"
    assert step_statuses(step_log, saga_id)["a"] == "running"


def test_migration__event_seq_is_backfilled_from_the_events(tmp_path: Path) -> None:
    from sqlalchemy import insert

    from app.db.migrate import upgrade
    from app.db.models import SagaEventRow
    from app.saga.statements import STEPS

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0002")
    old = Database(url)
    try:
        now = utcnow()
        with old.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO sagas (id, definition, dataset, partition_date, status, request, "
                "manifest, owner, request_fingerprint, epoch, attempts, cancel_requested, "
                "created_at, updated_at) VALUES ('s1', :d, 'clicks', '2026-01-06', 'pending', "
                "'{}', '{}', '', '', 0, 0, 0, :now, :now)"), {"d": Pipeline.name, "now": now})
            conn.execute(insert(STEPS), [{"saga_id": "s1", "step": name, "position": i,
                                          "status": "pending", "attempt": 0,
                                          "compensation_attempt": 0}
                                         for i, name in enumerate("abcd")])
            conn.execute(insert(SagaEventRow.__table__), [
                {"saga_id": "s1", "seq": seq, "kind": "note", "step": None, "epoch": 0,
                 "payload": {}, "created_at": now} for seq in (1, 2, 3)])
    finally:
        old.dispose()
    upgrade(url)
    db = Database(url)
    try:
        step_log = StepLog(db)
        assert saga(step_log, "s1").event_seq == 3
        assert step_log.claim_next("w", lease_ttl_s=30) is not None  # claimed, a started
        assert [e.seq for e in step_log.events("s1")] == [1, 2, 3, 4, 5]
    finally:
        db.dispose()


def test_writing__driver_and_sqlalchemy_statements_share_one_transaction(
    db: Database, step_log: StepLog
) -> None:
    """``Database.writing`` (on SQLite begun and ended on the driver): a statement on the driver
    and one through SQLAlchemy in the same block commit together, and roll back together."""
    from app.db.session import run_on_driver
    from app.saga.statements import SAGAS

    first, second = create(step_log), create(step_log)
    on_driver = update(SAGAS).where(SAGAS.c.id == first).values(error="driver")
    through_sqlalchemy = update(SAGAS).where(SAGAS.c.id == second).values(error="sqlalchemy")

    with pytest.raises(RuntimeError, match="stop"), db.writing() as conn:
        run_on_driver(conn, on_driver, {})
        conn.execute(through_sqlalchemy)
        raise RuntimeError("stop")
    assert (saga(step_log, first).error, saga(step_log, second).error) == (None, None)

    with db.writing() as conn:
        conn.execute(through_sqlalchemy)
        run_on_driver(conn, on_driver, {})
    assert saga(step_log, first).error == "driver"
    assert saga(step_log, second).error == "sqlalchemy"

    with db.writing() as conn:  # the connection is usable again, on the driver alone
        run_on_driver(conn, update(SAGAS).where(SAGAS.c.id == first).values(error="again"), {})
    assert saga(step_log, first).error == "again"


@pytest.mark.parametrize("outer", ["driver", "sqlalchemy"])
def test_writing__a_nested_sqlite_write_is_refused_and_leaves_the_outer_one_intact(
    tmp_path: Path, outer: str
) -> None:
    """(On PostgreSQL each write has its own pooled connection: nothing to refuse.)"""
    db = Database(f"sqlite:///{tmp_path / 'nested.db'}")
    try:
        with db.writing() as conn:
            conn.exec_driver_sql("CREATE TABLE t (v TEXT)")
        with db.writing() as conn:
            insert = "INSERT INTO t VALUES ('outer')"
            if outer == "driver":
                conn.connection.dbapi_connection.execute(insert)  # type: ignore[union-attr]
            else:
                conn.exec_driver_sql(insert)
            with pytest.raises(RuntimeError, match="already open"), db.writing():
                pass
        with db.reading() as conn:
            assert conn.exec_driver_sql("SELECT v FROM t").scalars().all() == ["outer"]
    finally:
        db.dispose()


def test_driver_statements__write_sqlite_timestamps_as_sqlalchemy_does() -> None:
    """The saga log's own DATETIME processor on SQLite writes SQLAlchemy's text exactly."""
    from datetime import UTC, datetime

    from sqlalchemy.dialects import sqlite

    from app.db.session import _bind_processor

    dialect = sqlite.dialect()
    ours = _bind_processor(sqlite.DATETIME(), dialect)
    theirs = sqlite.DATETIME().bind_processor(dialect)
    assert ours is not None and theirs is not None and ours is not theirs
    for value in (datetime(2026, 11, 27, 15, 30, 1, 250), datetime(2026, 1, 1),
                  datetime(987, 6, 5, 4, 3, 2, 999999), datetime.now(UTC), date(2026, 2, 3), None):
        assert ours(value) == theirs(value), value


def test_reads__do_not_wait_for_a_sqlite_writer(db: Database, step_log: StepLog) -> None:
    if db.is_postgres:
        pytest.skip("PostgreSQL readers never wait for writers")
    import sqlite3

    saga_id = create(step_log)
    assert db.engine.url.database is not None
    writer = sqlite3.connect(db.engine.url.database, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        assert saga(step_log, saga_id).status == SagaStatus.PENDING
        assert [s.step for s in step_log.steps(saga_id)] == ["a", "b", "c", "d"]
        assert [e.seq for e in step_log.events(saga_id)] == [1]
        assert [r.step for r in step_log.step_records(saga_id)] == ["a", "b", "c", "d"]
        step_log.ensure_owner(saga_id, 0)
        assert time.monotonic() - started < 5
    finally:
        writer.execute("ROLLBACK")
        writer.close()


@pytest.mark.parametrize("unpinned", ["writing", "transaction"])
def test_writers__pinned_ones_and_one_waiting_for_the_pool_do_not_stall(
    tmp_path: Path, unpinned: str
) -> None:
    """SQLite: a writer without a pinned connection checks one out before it takes the
    process's writer lock, as pinned writers (which hold theirs) do. With the opposite order, a
    writer holding the lock waited for the pool while every pooled connection was pinned by a
    thread waiting for the lock: a stall until the pool's 30 s timeout."""
    db = Database(f"sqlite:///{tmp_path / 'pool.db'}")
    try:
        with db.writing() as conn:
            conn.execute(text("CREATE TABLE t (who TEXT)"))
        size = db.engine.pool.size() + db.engine.pool._max_overflow  # type: ignore[attr-defined]
        holding, go = threading.Barrier(size + 1), threading.Event()
        errors: list[BaseException] = []

        def pinned_writer(n: int) -> None:
            try:
                with db.pinned():
                    for _ in range(2):  # the first write pins a connection
                        with db.writing() as conn:
                            conn.execute(text("INSERT INTO t VALUES (:w)"), {"w": f"p{n}"})
                        if not go.is_set():
                            holding.wait(10)
                            go.wait(10)
            except BaseException as exc:
                errors.append(exc)

        def unpinned_writer() -> None:
            try:
                if unpinned == "writing":
                    with db.writing() as conn:
                        conn.execute(text("INSERT INTO t VALUES ('u')"))
                else:
                    with db.transaction() as session:
                        session.execute(text("INSERT INTO t VALUES ('u')"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=pinned_writer, args=(n,)) for n in range(size)]
        for thread in threads:
            thread.start()
        holding.wait(10)  # every pooled connection is pinned
        late = threading.Thread(target=unpinned_writer)
        late.start()
        time.sleep(0.5)  # it waits for the pool (before the fix: holding the writer lock)
        go.set()
        for thread in [*threads, late]:
            thread.join(timeout=10)
        assert not any(t.is_alive() for t in [*threads, late]), "writers stalled"
        assert errors == []
        with db.reading() as conn:
            assert conn.scalar(text("SELECT count(*) FROM t")) == 2 * size + 1
    finally:
        db.dispose()
