"""API throughput and latency: ``POST /sagas`` and ``GET /sagas/{id}`` under concurrent load on
loopback, against a ``lakesaga serve --no-workers`` subprocess (so the POSTs measure the API, not
the executor), its per-key rate and active-saga limits off.

    python bench/api.py --quick         # SQLite and PostgreSQL, 8 connections, 3 s per phase
    python bench/api.py                 # 1, 8 and 32 connections, 15 s per phase (2 s warm-up)
    python bench/api.py --processes 1,2 # each backend with one API process, then with two

The client is a minimal asyncio HTTP/1.1 keep-alive client (one request in flight per
connection), so that on a small machine it takes as little CPU as possible from the server;
its CPU time and the server's (all of its processes) are reported beside the numbers. Each
POST has its own ``Idempotency-Key`` (as a careful client would send) and names a small source
(one file, hashed at accept time, as every POST does for sources under 256 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


class Connection:
    """One keep-alive HTTP/1.1 connection; ``request`` returns (status, body)."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}",
                 f"Authorization: Bearer {self.token}"]
        if body:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(port: int, token: str, connections: int, warmup_s: float, measure_s: float,
               make_request: Any) -> dict[str, Any]:
    """Run ``connections`` closed loops; latencies and statuses of the measured window."""
    conns = [await Connection(port, token).open() for _ in range(connections)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    bodies: list[bytes] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup_s, start + warmup_s + measure_s

    async def run(conn: Connection, n: int) -> None:
        i = 0
        while True:
            now = loop.time()
            if now >= stop_at:
                return
            method, path, body, headers = make_request(n, i)
            t = time.perf_counter()
            status, payload = await conn.request(method, path, body, headers)
            elapsed = time.perf_counter() - t
            i += 1
            if now >= measure_from:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
                if method == "POST" and status == 202:
                    bodies.append(payload)

    cpu0 = time.process_time()
    await asyncio.gather(*(run(c, n) for n, c in enumerate(conns)))
    cpu = time.process_time() - cpu0
    for c in conns:
        c.close()
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    return {"connections": connections, "seconds": measure_s, "requests": len(latencies),
            "ok": ok, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "req_per_s": ok / measure_s, **harness.latency_summary(latencies),
            "client_cpu_s": cpu, "_bodies": bodies}


def server_cpu_s(proc: Any) -> float:
    """User + system CPU of the server and its child processes (``--processes N``)."""
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(p.cpu_times()[:2])
    return total


def bench_backend(backend: str, processes: int, a: argparse.Namespace,
                  data: dict[str, Any]) -> dict[str, Any]:
    import psutil

    work = harness.fresh_dir(harness.WORK / "api")
    if backend == "postgres":
        url = harness.recreate_pg_database("bench_api")
    else:
        url = f"sqlite:///{work / 'sagas.db'}"
    token = harness.admin_token(url)
    env = harness.lakesaga_env(url, Path(data["source_root"]), work / "lake",
                               rate_limit_per_s=0, max_active_sagas_per_key=0)
    body = json.dumps({"dataset": "clickstream", "partition_date": harness.PARTITION,
                       "source": {"path": f"clickstream/{harness.PARTITION}/*.ndjson",
                                  "format": "json"}}).encode()
    levels = []
    with harness.Server(env, workers=False, processes=processes) as server:
        proc = psutil.Process(server.proc.pid)  # type: ignore[union-attr]
        ids: list[str] = []
        for connections in a.connections:
            def post(n: int, i: int, c: int = connections) -> tuple[str, str, bytes, dict[str, str]]:
                return "POST", "/sagas", body, {"Idempotency-Key": f"bench-{c}-{n}-{i}"}

            cpu0 = server_cpu_s(proc)
            result = asyncio.run(load(server.port, token, connections, a.warmup, a.seconds, post))
            result["server_cpu_s"] = server_cpu_s(proc) - cpu0
            ids += [json.loads(b)["id"] for b in result.pop("_bodies")]
            levels.append({"endpoint": "POST /sagas", **result})
            print(f"  {backend:<8} {processes} proc POST /sagas     {connections:>3} conns "
                  f"{result['req_per_s']:8.1f} "
                  f"req/s  p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms", flush=True)

            rng = random.Random(connections)

            def get(n: int, i: int, r: random.Random = rng,
                    pool: list[str] = ids) -> tuple[str, str, bytes, dict[str, str]]:
                return "GET", f"/sagas/{r.choice(pool)}", b"", {}

            cpu0 = server_cpu_s(proc)
            result = asyncio.run(load(server.port, token, connections, a.warmup, a.seconds, get))
            result["server_cpu_s"] = server_cpu_s(proc) - cpu0
            result.pop("_bodies")
            levels.append({"endpoint": "GET /sagas/{id}", **result})
            print(f"  {backend:<8} {processes} proc GET /sagas/{{id}} {connections:>3} conns "
                  f"{result['req_per_s']:8.1f} "
                  f"req/s  p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms", flush=True)
        peak = server.stop().maxrss_mib
    if backend == "postgres":
        harness.drop_pg_database("bench_api")
    return {"backend": backend, "processes": processes, "levels": levels,
            "server_peak_rss_mib": peak, "sagas_created": len(ids)}


def render(result: dict[str, Any]) -> str:
    rows = []
    for b in result["backends"]:
        for lv in b["levels"]:
            rows.append([b["backend"], b.get("processes", 1), lv["endpoint"], lv["connections"],
                         lv["req_per_s"],
                         lv["p50_ms"], lv["p99_ms"], lv["requests"] - lv["ok"],
                         lv["server_cpu_s"] / lv["seconds"], lv["client_cpu_s"] / lv["seconds"]])
    return harness.table(["saga db", "API processes", "endpoint", "connections", "req/s",
                          "p50 ms", "p99 ms",
                          "non-2xx", "server CPU (cores)", "client CPU (cores)"], rows)


def main() -> None:
    harness.ensure_bench_python()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 connections, 3 s per phase")
    p.add_argument("--connections", help="comma-separated levels (default 1,8,32)")
    p.add_argument("--seconds", type=float, help="measured seconds per phase (default 15)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds first (default 2)")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--processes", default="1",
                   help="comma-separated `lakesaga serve --processes` values to run (e.g. 1,2)")
    p.add_argument("--source-records", type=int, default=1000,
                   help="records in the one source file each POST names (hashed at accept)")
    a = p.parse_args()
    a.connections = [int(x) for x in (a.connections or ("8" if a.quick else "1,8,32")).split(",")]
    a.seconds = a.seconds or (3.0 if a.quick else 15.0)
    a.warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0)
    from pipeline import ensure_data

    harness.print_header("API (POST /sagas, GET /sagas/{id})", a.quick)
    data = ensure_data(a.source_records, 1)
    print(f"source: {a.source_records:,} records, one file of {data['bytes'] / 1024:,.0f} KiB")
    backends = [bench_backend(b, int(n), a, data) for b in a.backends.split(",")
                for n in a.processes.split(",")]
    result = {"source_bytes": data["bytes"], "source_records": a.source_records,
              "backends": backends}
    path = harness.write_result("api", a.quick, result)
    print()
    print(render(result))
    print(f"\nwritten {path.relative_to(harness.ROOT)}")


if __name__ == "__main__":
    main()
