"""The crash matrix: a real ``lakesaga worker`` is SIGKILLed at EVERY named fault point of
``fault_points()`` (forward, compensation and delivery groups), a clean worker recovers, and the
invariant checker must find nothing wrong (docs/RELIABILITY.md).

PostgreSQL: the selected points are spread over ``LAKESAGA_MATRIX_LANES`` (default 2) independent
deployments (database + lake each) that run side by side; each case ingests its own
partition_date, and a case is blamed only for violations that are new since the previous case of
its deployment. Each point is still its own test item with its own verdict and log tail.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import pytest
from cluster import TURN_BACK, CaseFailure, CaseResult, Cluster, crash_case

from app.lakehouse.ingestion import fault_points

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

POINTS = fault_points()
FIRST_DAY = date(2027, 1, 1)
#: Reached when a worker creates the lake tables at start-up (``ensure_tables``), before any
#: saga: not part of the saga's registry, so the coverage test allows them.
STARTUP_POINTS = {"create.before_commit", "create.after_commit"}
PG_TEST = "test_crash_matrix__killed_at_point_recovers_with_invariants_intact"

CASES = [pytest.param(group, point, id=point, marks=pytest.mark.postgres)
         for group in ("forward", "compensation", "delivery") for point in POINTS[group]]


class Lane:
    """One deployment running cases one after another."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.day = FIRST_DAY
        self.known: set[str] = set()

    def run(self, group: str, point: str) -> CaseResult | CaseFailure:
        self.day += timedelta(days=1)
        try:
            return crash_case(self.cluster, group, point, self.day, known=self.known)
        except CaseFailure as exc:
            return exc


def verdict(point: str, outcome: CaseResult | CaseFailure | None) -> None:
    if outcome is None:
        pytest.fail(f"{point}: the matrix did not run this point")
    if isinstance(outcome, CaseFailure):
        pytest.fail(str(outcome))
    assert not outcome.new_violations, (
        f"invariant violations after a kill at {point}:\n  "
        + "\n  ".join(outcome.new_violations) + f"\n{outcome.detail}")
    assert not outcome.problems, f"{point}: {outcome.problems}\n{outcome.detail}"


@pytest.fixture(scope="module")
def pg_matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              pg_database_factory: Callable[[], str],
              ) -> Iterator[dict[str, CaseResult | CaseFailure]]:
    """Run every selected point of the PostgreSQL matrix (in parallel lanes) once."""
    selected = [(item.callspec.params["group"], item.callspec.params["point"])
                for item in request.session.items
                if getattr(item, "originalname", None) == PG_TEST
                and item.module is request.module]
    lanes_n = max(1, min(int(os.environ.get("LAKESAGA_MATRIX_LANES", "2")), len(selected)))
    lanes = [Lane(Cluster(tmp_path_factory.mktemp(f"matrix-pg-lane{i}"), pg_database_factory()))
             for i in range(lanes_n)]
    results: dict[str, CaseResult | CaseFailure] = {}
    lock = threading.Lock()

    def run_lane(lane: Lane, cases: list[tuple[str, str]]) -> None:
        for group, point in cases:
            outcome = lane.run(group, point)
            with lock:
                results[point] = outcome

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(lanes_n) as pool:
            for future in [pool.submit(run_lane, lane, selected[i::lanes_n])
                           for i, lane in enumerate(lanes)]:
                future.result()
        elapsed = time.monotonic() - started
        timed = sorted(((p, r.seconds) for p, r in results.items() if isinstance(r, CaseResult)),
                       key=lambda t: -t[1])
        print(f"\n[crash matrix, PostgreSQL] {len(results)} points in {elapsed:.1f} s on "
              f"{lanes_n} lane(s); slowest: "
              + ", ".join(f"{p} {s:.1f} s" for p, s in timed[:3]))
        yield results
    finally:
        for lane in lanes:
            lane.cluster.close()


@pytest.mark.parametrize(("group", "point"), CASES)
def test_crash_matrix__killed_at_point_recovers_with_invariants_intact(
    group: str, point: str, pg_matrix: dict[str, CaseResult | CaseFailure],
) -> None:
    verdict(point, pg_matrix.get(point))


SQLITE_POINTS = [
    ("forward", "process_to_silver.after_commit"),
    ("forward", "update_catalog.before_commit"),
    ("compensation", "delete_silver_partition.before_commit"),
    ("compensation", "saga.compensating"),
    ("delivery", "webhook.after_send"),
]


@pytest.fixture(scope="module")
def sqlite_lane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lane]:
    home = tmp_path_factory.mktemp("matrix-sqlite")
    lane = Lane(Cluster(home, f"sqlite:///{home / 'lakesaga.db'}"))
    try:
        yield lane
    finally:
        lane.cluster.close()


@pytest.mark.parametrize(("group", "point"),
                         [pytest.param(g, p, id=f"sqlite-{p}") for g, p in SQLITE_POINTS])
def test_crash_matrix__sqlite_representative_points(
    group: str, point: str, sqlite_lane: Lane,
) -> None:
    verdict(point, sqlite_lane.run(group, point))


@pytest.mark.postgres
def test_crash_matrix__every_registered_point_is_reached(
    tmp_path: Path, pg_database_factory: Callable[[], str],
) -> None:
    """A successful and a compensated saga (with a webhook consumer) pass every point of
    ``fault_points()``: the registry matches the code, so the matrix above covers all of it."""
    trace = tmp_path / "trace.txt"
    with Cluster(tmp_path / "deploy", pg_database_factory()) as cluster:
        ok_id = cluster.submit(date(2027, 6, 1))
        worker = cluster.start_worker("trace-success", trace=trace)
        cluster.wait_quiescent(60, workers=[worker])
        worker.stop()
        bad_id = cluster.submit(date(2027, 6, 2))
        worker = cluster.start_worker("trace-compensated", TURN_BACK, trace=trace)
        cluster.wait_quiescent(60, workers=[worker])
        worker.stop()
        assert cluster.saga(ok_id)["status"] == "succeeded", cluster.describe(ok_id)
        assert cluster.saga(bad_id)["status"] == "compensated", cluster.describe(bad_id)
        report = cluster.check()
        assert report.ok, report.violations
    reached = set(trace.read_text().split())
    registered = {p for points in POINTS.values() for p in points}
    missing = sorted(registered - reached)
    assert not missing, f"registered fault points never reached: {missing}"
    unregistered = sorted(reached - registered - STARTUP_POINTS)
    assert not unregistered, f"fault points reached but not in fault_points(): {unregistered}"
