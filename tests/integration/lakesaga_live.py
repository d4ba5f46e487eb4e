"""Live-server helpers for the API integration tests (imported by conftest and the tests)."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import func, select

from app.db.models import CatalogPartitionRow, ConsumerRow, OutboxRow, SagaEventRow, SagaRow, SagaStepRow
from app.lakehouse.generator import GeneratedDataset, generate_clickstream
from app.logs import uvicorn_log_config
from app.main import create_app
from app.service import Service
from app.settings import Settings

PARTITION = "2026-01-06"
TERMINAL = ("succeeded", "compensated", "failed")
LAYER_TABLES = {
    "bronze": "lake.bronze.raw_clickstream",
    "silver": "lake.silver.cleaned_clickstream",
    "gold": "lake.gold.clickstream_metrics",
}
SAGA_TABLES = {"sagas": SagaRow, "saga_steps": SagaStepRow, "saga_events": SagaEventRow,
               "outbox": OutboxRow, "catalog_partitions": CatalogPartitionRow,
               "consumers": ConsumerRow}


@dataclass
class Live:
    """One running server: its HTTP client, the in-process service and its settings."""

    client: httpx.Client
    service: Service
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread
    #: The admin API key the client sends.
    token: str = ""
    stopped: bool = False

    @property
    def source_root(self) -> Path:
        return self.settings.source_root

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.service.watch.close()  # what a SIGTERM does: uvicorn waits for open requests
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.client.close()
        self.service.close()

    # -- helpers the tests share ---------------------------------------------------------------

    def generate(self, name: str = PARTITION, *, records: int = 2000, files: int = 3, seed: int = 42,
                 partition_date: str = PARTITION) -> GeneratedDataset:
        """Generate a clickstream file set under ``source_root/clickstream/<name>``."""
        return generate_clickstream(self.source_root / "clickstream" / name, records=records,
                                    files=files, seed=seed,
                                    partition_date=date.fromisoformat(partition_date))

    def submit(self, *, path: str = f"clickstream/{PARTITION}/*.ndjson",
               partition_date: str = PARTITION, key: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.client.post("/sagas", headers=headers, json={
            "dataset": "clickstream", "partition_date": partition_date,
            "source": {"path": path, "format": "json"},
        })

    def wait(self, saga_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Follow the saga with long polls (GET /sagas/{id}?wait=) until it is at rest."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            resp = self.client.get(f"/sagas/{saga_id}", params={"wait": max(0.0, min(left, 10))})
            assert resp.status_code == 200, resp.text
            saga = resp.json()
            if saga["status"] in TERMINAL:
                return saga
            if left <= 0:
                raise AssertionError(f"saga {saga_id} not terminal after {timeout} s: {saga}")

    def wait_deliveries(self, saga_id: str, expected: int, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            saga = self.client.get(f"/sagas/{saga_id}").json()
            if sum(d["status"] == "delivered" for d in saga["deliveries"]) >= expected:
                return saga
            if time.monotonic() > deadline:
                raise AssertionError(f"deliveries of {saga_id} not done: {saga['deliveries']}")
            time.sleep(0.05)

    def lake_query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one query on the service's lake through a cursor of our own, closed at once (an
        idle cursor left open keeps its DuckLake catalog connection, which would lock out the
        next server on the same SQLite catalog)."""
        with closing(self.service.lake.con.cursor()) as cur:
            return cur.execute(sql, params or []).fetchall()

    def lake_count(self, layer: str, partition_date: str = PARTITION) -> int:
        rows = self.lake_query(
            f"SELECT count(*) FROM {LAYER_TABLES[layer]} WHERE partition_date = CAST(? AS DATE)",
            [partition_date])
        return int(rows[0][0])

    def lake_rows(self, layer: str, partition_date: str = PARTITION) -> list[tuple[Any, ...]]:
        return self.lake_query(
            f"SELECT * FROM {LAYER_TABLES[layer]} WHERE partition_date = CAST(? AS DATE) "
            "ORDER BY ALL", [partition_date])

    def table_counts(self) -> dict[str, int]:
        """Rows in each saga-database table (sagas, steps, events, outbox, catalog, consumers)."""
        with self.service.db.sessions() as s:
            return {name: int(s.scalar(select(func.count()).select_from(model)) or 0)
                    for name, model in SAGA_TABLES.items()}


def serve(service: Service) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_app(service=service), host="127.0.0.1",
                                           port=port, log_level="warning",
                                           log_config=uvicorn_log_config()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return server, thread, port


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.requests)


class TricklingReceiver:
    """A webhook receiver that answers one byte every ``interval_s``: a status line and headers
    that never end, each read arriving well within any per-read timeout. Counts connections."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/slow"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name="trickler", daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._trickle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)  # the request (headers and a small body)
            for byte in b"HTTP/1.1 200 OK\r\n" + b"x-slow: " + b"." * 10_000:
                if self._stop.wait(self.interval_s):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:  # the client gave up
                    return

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._sock.close()
