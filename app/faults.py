"""Named fault points for demos and crash tests, driven by ``LAKESAGA_FAULTS``.

``LAKESAGA_FAULTS="aggregate_to_gold=raise,process_to_silver.after_commit=kill@2"``: at the named
point, ``raise`` fails with :class:`FaultInjected`, ``kill`` SIGKILLs this process (no cleanup,
like a power cut), ``stop`` SIGSTOPs it (a paused "zombie" until someone sends SIGCONT),
``sleep:MS`` pauses. ``@N`` fires on the N-th hit only, ``@N-M`` on hits N to M (so
``delete_silver_partition=raise@1-2`` fails twice, then lets it succeed). Unset: a no-op.
``LAKESAGA_FAULT_TRACE=<file>`` appends every point reached to that file (to prove coverage).
The points are listed in docs/RELIABILITY.md and ``app.lakehouse.ingestion.fault_points``.
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
    first_hit: int | None = None
    last_hit: int | None = None


def parse_faults(spec: str) -> dict[str, Fault]:
    """Parse ``point=action[:arg][@n]`` items separated by commas; raise ValueError if malformed."""
    faults: dict[str, Fault] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, sep, rule = item.partition("=")
        if not sep or not point:
            raise ValueError(f"fault {item!r}: expected point=action")
        rule, _, hit = rule.partition("@")
        action, _, arg = rule.partition(":")
        if action not in {"raise", "kill", "stop", "sleep"}:
            raise ValueError(f"fault {item!r}: action must be raise, kill, stop or sleep:MS")
        first, _, last = hit.partition("-")
        faults[point.strip()] = Fault(
            action=action,
            argument=float(arg) if arg else 0.0,
            first_hit=int(first) if first else None,
            last_hit=int(last or first) if first else None,
        )
    return faults


class FaultPlan:
    def __init__(self, spec: str = "", trace: str | None = None) -> None:
        self.faults = parse_faults(spec)
        self.trace = trace
        self._hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    def hit(self, point: str) -> None:
        if self.trace:
            with self._lock, open(self.trace, "a", encoding="utf-8") as fh:
                fh.write(point + "\n")
        fault = self.faults.get(point)
        if fault is None:
            return
        with self._lock:
            self._hits[point] += 1
            count = self._hits[point]
        if fault.first_hit is not None and not fault.first_hit <= count <= (fault.last_hit or 0):
            return
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "stop":
            # Aimed at this thread so that the process stops here, not a moment later.
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        elif fault.action == "sleep":
            time.sleep(fault.argument / 1000)
        else:
            raise FaultInjected(f"fault injected at {point}")


_plan: FaultPlan | None = None


def configure_faults(spec: str, trace: str | None = None) -> None:
    global _plan
    _plan = FaultPlan(spec, trace) if spec or trace else None


def fault_point(point: str) -> None:
    """Fire the fault configured for ``point``, if any."""
    if _plan is not None:
        _plan.hit(point)
