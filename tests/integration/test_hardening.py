"""Regression tests for defects found in review: each input here once produced a 500, a stalled
outbox, a wrongly compensated saga or data from outside the manifest."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from lakesaga_live import Live
from sqlalchemy import select

from app.db.models import OutboxRow

PROBLEM = "application/problem+json"


def _problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    assert "Traceback" not in resp.text
    return resp.json()


def _submit(live: Live, path: str) -> httpx.Response:
    return live.client.post("/sagas", json={"dataset": "clickstream", "partition_date": "2026-01-06",
                                            "source": {"path": path, "format": "json"}})


@pytest.mark.parametrize("pattern", ["a**b", "cs/**x", "."])
def test_submit__glob_that_pathlib_rejects_is_422(live: Live, pattern: str) -> None:
    body = _problem(_submit(live, pattern), 422)
    assert body["detail"]


def test_submit__symlink_loop_is_422(live: Live) -> None:
    loop = live.source_root / "loop"
    loop.mkdir()
    os.symlink(loop / "b.ndjson", loop / "a.ndjson")
    os.symlink(loop / "a.ndjson", loop / "b.ndjson")
    _problem(_submit(live, "loop/*.ndjson"), 422)


def test_submit__glob_characters_in_file_names_are_refused(live: Live) -> None:
    # DuckDB expands file lists as globs: "ev[1].ndjson" would read "ev1.ndjson" instead.
    folder = live.source_root / "g"
    folder.mkdir()
    (folder / "ev[1].ndjson").write_text('{"event_id": "x"}\n')
    (folder / "ev1.ndjson").write_text('{"event_id": "y"}\n')
    body = _problem(_submit(live, "g/*.ndjson"), 422)
    assert "glob characters" in body["detail"]
    assert live.client.get("/sagas").json()["items"] == []


def test_saga__batch_without_valid_rows_succeeds_with_empty_silver(live: Live) -> None:
    # A commit that changes nothing makes no DuckLake snapshot; the pivot used to fail on it.
    folder = live.source_root / "empty"
    folder.mkdir()
    (folder / "only-invalid.ndjson").write_text(
        '{"event_id": "e1", "user_id": null, "event_type": "click", '
        '"event_ts": "2026-01-06T10:00:00Z"}\n')
    resp = _submit(live, "empty/*.ndjson")
    assert resp.status_code == 202, resp.text
    saga = live.wait(resp.json()["id"])
    assert saga["status"] == "succeeded", saga["error"]
    silver = {s["name"]: s["metrics"] for s in saga["steps"]}["process_to_silver"]
    assert silver["records"] == 0 and silver["invalid_removed"] == 1
    assert live.lake_count("silver") == 0


def test_bronze__file_replaced_after_accept_fails_cleanly(live_factory: Any) -> None:
    # Large sources are not hashed at accept time; bronze must still refuse a changed file.
    live = live_factory(hash_at_accept_max_bytes=0, faults="ingest_to_bronze=sleep:1500")
    live.generate(records=300, files=1)
    resp = live.submit()
    assert resp.status_code == 202, resp.text
    victim = next((live.source_root / "clickstream" / "2026-01-06").glob("*.ndjson"))
    time.sleep(0.3)  # the saga is accepted and its worker sleeps at the start of bronze
    content = victim.read_bytes()
    victim.write_bytes(content.replace(b"u0", b"x0", 1))
    saga = live.wait(resp.json()["id"])
    assert saga["status"] == "compensated"
    assert "changed after the saga was accepted" in saga["error"]
    assert live.lake_count("bronze") == 0


def test_consumer__url_httpx_cannot_parse_is_422(live: Live) -> None:
    resp = live.client.post("/consumers", json={"name": "bad", "dataset": "clickstream",
                                                "url": "http://127.0.0.1:9/hook\x01"})
    _problem(resp, 422)


def test_consumer__control_characters_in_secret_are_422_not_503(live: Live) -> None:
    resp = live.client.post("/consumers", json={"name": "nul", "dataset": "clickstream",
                                                "url": "http://127.0.0.1:9/hook",
                                                "secret": "a" * 20 + "\x00"})
    _problem(resp, 422)


def test_outbox__one_failing_delivery_does_not_stall_the_others(live: Live,
                                                                 webhook_receiver: Any) -> None:
    # "aaa" sorts first and points at a closed port; "zzz" must still be delivered.
    for name, url in (("aaa", "http://127.0.0.1:9/closed"), ("zzz", webhook_receiver.url)):
        resp = live.client.post("/consumers", json={"name": name, "dataset": "clickstream",
                                                    "url": url})
        assert resp.status_code == 201, resp.text
    live.generate(records=300, files=1)
    saga = live.wait(live.submit().json()["id"])
    assert saga["status"] == "succeeded"
    deadline = time.monotonic() + 15

    def statuses() -> set[str]:
        with live.service.db.sessions() as s:
            return {r.status for r in s.scalars(select(OutboxRow))}

    # The receiver has the request before the dispatcher, having read the answer, records it.
    while time.monotonic() < deadline and "delivered" not in statuses():
        time.sleep(0.05)
    assert len(webhook_receiver.received()) == 1
    assert "delivered" in statuses()


def test_cancel__after_the_pivot_is_409(live_factory: Any) -> None:
    live = live_factory(faults="notify_downstream=sleep:2000")
    live.generate(records=300, files=1)
    saga_id = live.submit().json()["id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        steps = {s["name"]: s["status"] for s in live.client.get(f"/sagas/{saga_id}").json()["steps"]}
        if steps["update_catalog"] == "succeeded":
            break
        time.sleep(0.05)
    body = _problem(live.client.post(f"/sagas/{saga_id}/cancel"), 409)
    assert "point of no return" in body["detail"]
    assert live.wait(saga_id)["status"] == "succeeded"


def test_lake__attach_error_does_not_leak_the_password(tmp_path: Path) -> None:
    from app.lakehouse.duck import Lake, LakeUnavailable
    from app.settings import Settings

    settings = Settings(database_url="postgresql://u:S3cretCanary@127.0.0.1:1/none",
                        lake_dir=tmp_path / "lake", source_root=tmp_path)
    with pytest.raises(LakeUnavailable) as caught:
        Lake(settings)
    assert "S3cretCanary" not in str(caught.value)
    assert "password=***" in str(caught.value)
