"""The saga resource as the service builds it: ``POST /sagas`` answers from what it wrote (no read
back), which must equal what ``GET /sagas/{id}`` reads; the manifest summary is computed by the
database (counts only) and must hold sizes beyond 32 bits; replays answer with the stored saga."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import date

import pytest

from app.errors import Problem
from app.lakehouse.generator import generate_clickstream
from app.saga.step_log import NewSaga
from app.service import DEFINITION, Service
from app.settings import Settings

PARTITION = "2026-01-06"
BODY = {"dataset": "clickstream", "partition_date": PARTITION,
        "source": {"path": f"clickstream/{PARTITION}/*.ndjson", "format": "json"}}


@pytest.fixture
def service(database_url: str, settings_factory: Callable[..., Settings]) -> Iterator[Service]:
    settings = settings_factory(database_url)
    generate_clickstream(settings.source_root / "clickstream" / PARTITION, records=300, files=3,
                         seed=3)
    svc = Service(settings)
    try:
        yield svc
    finally:
        svc.close()


def test_saga_resource__accepted_view_equals_the_read(service: Service) -> None:
    accepted, created = service.submit(dict(BODY), "key-1", owner="owner-1")
    assert created
    read = service.saga(accepted["id"])
    assert accepted == read
    assert read["cancel_requested"] is False and read["attempts"] == 0  # typed, not 0/1
    assert accepted["manifest"]["files"] == 3
    assert [s["status"] for s in accepted["steps"]] == ["pending"] * 5


def test_saga_resource__replay_answers_with_the_stored_saga(service: Service) -> None:
    first, _ = service.submit(dict(BODY), "key-1", owner="owner-1")
    again, created = service.submit(dict(BODY), "key-1", owner="owner-1")
    assert not created and again == first
    other, created = service.submit(dict(BODY), "key-1", owner="owner-2")  # keys are per owner
    assert created and other["id"] != first["id"]
    with pytest.raises(Problem) as refused:
        service.submit({**BODY, "partition_date": "2026-01-07"}, "key-1", owner="owner-1")
    assert refused.value.status == 422


def test_saga_resource__manifest_summary_is_counted_by_the_database(service: Service) -> None:
    files = [{"path": f"f{i}.ndjson", "size": 5 * 2**30, "mtime": 0.0} for i in range(1200)]
    saga_id = str(uuid.uuid4())
    service.log.create_saga(NewSaga(
        id=saga_id, definition=DEFINITION, dataset="clickstream",
        partition_date=date.fromisoformat(PARTITION), request=dict(BODY),
        manifest={"format": "json", "files": files, "total_bytes": 1200 * 5 * 2**30},
        request_fingerprint="0" * 64, idempotency_key=None, steps=["a", "b"]))
    saga = service.saga(saga_id)
    assert saga["manifest"] == {"files": 1200, "total_bytes": 1200 * 5 * 2**30, "format": "json"}
    assert saga["source"] == BODY["source"]
    with pytest.raises(Problem) as missing:
        service.saga(str(uuid.uuid4()))
    assert missing.value.status == 404
