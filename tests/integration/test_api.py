"""The HTTP API end to end over real HTTP, on SQLite and PostgreSQL: sagas through the medallion
layers, the catalog, failure and compensation (with restore on re-ingestion), webhooks, input
validation, idempotency, consumers and health."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from lakesaga_live import PARTITION, TERMINAL, Live, WebhookReceiver
from standardwebhooks import Webhook, WebhookVerificationError

PROBLEM = "application/problem+json"


def _metrics(saga: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["name"]: step["metrics"] for step in saga["steps"]}


def _steps(saga: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["name"]: step for step in saga["steps"]}


def _assert_problem(resp: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
    assert "Traceback" not in resp.text
    body = resp.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    for needle in needles:
        assert needle.lower() in body["detail"].lower(), body
    return body


def _gold_rows_expected(live: Live) -> int:
    """Gold rows computed independently from the silver partition: one per event type, hour,
    page and (device, country) pair."""
    rows = live.lake_query(
        "SELECT count(DISTINCT event_type) + count(DISTINCT hour(event_ts)) "
        "+ count(DISTINCT page_url) + count(DISTINCT (device, country)) "
        "FROM lake.silver.cleaned_clickstream WHERE partition_date = CAST(? AS DATE)",
        [PARTITION])
    return int(rows[0][0])


def _register(live: Live, name: str, url: str, **extra: Any) -> dict[str, Any]:
    resp = live.client.post("/consumers", json={"name": name, "dataset": "clickstream",
                                                "url": url, **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


# -- 1. a saga through the layers -----------------------------------------------------------------


def test_post_saga__succeeds_with_metrics_matching_the_lake(live: Live) -> None:
    data = live.generate()

    resp = live.submit()

    assert resp.status_code == 202, resp.text
    saga_id = resp.json()["id"]
    assert resp.headers["location"] == f"/sagas/{saga_id}"
    assert resp.json()["status"] in ("pending", "running")
    assert resp.json()["manifest"] == {"files": 3, "total_bytes": sum(
        f.stat().st_size for f in data.files), "format": "json"}
    saga = live.wait(saga_id)
    assert saga["status"] == "succeeded", saga
    assert saga["error"] is None
    assert [s["name"] for s in saga["steps"]] == [
        "ingest_to_bronze", "process_to_silver", "aggregate_to_gold", "update_catalog",
        "notify_downstream"]
    for step in saga["steps"]:
        assert step["status"] == "succeeded", step
        assert step["attempt"] >= 1 and step["started_at"] and step["finished_at"]
        assert step["error"] is None and step["compensation"] is None

    m = _metrics(saga)
    bronze, silver, gold = (live.lake_count(layer) for layer in ("bronze", "silver", "gold"))
    assert m["ingest_to_bronze"]["files"] == 3
    assert m["ingest_to_bronze"]["records"] == data.records == bronze
    assert m["ingest_to_bronze"]["batch_id"] == saga_id
    assert m["process_to_silver"]["records_in"] == data.records
    assert m["process_to_silver"]["duplicates_removed"] == data.duplicates
    assert m["process_to_silver"]["invalid_removed"] == data.invalid
    assert m["process_to_silver"]["nulls_filled"] == data.nulls
    assert m["process_to_silver"]["records"] == data.retained == silver
    assert m["process_to_silver"]["retained_pct"] == round(100 * data.retained / data.records, 1)
    assert m["aggregate_to_gold"]["aggregations"] == [
        "daily_event_counts", "hourly_user_activity", "page_popularity", "device_country_sessions"]
    assert m["aggregate_to_gold"]["aggregated_records"] == gold == _gold_rows_expected(live)
    assert m["update_catalog"]["partitions_registered"] == [
        f"{t}/partition_date={PARTITION}" for t in (
            "bronze.raw_clickstream", "silver.cleaned_clickstream", "gold.clickstream_metrics")]
    assert m["notify_downstream"]["consumers_notified"] == 0
    assert saga["deliveries"] == []


# -- 2. catalog, event log, listing ---------------------------------------------------------------


def test_get_partition__reports_layers_matching_the_lake(live: Live) -> None:
    live.generate()
    saga = live.wait(live.submit().json()["id"])
    assert saga["status"] == "succeeded", saga
    m = _metrics(saga)

    resp = live.client.get(f"/datasets/clickstream/partitions/{PARTITION}")

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["dataset"] == "clickstream" and body["partition_date"] == PARTITION
    layers = body["layers"]
    assert set(layers) == {"bronze", "silver", "gold"}
    for layer, entry in layers.items():
        assert entry["rows"] == live.lake_count(layer), layer
        assert entry["saga_id"] == saga["id"]
        assert isinstance(entry["snapshot_id"], int)
        assert entry["registered_at"]
    assert layers["bronze"]["table_name"] == "bronze.raw_clickstream"
    assert layers["bronze"]["snapshot_id"] == m["ingest_to_bronze"]["snapshot_id"]
    assert layers["silver"]["snapshot_id"] == m["process_to_silver"]["snapshot_id"]
    assert layers["gold"]["snapshot_id"] == m["aggregate_to_gold"]["snapshot_id"]
    assert (layers["bronze"]["snapshot_id"] < layers["silver"]["snapshot_id"]
            < layers["gold"]["snapshot_id"])
    sources = layers["bronze"]["lineage"]["sources"]
    assert [s["path"] for s in sources] == [
        f"clickstream/{PARTITION}/events-00{i}.ndjson" for i in (1, 2, 3)]
    for source in sources:
        digest = hashlib.sha256((live.source_root / source["path"]).read_bytes()).hexdigest()
        assert source["sha256"] == digest
        assert source["size"] == (live.source_root / source["path"]).stat().st_size
    assert layers["bronze"]["lineage"]["batches"] == [saga["id"]]
    assert layers["silver"]["lineage"]["upstream"] == [
        f"bronze.raw_clickstream/partition_date={PARTITION}"]
    assert layers["silver"]["lineage"]["upstream_snapshot"] == layers["bronze"]["snapshot_id"]
    assert layers["gold"]["lineage"]["upstream"] == [
        f"silver.cleaned_clickstream/partition_date={PARTITION}"]
    assert layers["gold"]["lineage"]["upstream_snapshot"] == layers["silver"]["snapshot_id"]
    assert layers["gold"]["lineage"]["aggregations"] == m["aggregate_to_gold"]["aggregations"]


def test_get_partition__unknown_partition_is_404(live: Live) -> None:
    _assert_problem(live.client.get("/datasets/clickstream/partitions/2030-01-01"), 404, "2030-01-01")
    _assert_problem(live.client.get("/datasets/nope/partitions/2030-01-01"), 404, "nope")
    _assert_problem(live.client.get("/datasets/clickstream/partitions/not-a-date"), 422)


def test_get_saga_events__is_a_contiguous_valid_path(live: Live) -> None:
    live.generate()
    saga = live.wait(live.submit().json()["id"])
    assert saga["status"] == "succeeded"

    resp = live.client.get(f"/sagas/{saga['id']}/events")

    assert resp.status_code == 200, resp.text
    events = resp.json()["items"]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] in (0, 1), seqs
    assert all(e["at"] for e in events)
    kinds = [e["kind"] for e in events]
    # every step started before it succeeded, in the saga's order
    steps = [s["name"] for s in saga["steps"]]
    succeeded = [e["step"] for e in events if e["kind"] == "step_succeeded"]
    assert succeeded == steps, kinds
    for name in steps:
        started = next(i for i, e in enumerate(events)
                       if e["kind"] == "step_started" and e["step"] == name)
        done = next(i for i, e in enumerate(events)
                    if e["kind"] == "step_succeeded" and e["step"] == name)
        assert started < done, kinds
    assert not any("compensation" in k or k == "step_failed" for k in kinds), kinds
    # paging with `after` continues exactly where the page stopped
    half = seqs[len(seqs) // 2]
    rest = live.client.get(f"/sagas/{saga['id']}/events", params={"after": half}).json()["items"]
    assert [e["seq"] for e in rest] == [s for s in seqs if s > half]
    _assert_problem(live.client.get("/sagas/00000000-0000-0000-0000-000000000000/events"), 404)


def test_concurrent_sagas__different_partitions_all_succeed(live_factory: Any) -> None:
    # Regression: on a SQLite DuckLake catalog two worker threads used to time out on each
    # other's catalog locks and both sagas failed; lake writes are now serialized per lake.
    live = live_factory(worker_concurrency=4)
    dates = ["2026-01-06", "2026-01-07", "2026-01-08", "2026-01-09"]
    for day in dates:
        live.generate(day, records=600, partition_date=day)
    ids = []
    for day in dates:
        resp = live.submit(path=f"clickstream/{day}/*.ndjson", partition_date=day)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    sagas = [live.wait(saga_id, timeout=60) for saga_id in ids]
    assert [s["status"] for s in sagas] == ["succeeded"] * len(dates), [s["error"] for s in sagas]
    for day, saga in zip(dates, sagas, strict=True):
        metrics = {step["name"]: step["metrics"] for step in saga["steps"]}
        assert live.lake_count("silver", day) == metrics["process_to_silver"]["records"]
        assert live.lake_count("bronze", day) == 600


def test_list_sagas__filters_and_paginates_with_a_cursor(live: Live) -> None:
    dates = ["2026-01-06", "2026-01-07", "2026-01-08"]
    ids = []
    for day in dates:
        live.generate(day, records=600, partition_date=day)
        resp = live.submit(path=f"clickstream/{day}/*.ndjson", partition_date=day)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
        # one at a time, so that the listing order is known
        assert live.wait(ids[-1])["status"] == "succeeded"

    listed = live.client.get("/sagas").json()
    assert [s["id"] for s in listed["items"]] == list(reversed(ids))  # newest first
    assert listed["next_cursor"] is None
    assert {s["status"] for s in listed["items"]} == {"succeeded"}

    def ids_for(**params: Any) -> list[str]:
        resp = live.client.get("/sagas", params=params)
        assert resp.status_code == 200, resp.text
        return [s["id"] for s in resp.json()["items"]]

    assert sorted(ids_for(status="succeeded")) == sorted(ids)
    assert ids_for(status="compensated") == []
    assert sorted(ids_for(dataset="clickstream")) == sorted(ids)
    assert ids_for(dataset="other") == []
    assert ids_for(partition_date="2026-01-07") == [ids[1]]
    _assert_problem(live.client.get("/sagas", params={"status": "bogus"}), 422)
    _assert_problem(live.client.get("/sagas", params={"limit": 0}), 422)
    _assert_problem(live.client.get("/sagas", params={"cursor": "!!garbage!!"}), 400)

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 1}
        if cursor:
            params["cursor"] = cursor
        page = live.client.get("/sagas", params=params).json()
        assert len(page["items"]) <= 1
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


# -- 3. failure at gold, compensation, webhooks ---------------------------------------------------


def test_post_saga__failure_at_gold_compensates_everything(
        live_factory: Callable[..., Live], webhook_receiver: WebhookReceiver) -> None:
    live = live_factory(faults="aggregate_to_gold=raise")
    live.generate()
    _register(live, "warehouse", f"{webhook_receiver.url}/warehouse")

    saga = live.wait(live.submit().json()["id"])

    assert saga["status"] == "compensated", saga
    assert "aggregate_to_gold" in (saga["error"] or ""), saga
    steps = _steps(saga)
    assert steps["aggregate_to_gold"]["status"] in ("failed", "compensated")
    assert "aggregate_to_gold" in steps["aggregate_to_gold"]["error"]
    for name in ("ingest_to_bronze", "process_to_silver"):
        assert steps[name]["status"] == "compensated", steps[name]
        assert steps[name]["compensation"]["status"] == "compensated"
    assert steps["ingest_to_bronze"]["compensation"]["metrics"]["records_removed"] == 2000
    assert steps["update_catalog"]["status"] in ("pending", "skipped")
    assert steps["notify_downstream"]["status"] in ("pending", "skipped")
    for layer in ("bronze", "silver", "gold"):
        assert live.lake_count(layer) == 0, layer
    _assert_problem(live.client.get(f"/datasets/clickstream/partitions/{PARTITION}"), 404)
    time.sleep(0.5)  # give the dispatcher several polls to (wrongly) send something
    assert live.client.get(f"/sagas/{saga['id']}").json()["deliveries"] == []
    assert webhook_receiver.received() == []
    assert live.table_counts()["outbox"] == 0


def test_post_saga__success_notifies_each_consumer_once_signed(
        live: Live, webhook_receiver: WebhookReceiver) -> None:
    live.generate()
    consumers = {
        name: _register(live, name, f"{webhook_receiver.url}/{name}")
        for name in ("analytics", "warehouse")
    }

    saga = live.wait(live.submit().json()["id"])
    assert saga["status"] == "succeeded", saga
    assert _metrics(saga)["notify_downstream"]["consumers_notified"] == 2
    saga = live.wait_deliveries(saga["id"], 2)
    time.sleep(0.3)  # a duplicate send would show up now

    deliveries = {d["consumer"]: d for d in saga["deliveries"]}
    assert set(deliveries) == set(consumers)
    received = webhook_receiver.received()
    assert sorted(r.path for r in received) == ["/analytics", "/warehouse"]
    for request in received:
        name = request.path.lstrip("/")
        delivery, consumer = deliveries[name], consumers[name]
        assert delivery["status"] == "delivered" and delivery["last_status_code"] == 204
        assert delivery["consumer_id"] == consumer["id"]
        assert request.headers["webhook-id"] == delivery["idempotency_key"]
        timestamp = request.headers["webhook-timestamp"]
        assert abs(int(timestamp) - time.time()) < 60
        # a stock Standard Webhooks verifier accepts it with the secret POST /consumers returned
        assert consumer["secret"].startswith("whsec_")
        assert Webhook(consumer["secret"]).verify(request.body, request.headers) == request.json()
        payload = request.json()
        assert payload["saga_id"] == saga["id"] and payload["partition_date"] == PARTITION
        assert payload["event"] == "partition.ready" == delivery["event"]
        assert payload["records"] == {layer: live.lake_count(layer)
                                      for layer in ("bronze", "silver", "gold")}


# -- 4. re-ingestion that fails restores the previous partition -----------------------------------


@pytest.mark.parametrize("fault", ["aggregate_to_gold", "aggregate_to_gold.after_commit"])
def test_post_saga__failed_reingestion_restores_previous_partition(
        live_factory: Callable[..., Live], fault: str) -> None:
    first_live = live_factory()
    first_live.generate()
    first = first_live.wait(first_live.submit().json()["id"])
    assert first["status"] == "succeeded", first
    silver_before = first_live.lake_rows("silver")
    gold_before = first_live.lake_rows("gold")
    bronze_count = first_live.lake_count("bronze")
    catalog_before = first_live.client.get(f"/datasets/clickstream/partitions/{PARTITION}").json()
    assert silver_before and gold_before
    first_live.stop()

    live = live_factory(faults=f"{fault}=raise")
    live.generate("2026-01-06-again", seed=7)
    resp = live.submit(path="clickstream/2026-01-06-again/*.ndjson")
    assert resp.status_code == 202, resp.text
    second = live.wait(resp.json()["id"])

    assert second["status"] == "compensated", second
    assert "aggregate_to_gold" in (second["error"] or "")
    silver_comp = _steps(second)["process_to_silver"]["compensation"]
    assert silver_comp["status"] == "compensated"
    assert silver_comp["metrics"]["records_restored"] == len(silver_before)
    assert live.lake_rows("silver") == silver_before
    assert live.lake_rows("gold") == gold_before
    batches = live.lake_query(
        "SELECT _batch_id, count(*) FROM lake.bronze.raw_clickstream "
        "WHERE partition_date = CAST(? AS DATE) GROUP BY ALL", [PARTITION])
    assert batches == [(first["id"], bronze_count)]
    catalog = live.client.get(f"/datasets/clickstream/partitions/{PARTITION}")
    assert catalog.status_code == 200
    assert catalog.json() == catalog_before
    assert {e["saga_id"] for e in catalog.json()["layers"].values()} == {first["id"]}


def test_post_saga__succeeds_after_a_restart_on_an_existing_lake(
        live_factory: Callable[..., Live]) -> None:
    """Regression: a half-read startup query kept the SQLite lake catalog locked after a restart."""
    first = live_factory()
    first.generate(records=600)
    assert first.wait(first.submit().json()["id"])["status"] == "succeeded"
    first.stop()

    # one try per step keeps the expected failure short (5 s lock timeouts otherwise add up)
    live = live_factory(step_max_attempts=1)
    live.generate("2026-01-06-again", records=600, seed=7)
    saga = live.wait(live.submit(path="clickstream/2026-01-06-again/*.ndjson").json()["id"])

    assert saga["status"] == "succeeded", saga["error"]


# -- 5. bad input ---------------------------------------------------------------------------------


def _saga_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"dataset": "clickstream", "partition_date": PARTITION,
                            "source": {"path": f"clickstream/{PARTITION}/*.ndjson", "format": "json"}}
    body.update(changes)
    return body


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown_dataset", _saga_body(dataset="nope"), 404, "nope"),
    ("month_13", _saga_body(partition_date="2026-13-45"), 422, "partition_date"),
    ("word_date", _saga_body(partition_date="yesterday"), 422, "partition_date"),
    # pydantic alone reads these as Unix timestamps (1970-01-01 for 0)
    ("number_date", _saga_body(partition_date=0), 422, "YYYY-MM-DD"),
    ("numeric_text_date", _saga_body(partition_date="0"), 422, "YYYY-MM-DD"),
    ("timestamp_date", _saga_body(partition_date=1767657600), 422, "YYYY-MM-DD"),
    ("compact_date", _saga_body(partition_date="20260106"), 422, "YYYY-MM-DD"),
    # Arabic-Indic digits: a regex ``\d`` takes them for digits.
    ("non_ascii_digits_date",
     _saga_body(partition_date="\u0662\u0660\u0662\u0666-\u0660\u0661-\u0660\u0666"), 422,
     "YYYY-MM-DD"),
    ("glob_matches_nothing", _saga_body(source={"path": "clickstream/1999-01-01/*.ndjson",
                                                "format": "json"}), 422, "matches no file"),
    ("dotdot", _saga_body(source={"path": "../x/*.ndjson", "format": "json"}), 422, ".."),
    ("absolute", _saga_body(source={"path": "/etc/passwd", "format": "json"}), 422, "absolute"),
    ("home", _saga_body(source={"path": "~/x.ndjson", "format": "json"}), 422, "relative"),
    ("symlink_out", _saga_body(source={"path": "clickstream/evil/*.ndjson", "format": "json"}),
     422, "outside the source root"),
    ("unknown_format", _saga_body(source={"path": f"clickstream/{PARTITION}/*.ndjson",
                                          "format": "xml"}), 422, "format"),
    ("extra_top_field", {**_saga_body(), "priority": "high"}, 422, "priority"),
    ("extra_source_field", _saga_body(source={"path": f"clickstream/{PARTITION}/*.ndjson",
                                              "format": "json", "recursive": True}), 422, "recursive"),
    ("missing_source", {"dataset": "clickstream", "partition_date": PARTITION}, 422, "source"),
]


@pytest.mark.parametrize(("body", "status", "needle"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_post_saga__bad_input_is_a_problem_and_writes_nothing(
        live: Live, tmp_path: Any, body: dict[str, Any], status: int, needle: str) -> None:
    live.generate()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.ndjson").write_text('{"event_id": "x"}\n')
    evil = live.source_root / "clickstream" / "evil"
    evil.mkdir(parents=True)
    os.symlink(outside / "secret.ndjson", evil / "link.ndjson")

    resp = live.client.post("/sagas", json=body, headers={"Idempotency-Key": "bad-1"})

    _assert_problem(resp, status, needle)
    assert live.client.get("/sagas").json() == {"items": [], "next_cursor": None}
    counts = live.table_counts()
    assert counts == {name: 0 for name in counts}, counts


def test_post_saga__invalid_json_body_is_422(live: Live) -> None:
    for content in (b'{"dataset": "clickstream",', b"not json", b""):
        resp = live.client.post("/sagas", content=content,
                                headers={"content-type": "application/json"})
        _assert_problem(resp, 422)
    assert live.client.get("/sagas").json()["items"] == []
    assert live.table_counts()["sagas"] == 0


def test_dates_in_query_and_path__only_yyyy_mm_dd(live: Live) -> None:
    for value in ("0", "1767657600", "20260106", "2026-1-6"):
        _assert_problem(live.client.get("/sagas", params={"partition_date": value}), 422,
                        "YYYY-MM-DD")
        _assert_problem(live.client.get(f"/datasets/clickstream/partitions/{value}"), 422,
                        "YYYY-MM-DD")
    assert live.client.get("/sagas", params={"partition_date": PARTITION}).status_code == 200


def test_get_saga__unknown_id_is_404(live: Live) -> None:
    body = _assert_problem(live.client.get("/sagas/does-not-exist"), 404, "does-not-exist")
    assert body["instance"] == "/sagas/does-not-exist"


def test_nul_in_url__is_400_problem_on_every_backend(live: Live) -> None:
    # PostgreSQL text cannot hold NUL: these reached the driver and were a 500 there.
    cursor = base64.urlsafe_b64encode(b"2026-01-06T00:00:00|\x00").decode()
    for method, url in [("GET", "/sagas/%00"), ("GET", "/sagas/a%00b/events"),
                        ("POST", "/sagas/%00/cancel"), ("POST", "/sagas/%00/retry"),
                        ("GET", "/sagas?dataset=%00"), ("GET", "/sagas?dataset=click%00stream"),
                        ("GET", "/sagas/%00?wait=1"), ("GET", "/consumers?dataset=%00"),
                        ("DELETE", "/consumers/%00"),
                        ("GET", "/datasets/clickstream%00/partitions/2026-01-06")]:
        body = _assert_problem(live.client.request(method, url), 400, "NUL")
        assert "\x00" not in body.get("instance", ""), body
    _assert_problem(live.client.get("/sagas", params={"cursor": cursor}), 400, "cursor")
    live.generate()
    nul_path = {"dataset": "clickstream", "partition_date": PARTITION,
                "source": {"path": "clickstream/\x00/*.ndjson", "format": "json"}}
    assert live.client.post("/sagas", json=nul_path).status_code == 422
    nul_url = {"name": "nul", "dataset": "clickstream", "url": "http://127.0.0.1/\x00"}
    assert live.client.post("/consumers", json=nul_url).status_code == 422
    assert live.client.get("/sagas").status_code == 200


def test_get_saga__wait_answers_each_change_until_the_saga_is_at_rest(live: Live) -> None:
    live.generate()
    answers = [live.submit().json()]
    saga_id = answers[0]["id"]
    while answers[-1]["status"] not in TERMINAL:
        # The client gives up long before the wait ends: every answer came with a change.
        resp = live.client.get(f"/sagas/{saga_id}", params={"wait": 30}, timeout=10)
        assert resp.status_code == 200, resp.text
        answers.append(resp.json())
        assert len(answers) < 50, answers[-1]
    assert all(a != b for a, b in zip(answers, answers[1:], strict=False))
    assert answers[-1]["status"] == "succeeded"
    assert any(a["status"] == "running" for a in answers[1:-1])  # it saw the saga under way

    at_rest = live.client.get(f"/sagas/{saga_id}", params={"wait": 60}, timeout=5)
    assert at_rest.status_code == 200 and at_rest.json() == answers[-1]


def test_get_saga__wait_without_a_change_answers_after_the_wait(
        live_factory: Callable[..., Live]) -> None:
    live = live_factory(faults="ingest_to_bronze=sleep:3000@1")
    live.generate()
    saga_id = live.submit().json()["id"]
    deadline = time.monotonic() + 20
    while (before := live.client.get(f"/sagas/{saga_id}").json())["steps"][0]["status"] != "running":
        assert time.monotonic() < deadline, before
        time.sleep(0.02)

    # Bronze sleeps 3 s at its start: half a second of waiting sees no change.
    resp = live.client.get(f"/sagas/{saga_id}", params={"wait": 0.5}, timeout=2.5)
    assert resp.status_code == 200 and resp.json() == before
    assert live.wait(saga_id)["status"] == "succeeded"


def test_get_saga__wait_out_of_range_is_422(live: Live) -> None:
    live.generate()
    saga_id = live.submit().json()["id"]
    for value in ("-1", "60.5", "soon", "nan"):
        _assert_problem(live.client.get(f"/sagas/{saga_id}", params={"wait": value}), 422, "wait")
    _assert_problem(live.client.get("/sagas/does-not-exist", params={"wait": 5}), 404)


def test_unknown_route__is_404_problem(live: Live) -> None:
    _assert_problem(live.client.get("/no/such/route"), 404)
    _assert_problem(live.client.delete("/sagas"), 405)


# -- 6. idempotency -------------------------------------------------------------------------------


def test_post_saga__idempotency_key_replays_or_rejects(live: Live) -> None:
    live.generate()
    first = live.submit(key="order-42")
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers

    again = live.submit(key="order-42")

    assert again.status_code == 202, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    other = live.submit(key="order-42", partition_date="2026-01-07")
    _assert_problem(other, 422, "Idempotency-Key")
    saga = live.wait(first.json()["id"])
    assert saga["status"] == "succeeded"
    # replay after completion still returns the same saga; no other saga was ever created
    assert live.submit(key="order-42").json()["id"] == saga["id"]
    assert [s["id"] for s in live.client.get("/sagas").json()["items"]] == [saga["id"]]


# -- 7. consumers ---------------------------------------------------------------------------------


def test_webhook_signature__plain_secrets_sign_as_before_and_verify_as_standard_webhooks(
        live: Live, webhook_receiver: WebhookReceiver) -> None:
    live.generate()
    plain = "plain-secret-" + "p" * 20  # a consumer registered with its own, non-whsec secret
    created = _register(live, "legacy", f"{webhook_receiver.url}/legacy", secret=plain)
    assert created["secret"] == "whsec_" + base64.b64encode(plain.encode()).decode()
    given = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    standard = _register(live, "standard", f"{webhook_receiver.url}/standard", secret=given)
    assert standard["secret"] == given
    short = live.client.post("/consumers", json={"name": "short", "dataset": "clickstream",
                                                 "url": f"{webhook_receiver.url}/short",
                                                 "secret": "whsec_MTIzNDU2Nzg="})  # 8 bytes
    _assert_problem(short, 422, "at least 16 bytes")

    saga = live.wait(live.submit().json()["id"])
    live.wait_deliveries(saga["id"], 2)
    received = {r.path: r for r in webhook_receiver.received()}
    legacy, fresh = received["/legacy"], received["/standard"]
    # what an existing consumer verifies with (HMAC keyed by its plain secret) still holds...
    msg = f"{legacy.headers['webhook-id']}.{legacy.headers['webhook-timestamp']}.".encode()
    mac = hmac.new(plain.encode(), msg + legacy.body, hashlib.sha256).digest()
    assert legacy.headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    # ...and a stock verifier accepts both, with the secrets POST /consumers returned
    Webhook(created["secret"]).verify(legacy.body, legacy.headers)
    Webhook(given).verify(fresh.body, fresh.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(given).verify(legacy.body, legacy.headers)


def test_post_consumer__loopback_allowed_only_by_allow_list(live: Live) -> None:
    created = _register(live, "local", "http://127.0.0.1:9/hook", secret="s" * 24)
    assert created["secret"] == "whsec_" + base64.b64encode(b"s" * 24).decode()
    assert created["url"] == "http://127.0.0.1:9/hook"

    listed = live.client.get("/consumers")
    assert listed.status_code == 200
    assert listed.json() == [{k: v for k, v in created.items() if k != "secret"}]
    assert "secret" not in listed.text and "s" * 24 not in listed.text
    assert created["secret"] not in listed.text
    assert live.client.get("/consumers", params={"dataset": "other"}).json() == []
    duplicate = live.client.post("/consumers", json={"name": "local", "dataset": "clickstream",
                                                     "url": "http://127.0.0.1:9/other"})
    _assert_problem(duplicate, 409, "local")
    _assert_problem(live.client.post("/consumers", json={
        "name": "x", "dataset": "nope", "url": "http://127.0.0.1:9/"}), 404, "nope")
    generated = _register(live, "auto", "http://127.0.0.1:9/auto")
    assert len(generated["secret"]) >= 16

    assert live.client.delete(f"/consumers/{created['id']}").status_code == 204
    assert [c["name"] for c in live.client.get("/consumers").json()] == ["auto"]
    _assert_problem(live.client.delete(f"/consumers/{created['id']}"), 404)


#: Each refused URL and a text its problem detail must contain.
INTERNAL_URLS = {
    "http://127.0.0.1/": "non-public address", "http://169.254.169.254/": "non-public address",
    "http://[::ffff:127.0.0.1]/": "non-public address",
    "http://2130706433/": "canonical IP address", "http://10.0.0.1/": "non-public address",
    "http://localhost:8080/": "non-public address", "http://[::1]/": "non-public address",
    "http://0.0.0.0/": "non-public address", "ftp://example.com/": "http or https",
    "http://user:pw@example.com/": "credentials",
}


def test_post_consumer__internal_url_rejected_without_allow_list(
        live_factory: Callable[..., Live]) -> None:
    live = live_factory(webhook_allow_hosts=[])

    for url, reason in INTERNAL_URLS.items():  # one server for all cases keeps the test fast
        resp = live.client.post("/consumers", json={"name": "evil", "dataset": "clickstream",
                                                    "url": url})
        assert resp.status_code == 422, (url, resp.text)
        _assert_problem(resp, 422, reason)

    assert live.client.get("/consumers").json() == []
    assert live.table_counts()["consumers"] == 0


# -- 8. health ------------------------------------------------------------------------------------


def test_healthz__ok(live: Live) -> None:
    assert live.client.get("/healthz").json() == {"status": "ok"}
    resp = live.client.get("/readyz")
    assert resp.status_code == 200 and resp.json()["status"] == "ready"


def test_readyz__names_each_check_and_is_503_when_one_fails(live: Live) -> None:
    ready = live.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert set(checks) == {"database", "executor", "lake"}
    assert all(check["ok"] for check in checks.values()), checks
    assert checks["executor"]["detail"] == "2 of 2 worker threads alive"

    data = live.settings.lake_dir / "data"
    data.rename(data.with_name("data.moved"))
    data.write_text("a file where the lake's data directory was")
    try:
        broken = live.client.get("/readyz")
        body = _assert_problem(broken, 503, "lake")
        assert broken.headers["retry-after"] == "2"
        assert not body["checks"]["lake"]["ok"] and body["checks"]["database"]["ok"]
        assert "not writable" in body["checks"]["lake"]["detail"]
        assert str(live.settings.lake_dir) not in broken.text  # no server path
    finally:
        data.unlink()
        data.with_name("data.moved").rename(data)
    assert live.client.get("/readyz").status_code == 200

    assert live.service.executor is not None
    assert live.service.executor.stop(timeout_s=10)
    stopped = _assert_problem(live.client.get("/readyz"), 503, "executor")
    assert stopped["checks"]["executor"] == {"ok": False, "detail": "0 of 2 worker threads alive"}
    assert stopped["checks"]["lake"]["ok"]
