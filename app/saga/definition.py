"""Declarative saga definitions: ``@action`` / ``@compensate`` methods on a ``Saga`` subclass.

Steps are keyed by action name, so a subclass overrides one step by declaring an action with the
same name; the order is the declaration order made consistent with ``depends_on``. Everything
after the pivot step is retried until it succeeds and never compensated.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, ClassVar

from app.saga.errors import TransientError

_ACTION_ATTR = "__saga_action__"
_COMPENSATE_ATTR = "__saga_compensates__"


@dataclass(frozen=True)
class _ActionMark:
    name: str
    depends_on: tuple[str, ...]


def action(name: str, depends_on: list[str] | tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """Mark a method as the forward action of step ``name``."""

    def mark(fn: Any) -> Any:
        setattr(fn, _ACTION_ATTR, _ActionMark(name, tuple(depends_on)))
        return fn

    return mark


def compensate(name: str) -> Callable[[Any], Any]:
    """Mark a method as the compensation of step ``name``."""

    def mark(fn: Any) -> Any:
        setattr(fn, _COMPENSATE_ATTR, name)
        return fn

    return mark


@dataclass(frozen=True)
class StepSpec:
    name: str
    depends_on: tuple[str, ...]
    method: str
    compensation: str | None


@dataclass
class StepContext:
    """What a step sees: the request, the frozen manifest, earlier outputs, and its own log row.

    ``ctx["key"]`` looks the key up in earlier steps' outputs (latest step first), then in the
    request, as in the seed's ``ctx["bronze_path"]``.
    """

    saga_id: str
    definition: str
    dataset: str
    partition_date: date
    epoch: int
    step: str
    attempt: int
    request: Mapping[str, Any]
    manifest: Mapping[str, Any]
    outputs: dict[str, dict[str, Any]]
    checkpoint: dict[str, Any] | None = None
    #: During compensation: the output the forward step recorded (None if it never finished).
    output: dict[str, Any] | None = None
    _save_checkpoint: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)
    _ensure_owner: Callable[[], None] | None = field(default=None, repr=False)

    def __getitem__(self, key: str) -> Any:
        for output in reversed(list(self.outputs.values())):
            if key in output:
                return output[key]
        return self.request[key]

    def save_checkpoint(self, data: dict[str, Any]) -> None:
        """Persist an intent record (e.g. the snapshot a write starts from) before writing."""
        if self._save_checkpoint is not None:
            self._save_checkpoint(data)
        self.checkpoint = data

    def ensure_owner(self) -> None:
        """Raise LostOwnership if another worker has claimed the saga since this step began."""
        if self._ensure_owner is not None:
            self._ensure_owner()


class Saga:
    """Base class of saga definitions. Subclasses declare steps with ``@action``/``@compensate``."""

    #: Definition name stored in the saga log; defaults to the class name.
    name: ClassVar[str] = ""
    #: The step whose success is the point of no return (None: every step is compensable).
    pivot: ClassVar[str | None] = None
    steps: ClassVar[tuple[StepSpec, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__
        cls.steps = _collect_steps(cls)
        if cls.pivot is not None and cls.pivot not in {s.name for s in cls.steps}:
            raise TypeError(f"{cls.__name__}: pivot {cls.pivot!r} is not a step")

    @classmethod
    def step_names(cls) -> list[str]:
        return [s.name for s in cls.steps]

    @classmethod
    def pivot_index(cls) -> int:
        """Index of the pivot step; steps with a greater index are never compensated."""
        names = cls.step_names()
        return names.index(cls.pivot) if cls.pivot else len(names) - 1

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failure is worth retrying. Definitions extend this for their resources."""
        if isinstance(exc, TransientError):
            return True
        from sqlalchemy.exc import OperationalError

        return isinstance(exc, OperationalError)

    def run_action(self, spec: StepSpec, ctx: StepContext) -> dict[str, Any]:
        return _call(getattr(self, spec.method), ctx)

    def run_compensation(self, spec: StepSpec, ctx: StepContext) -> dict[str, Any]:
        assert spec.compensation is not None
        return _call(getattr(self, spec.compensation), ctx)


def _call(method: Callable[[StepContext], Any], ctx: StepContext) -> dict[str, Any]:
    result = method(ctx)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise TypeError(f"step {ctx.step} returned {type(result).__name__}, expected a dict")
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _collect_steps(cls: type) -> tuple[StepSpec, ...]:
    actions: dict[str, tuple[_ActionMark, str]] = {}
    compensations: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            mark = getattr(value, _ACTION_ATTR, None)
            if isinstance(mark, _ActionMark):
                # Re-declaring a step keeps its place in the order but takes the new method.
                actions[mark.name] = (mark, attr)
            compensates = getattr(value, _COMPENSATE_ATTR, None)
            if isinstance(compensates, str):
                compensations[compensates] = attr
    unknown = set(compensations) - set(actions)
    if unknown:
        raise TypeError(f"{cls.__name__}: compensation for unknown step(s) {sorted(unknown)}")
    specs = [
        StepSpec(name, mark.depends_on, attr, compensations.get(name))
        for name, (mark, attr) in actions.items()
    ]
    return tuple(_order_by_dependencies(cls.__name__, specs))


def _order_by_dependencies(owner: str, specs: list[StepSpec]) -> list[StepSpec]:
    """Declaration order, except that a step always comes after the steps it depends on."""
    by_name = {s.name: s for s in specs}
    for spec in specs:
        missing = [d for d in spec.depends_on if d not in by_name]
        if missing:
            raise TypeError(f"{owner}: step {spec.name!r} depends on unknown {missing}")
    ordered: list[StepSpec] = []
    placed: set[str] = set()
    visiting: set[str] = set()

    def place(spec: StepSpec) -> None:
        if spec.name in placed:
            return
        if spec.name in visiting:
            raise TypeError(f"{owner}: dependency cycle through {spec.name!r}")
        visiting.add(spec.name)
        for dep in spec.depends_on:
            place(by_name[dep])
        visiting.discard(spec.name)
        placed.add(spec.name)
        ordered.append(spec)

    for spec in specs:
        place(spec)
    return ordered
