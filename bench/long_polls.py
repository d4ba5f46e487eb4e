"""What idle long polls cost the API process: N requests ``GET /sagas/{id}?wait=60`` from one
key on a saga that does not change, while another key probes ``GET /datasets``.

    python bench/long_polls.py                 # 800 waiters, 10 s measured, SQLite
    python bench/long_polls.py --quick         # 100 waiters, 3 s
    PYTHONPATH=/tmp/old python bench/long_polls.py --label "before (51d1942)"

A ``lakesaga serve --no-workers`` subprocess (so the saga stays pending and nothing changes)
serves a fresh SQLite saga database under ``var/bench/long_polls``. The script opens the waits
with httpx's async client and lets them settle (until the server is idle, at most 15 s). Then it
measures, over ``--seconds`` each: the server's CPU time (user + system, from
``/proc/<pid>/stat``) with nothing but the waits (``quiet_server_cpu_share``), then that CPU and
the latency of a sequential ``GET /datasets`` by a second key (one every 20 ms). The same probe
runs first with no waiter, as the baseline (``idle_server_cpu_share``). Needs only the
project's venv (no ``.venv-bench``). To measure another commit, put its source first on the
path (``git archive <commit> app migrations alembic.ini | tar -x -C /tmp/old``; the server
inherits the environment) and give the run a ``--label``: each label's latest run is kept in
``bench/results/long_polls.json`` and rendered side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def probe(client: Any, seconds: float) -> list[float]:
    """Sequential ``GET /datasets`` for ``seconds``, one every 20 ms: each one's latency."""
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        resp = await client.get("/datasets")
        latencies.append(time.monotonic() - started)
        assert resp.status_code == 200, resp.text
        await asyncio.sleep(0.02)
    return latencies


async def settle(pid: int, limit_s: float = 15.0) -> None:
    """Until the server spends under 5 % of a core for half a second (at most ``limit_s``; the
    waits of the old code never let it)."""
    await asyncio.sleep(1)
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        before = cpu_s(pid)
        await asyncio.sleep(0.5)
        if cpu_s(pid) - before < 0.025:
            return


async def measure(server: harness.Server, waiter_token: str, probe_token: str, saga_id: str,
                  waiters: int, seconds: float) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=waiters + 10, max_keepalive_connections=waiters + 10)
    pid = server.proc.pid if server.proc else 0
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120,
                                 headers={"Authorization": f"Bearer {waiter_token}"}) as waits, \
            httpx.AsyncClient(base_url=server.url, timeout=30,
                              headers={"Authorization": f"Bearer {probe_token}"}) as probes:
        before = cpu_s(pid)
        baseline = await probe(probes, min(seconds, 5))
        idle_cpu = (cpu_s(pid) - before) / min(seconds, 5)
        tasks = [asyncio.create_task(waits.get(f"/sagas/{saga_id}", params={"wait": 60}))
                 for _ in range(waiters)]
        await settle(pid)  # connections open, requests in, their first reads done
        early = [t.result().status_code for t in tasks if t.done()]
        before, started = cpu_s(pid), time.monotonic()
        await asyncio.sleep(seconds)  # nothing but the waits
        quiet_spent, quiet_took = cpu_s(pid) - before, time.monotonic() - started
        before, started = cpu_s(pid), time.monotonic()
        loaded = await probe(probes, seconds)
        spent, took = cpu_s(pid) - before, time.monotonic() - started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"waiters": waiters, "answered_early": len(early),
            "early_statuses": sorted(set(early)), "seconds": took,
            "server_cpu_s": spent, "server_cpu_share": spent / took,
            "quiet_server_cpu_s": quiet_spent,
            "idle_server_cpu_share": idle_cpu, "quiet_server_cpu_share": quiet_spent / quiet_took,
            "datasets_idle": harness.latency_summary(baseline),
            "datasets_with_waiters": harness.latency_summary(loaded)}


def render(result: dict[str, Any]) -> str:
    rows = []
    for label, r in result["runs"].items():
        idle, loaded = r["datasets_idle"], r["datasets_with_waiters"]
        rows.append([label, r["waiters"], f"{r['quiet_server_cpu_s']:.2f}",
                     f"{r['quiet_server_cpu_share']:.3f}", f"{r['idle_server_cpu_share']:.3f}",
                     f"{idle['p50_ms']:.1f} / {idle['p99_ms']:.1f} / {idle['max_ms']:.1f}",
                     f"{loaded['p50_ms']:.1f} / {loaded['p99_ms']:.1f} / {loaded['max_ms']:.1f}"])
    return harness.table(["code", "waiters", "server CPU s in the quiet window",
                          "server cores, waits only", "server cores, probe only (no waits)",
                          "GET /datasets p50/p99/max ms, no waits",
                          "GET /datasets p50/p99/max ms, with the waits"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--waiters", type=int, default=None, help="default 800 (--quick: 100)")
    p.add_argument("--seconds", type=float, default=None, help="default 10 (--quick: 3)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--label", default="this commit", help="name of the code measured")
    a = p.parse_args()
    a.waiters = a.waiters or (100 if a.quick else 800)
    a.seconds = a.seconds or (3.0 if a.quick else 10.0)

    import httpx

    from app import __file__ as app_file
    from app.auth import create_key
    from app.db.session import Database
    from app.lakehouse.generator import generate_clickstream

    harness.print_header(f"Long polls ({a.waiters} idle waiters)", a.quick)
    work = harness.fresh_dir(harness.WORK / "long_polls")
    url = f"sqlite:///{work / 'lakesaga.db'}"
    generate_clickstream(work / "raw" / "clickstream" / harness.PARTITION, records=100, files=1)
    waiter_token = harness.admin_token(url)
    db = Database(url)
    probe_token = create_key(db, "probe", ["read"])[0]
    db.dispose()
    env = harness.lakesaga_env(url, work / "raw", work / "lake", rate_limit_per_s=0,
                               max_waits=a.waiters + 10, max_waits_per_key=a.waiters + 10)
    with harness.Server(env, workers=False) as server:
        saga = httpx.post(f"{server.url}/sagas", timeout=30, json={
            "dataset": "clickstream", "partition_date": harness.PARTITION,
            "source": {"path": f"clickstream/{harness.PARTITION}/*.ndjson", "format": "json"}},
            headers={"Authorization": f"Bearer {waiter_token}"})
        assert saga.status_code == 202, saga.text
        run = asyncio.run(measure(server, waiter_token, probe_token, saga.json()["id"],
                                  a.waiters, a.seconds))
    run["app"] = str(Path(app_file).parent)
    previous = harness.result_path("long_polls", a.quick)
    runs = json.loads(previous.read_text())["runs"] if previous.exists() else {}
    result = {"runs": {**runs, a.label: run}}
    path = harness.write_result("long_polls", a.quick, result)
    print(json.dumps(run, indent=2))
    print(render(result))
    print(f"\nwrote {path.relative_to(harness.ROOT)}")


if __name__ == "__main__":
    main()
