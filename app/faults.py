"""Named fault points for demos and crash tests, driven by ``LAKESAGA_FAULTS``.

``LAKESAGA_FAULTS="aggregate_to_gold=raise,process_to_silver.after_write=kill@2"``: at the named
point, ``raise`` fails with :class:`FaultInjected`, ``kill`` SIGKILLs this process (no cleanup,
like a power cut), ``sleep:MS`` pauses. ``@N`` fires on the N-th hit only. Unset: a no-op.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass


class FaultInjected(Exception):
    """Raised at a fault point configured with ``raise``: a permanent, non-retryable failure."""


@dataclass(frozen=True)
class Fault:
    action: str
    argument: float = 0.0
    on_hit: int | None = None


def parse_faults(spec: str) -> dict[str, Fault]:
    """Parse ``point=action[:arg][@n]`` items separated by commas; raise ValueError if malformed."""
    faults: dict[str, Fault] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, sep, rule = item.partition("=")
        if not sep or not point:
            raise ValueError(f"fault {item!r}: expected point=action")
        rule, _, hit = rule.partition("@")
        action, _, arg = rule.partition(":")
        if action not in {"raise", "kill", "sleep"}:
            raise ValueError(f"fault {item!r}: action must be raise, kill or sleep:MS")
        faults[point.strip()] = Fault(
            action=action,
            argument=float(arg) if arg else 0.0,
            on_hit=int(hit) if hit else None,
        )
    return faults


class FaultPlan:
    def __init__(self, spec: str = "") -> None:
        self.faults = parse_faults(spec)
        self._hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    def hit(self, point: str) -> None:
        fault = self.faults.get(point)
        if fault is None:
            return
        with self._lock:
            self._hits[point] += 1
            count = self._hits[point]
        if fault.on_hit is not None and count != fault.on_hit:
            return
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "sleep":
            time.sleep(fault.argument / 1000)
        else:
            raise FaultInjected(f"fault injected at {point}")


_plan: FaultPlan | None = None


def configure_faults(spec: str) -> None:
    global _plan
    _plan = FaultPlan(spec)


def fault_point(point: str) -> None:
    """Fire the fault configured for ``point``, if any."""
    if _plan is not None:
        _plan.hit(point)
