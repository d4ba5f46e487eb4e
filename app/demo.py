"""``lakesaga demo``: the seed's walkthrough on real data, over real HTTP.

Generates the raw clickstream under a demo directory, runs the service (API + executor) in this
process on a loopback port, registers three webhook consumers served by a local receiver,
submits a saga with ``POST /sagas``, polls it, and prints the layer-by-layer report. The counts
printed come from the saga's recorded metrics and are checked against ``count(*)`` of the lake.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from rich.console import Console

from app.auth import create_key
from app.lakehouse.duck import first_row
from app.lakehouse.generator import generate_clickstream
from app.lakehouse.ingestion import LakehouseIngestionSaga
from app.lakehouse.tables import LAYERS, layer_table
from app.main import create_app
from app.service import Service
from app.settings import Settings

PARTITION = "2026-01-06"
CONSUMERS = ("analytics_dashboard", "ml_feature_store", "data_quality_monitor")
RULE = "=" * 80
console = Console(highlight=False, soft_wrap=True)


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.received.append({"path": self.path, "id": self.headers.get("webhook-id"),
                              "body": json.loads(body or b"{}")})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(workdir: Path, *, fail_at: str | None, records: int, keep: bool) -> int:
    if workdir.exists() and not keep:
        shutil.rmtree(workdir)
    settings = Settings(
        database_url=f"sqlite:///{workdir / 'lakesaga.db'}",
        source_root=workdir / "raw",
        lake_dir=workdir / "lake",
        faults=f"{fail_at}=raise" if fail_at else "",
        webhook_allow_hosts=["127.0.0.1"],
        poll_interval_s=0.1,
    )
    console.print("🏠 Lakehouse Ingestion Saga - Medallion Architecture Demo")
    console.print(RULE)
    console.print("    Bronze (Raw) → Silver (Clean) → Gold (Aggregated)")
    console.print(RULE)
    started = time.perf_counter()
    data = generate_clickstream(settings.source_root / "clickstream" / PARTITION, records=records)
    console.print(f"Generated {data.records:,} raw records in {len(data.files)} files "
                  f"under {settings.source_root} ({time.perf_counter() - started:.2f} s)")

    receiver = ThreadingHTTPServer(("127.0.0.1", _free_port()), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    service = Service(settings)
    service.start_workers()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service=service), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        while not server.started:
            time.sleep(0.02)
        # The API needs a key even here: the demo makes itself a local admin key.
        token, _ = create_key(service.db, "demo", ["admin"])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as api:
            return _drive(api, service, receiver, fail_at)
    finally:
        server.should_exit = True
        receiver.shutdown()
        service.close()


def _drive(api: httpx.Client, service: Service, receiver: ThreadingHTTPServer,
           fail_at: str | None) -> int:
    hook = f"http://127.0.0.1:{receiver.server_address[1]}"
    for name in CONSUMERS:
        resp = api.post("/consumers", json={"name": name, "dataset": "clickstream",
                                            "url": f"{hook}/{name}"})
        if resp.status_code not in (201, 409):
            console.print(f"[red]consumer registration failed: {resp.text}[/red]")
            return 1
    t0 = time.perf_counter()
    resp = api.post("/sagas", headers={"Idempotency-Key": f"demo-{time.time_ns()}"}, json={
        "dataset": "clickstream", "partition_date": PARTITION,
        "source": {"path": f"clickstream/{PARTITION}/*.ndjson", "format": "json"},
    })
    if resp.status_code != 202:
        console.print(f"[red]POST /sagas → {resp.status_code}: {resp.text}[/red]")
        return 1
    saga_id = resp.json()["id"]
    console.print(f"Submitted saga {saga_id} (POST /sagas → 202); following it with "
                  "GET /sagas/{id}?wait=20")
    saga = resp.json()
    while saga["status"] not in ("succeeded", "compensated", "failed"):
        saga = api.get(f"/sagas/{saga_id}", params={"wait": 20}).json()
    elapsed = time.perf_counter() - t0
    if saga["status"] == "succeeded":
        _wait_for_deliveries(api, saga_id, len(CONSUMERS))
        saga = api.get(f"/sagas/{saga_id}").json()
        _print_success(saga)
    else:
        _print_compensation(saga)
    counts = _lake_counts(service)
    console.print(f"\nLake check (count(*) of partition {PARTITION}): "
                  + ", ".join(f"{layer} {n:,}" for layer, n in counts.items()))
    console.print(f"Saga {saga['status']} in {elapsed:.2f} s end to end; step times: "
                  + ", ".join(f"{s['name']} {s['duration_s']:.2f} s"
                              for s in saga["steps"] if s["duration_s"] is not None))
    expected = "compensated" if fail_at else "succeeded"
    return 0 if saga["status"] == expected and _counts_match(saga, counts) else 1


def _wait_for_deliveries(api: httpx.Client, saga_id: str, expected: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        deliveries = api.get(f"/sagas/{saga_id}").json()["deliveries"]
        if sum(d["status"] == "delivered" for d in deliveries) >= expected:
            return
        time.sleep(0.1)


def _metrics(saga: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s["metrics"] for s in saga["steps"]}


def _print_success(saga: dict[str, Any]) -> None:
    m = _metrics(saga)
    b, s, g = m["ingest_to_bronze"], m["process_to_silver"], m["aggregate_to_gold"]
    console.print("🥉 BRONZE: Ingesting raw data")
    console.print(f"   Source: {saga['source']['path']}")
    console.print(f"   Target: {b['table']}")
    console.print(f"✅ BRONZE complete: {b['records']:,} records from {b['files']} files\n")
    console.print("🥈 SILVER: Processing and cleaning data")
    console.print(f"   Source: {b['table']}")
    console.print(f"   Target: {s['table']}")
    console.print(f"   Duplicates removed: {s['duplicates_removed']:,}")
    console.print(f"   Nulls filled: {s['nulls_filled']:,}")
    console.print(f"   Invalid records removed: {s['invalid_removed']:,}")
    console.print(f"✅ SILVER complete: {s['records']:,} records ({s['retained_pct']}% retained)\n")
    console.print("🥇 GOLD: Aggregating for analytics")
    console.print(f"   Source: {s['table']}")
    console.print(f"   Target: {g['table']}")
    console.print(f"   Aggregations: {g['aggregations']}")
    console.print(f"✅ GOLD complete: {g['aggregated_records']:,} aggregated records\n")
    console.print("📚 Updating data catalog")
    for entry in m["update_catalog"]["partitions_registered"]:
        console.print(f"   Registered: {entry}")
    console.print("✅ Catalog updated with lineage\n")
    console.print("📢 Notifying downstream consumers")
    delivered = sum(d["status"] == "delivered" for d in saga["deliveries"])
    console.print(f"✅ Notified {m['notify_downstream']['consumers_notified']} downstream "
                  f"consumers ({delivered} webhooks delivered)")


def _print_compensation(saga: dict[str, Any]) -> None:
    failed = next((s for s in saga["steps"] if s["status"] == "failed"
                   or (s["error"] and s["compensation"])), None)
    name = failed["name"] if failed else "saga"
    console.print(f"{name} FAILS: {failed['error'] if failed else saga['error']}")
    for step in reversed(saga["steps"]):
        comp = step["compensation"]
        if comp is None:
            continue
        removed = comp["metrics"].get("records_removed")
        what = (f"{removed:,} records removed" if removed
                else comp["metrics"].get("note", "nothing to delete") if removed is None
                else "nothing to delete")
        if "entries_restored" in comp["metrics"]:
            what = f"{comp['metrics']['entries_restored']} catalog entries restored"
        label = _COMPENSATION_NAMES.get(step["name"], step["name"])
        console.print("    ↓")
        console.print(f"{label} (compensation) - {what} ({comp['status']})")
    console.print("    ↓")
    mark = "✅" if saga["status"] == "compensated" else "❌"
    console.print(f"All layers rolled back {mark}  (saga {saga['status']})")
    console.print(f"Notifications sent: {len(saga['deliveries'])}")


#: step -> the name of its compensation, as the saga definition declares it
_COMPENSATION_NAMES = {s.name: s.compensation for s in LakehouseIngestionSaga.steps if s.compensation}


def _lake_counts(service: Service) -> dict[str, int]:
    spec = service.spec("clickstream")
    cur = service.lake.cursor()
    counts = {}
    for layer in LAYERS:
        row = first_row(cur.execute(f"SELECT count(*) FROM {layer_table(spec, layer)} "
                          "WHERE partition_date = CAST(? AS DATE)", [PARTITION]))
        counts[layer] = int(row[0]) if row else 0
    return counts


def _counts_match(saga: dict[str, Any], counts: dict[str, int]) -> bool:
    if saga["status"] != "succeeded":
        return not any(counts.values())
    m = _metrics(saga)
    return counts == {"bronze": m["ingest_to_bronze"]["records"],
                      "silver": m["process_to_silver"]["records"],
                      "gold": m["aggregate_to_gold"]["aggregated_records"]}
