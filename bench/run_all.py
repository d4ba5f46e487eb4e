"""Run every benchmark, then render docs/BENCHMARKS.md from their JSON results.

    python bench/run_all.py                 # full run (13 to 26 min on 2 cores) -> docs/BENCHMARKS.md
    python bench/run_all.py --quick         # smoke run; renders bench/results/BENCHMARKS.quick.md only
    python bench/run_all.py --render-only   # re-render docs/BENCHMARKS.md from bench/results/*.json
    python bench/run_all.py --only api,orchestration

Smoke numbers never reach docs/: quick results are written as ``*.quick.json`` and rendered
beside them. Run the full benchmark on a quiet machine: every result records the load average
before it started, and the rendered page shows it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

DOC = harness.ROOT / "docs" / "BENCHMARKS.md"


def steps(quick: bool) -> list[tuple[str, list[str]]]:
    q = ["--quick"] if quick else []
    memlimit = (["--sizes", "145231x25", "--memory-limit", "1GB", "--threads", "2", "--runs", "1"]
                if quick else
                ["--sizes", "10000000x25", "--memory-limit", "2GB", "--threads", "2", "--runs", "1",
                 "--warmup", "0"])
    return [
        ("pipeline", ["pipeline.py", *q]),
        ("pipeline-memlimit", ["pipeline.py", *q, *memlimit, "--name", "pipeline-memlimit"]),
        ("orchestration", ["orchestration.py", *q, "--profile"]),
        ("api", ["api.py", *q, "--processes", "1,2"]),
        ("long_polls", ["long_polls.py", *q]),
        ("claim", ["claim.py", *q]),
    ]


def load(name: str, quick: bool) -> dict[str, Any] | None:
    path = harness.result_path(name, quick)
    return json.loads(path.read_text()) if path.exists() else None


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _within_latency(level: dict[str, Any]) -> bool:
    """A load level whose p99 is at most 50 ms and whose every answer was a 2xx (fast errors
    must not lower a p99)."""
    return (level["p99_ms"] is not None and level["p99_ms"] <= 50
            and level["ok"] == level["requests"])


def targets(pipe: dict[str, Any] | None, mem: dict[str, Any] | None,
            orch: dict[str, Any] | None, api: dict[str, Any] | None) -> list[list[Any]]:
    rows: list[list[Any]] = []
    sizes = {s["records"]: s for s in (pipe or {}).get("sizes", [])}
    for records, limit in ((145_231, 1.3), (10_000_000, 1.10)):
        s = sizes.get(records)
        ratio = s["ratio_e2e_vs_pipeline"] if s else None
        rows.append([f"saga e2e / plain SQL at {records:,} records", f"<= {limit:.2f}x", _x(ratio),
                     verdict(ratio <= limit if ratio else None)])
    for records, s in sorted(sizes.items()):
        rss = s["ratio_peak_rss"]
        rows.append([f"peak RSS saga / plain at {records:,} records", "<= 1.20x", _x(rss),
                     verdict(rss <= 1.2 if rss else None)])
    for s in (mem or {}).get("sizes", []):
        rows.append([f"saga within memory_limit {s['memory_limit']} at {s['records']:,} records",
                     "peak RSS <= limit", f"{s['saga']['peak_rss_mib']:,.0f} MiB",
                     verdict(s["saga_within_memory_limit"])])
    configs = (orch or {}).get("configs", [])

    def rate(engine: str, storage: str, procs: int, in_flight: int | None = None,
             ) -> float | None:
        """The configuration's sagas/s; by default the main one (the most sagas in flight)."""
        found = [c for c in configs if c["engine"] == engine and c["storage"] == storage
                 and c["procs"] == procs
                 and (in_flight is None or c["concurrency"] == in_flight)]
        best = max(found, key=lambda c: c["concurrency"], default=None)
        return None if best is None else float(best["sagas_per_s"])

    for in_flight, label in ((None, ""), (1, ", 1 saga in flight")):
        lk_sqlite = rate("lakesaga", "sqlite", 1, in_flight)
        sagaz = rate("sagaz", "sqlite (as shipped)", 1, in_flight)
        if in_flight is not None and not (lk_sqlite and sagaz):
            continue  # results from before the one-in-flight rows
        rows.append([f"no-op saga/s, lakesaga SQLite vs sagaz SQLite (1 process{label})",
                     "> 1.00x", _x(lk_sqlite / sagaz if lk_sqlite and sagaz else None),
                     verdict(lk_sqlite > sagaz if lk_sqlite and sagaz else None)])
    for procs in (1, 4):
        lk_pg, dbos = rate("lakesaga", "postgres", procs), rate("dbos", "postgres", procs)
        rows.append([f"no-op saga/s, lakesaga / dbos on PostgreSQL ({procs} worker process"
                     f"{'es' if procs > 1 else ''})", ">= 0.50x",
                     _x(lk_pg / dbos if lk_pg and dbos else None),
                     verdict(lk_pg / dbos >= 0.5 if lk_pg and dbos else None)])
    lk_pg1 = rate("lakesaga", "postgres", 1)
    rows.append(["no-op saga/s, lakesaga PostgreSQL, 1 worker process", ">= 300/s",
                 harness.fmt(lk_pg1, 1), verdict(lk_pg1 >= 300 if lk_pg1 else None)])
    for b in (api or {}).get("backends", []):
        procs = b.get("processes", 1)
        where = f"{b['backend']}, {procs} API process{'es' if procs > 1 else ''}"
        posts = [lv for lv in b["levels"] if lv["endpoint"] == "POST /sagas"]
        gets = [lv for lv in b["levels"] if lv["endpoint"] == "GET /sagas/{id}"]
        # The POST target is a throughput at a latency: the fastest level within it, if any
        # is; else the fastest level, which then fails.
        within = [lv for lv in posts if _within_latency(lv)] or posts
        best_post = max(within, key=lambda lv: lv["req_per_s"], default=None)
        best_get = max(gets, key=lambda lv: lv["req_per_s"], default=None)
        if best_post:
            ok = best_post["req_per_s"] >= 500 and _within_latency(best_post)
            rows.append([f"POST /sagas ({where}), fastest level within the p99",
                         ">= 500 req/s, p99 <= 50 ms",
                         f"{best_post['req_per_s']:,.0f} req/s, p99 {best_post['p99_ms']:.0f} ms "
                         f"({best_post['connections']} conns)", verdict(ok)])
        if best_get:
            rows.append([f"GET /sagas/{{id}} ({where}), fastest level", ">= 1,000 req/s",
                         f"{best_get['req_per_s']:,.0f} req/s ({best_get['connections']} conns)",
                         verdict(best_get["req_per_s"] >= 1000)])
    return rows


def machine_section(results: list[dict[str, Any]]) -> str:
    m = results[0]["machine"]
    pk = m["packages"]
    lines = [
        f"- CPU: {m['cpu_model']}, {m['cpus_usable']} usable cores ({m['cpus_online']} online); "
        f"RAM {m['ram_gib']} GiB; Linux {m['kernel']}",
        f"- Python {m['python']}, DuckDB {pk.get('duckdb')}, PostgreSQL {m['postgresql']}, "
        f"SQLAlchemy {pk.get('sqlalchemy')}, psycopg {pk.get('psycopg')}, FastAPI "
        f"{pk.get('fastapi')}, uvicorn {pk.get('uvicorn')} (httptools {pk.get('httptools')}, "
        f"uvloop {pk.get('uvloop')}); peers: sagaz {pk.get('sagaz')} "
        f"(aiosqlite {pk.get('aiosqlite')}), dbos {pk.get('dbos')}",
        "- lakesaga commit measured: " + "; ".join(
            f"{r['benchmark']} {r['machine']['git_commit']}"
            + (" (with uncommitted changes under app/)" if r["machine"]["app_dirty"] else "")
            for r in results),
        "- load average (1/5/15 min) before each benchmark: " + "; ".join(
            f"{r['benchmark']} {', '.join(f'{x:.2f}' for x in r['machine']['loadavg'])}"
            for r in results),
        f"- Python speed before each benchmark ({harness.LOOP_ITERATIONS:,} iterations of "
        "`total += i`, best of 3; compare hosts with it, lower is faster): " + "; ".join(
            f"{r['benchmark']} {r['machine'].get('python_loop_s', float('nan')):.2f} s"
            for r in results),
    ]
    return "\n".join(lines)


def render(quick: bool) -> str:
    import api
    import claim
    import long_polls
    import orchestration
    import pipeline

    pipe, mem = load("pipeline", quick), load("pipeline-memlimit", quick)
    orch, api_result = load("orchestration", quick), load("api", quick)
    present = [r for r in (pipe, mem, orch, api_result) if r]
    if not present:
        raise SystemExit("no results to render: run the benchmarks first")
    out = ["# Benchmarks", ""]
    if quick:
        out += ["> **Smoke run (`--quick`), on a machine shared with other work: these numbers "
                "only show that the harness runs. They are not results.**", ""]
    out += [
        "Measured by the scripts in `bench/` (see `bench/README.md` for what each one measures "
        "and how). Ratios compare two things measured in the same run, alternating.", "",
        "## Machine", "", machine_section(present), "",
        "## Targets", "",
        harness.table(["target", "goal", "measured", "verdict"],
                      targets(pipe, mem, orch, api_result)), "",
    ]
    if pipe:
        out += ["## Pipeline vs the physical limit", "",
                f"Catalog: DuckLake on {pipe['catalog']} (both sides). Medians of "
                f"{', '.join(str(s['runs']) for s in pipe['sizes'])} alternating runs per size "
                "after warm-up. *plain SQL* = the plain script's three lake transactions; *plain "
                "script* adds its connect/attach and CREATE TABLEs (the saga server attaches and "
                "creates its tables before the POST). *saga e2e* = POST /sagas until a long poll "
                "(`GET /sagas/{id}?wait=30`, answered as soon as the saga changes) sees "
                "`succeeded`. Peak RSS = each process's own `ru_maxrss`; "
                "*idle RSS* = the process's RSS before its pipeline: the saga server's before the "
                "POST (the service itself: FastAPI, SQLAlchemy, DuckDB with the lake attached), "
                "the plain script's after its attach and DDL. *RSS above idle ratio* = (saga "
                "peak - saga idle) / (plain peak - plain idle): the pipeline's working memory on "
                "each side. The target is judged on the peak ratio.",
                "", pipeline.render(pipe), ""]
        for s in pipe["sizes"]:
            out.append(f"- {s['records']:,} records in {s['files']} files: "
                       f"{s['input_bytes'] / 2**20:,.0f} MiB of NDJSON (generated in "
                       f"{s['generate_s']} s); counts identical on both sides: "
                       f"{'yes' if s['same_counts'] else 'NO'}")
        out.append("")
    if mem:
        s = mem["sizes"][0]
        out += ["## Memory limit", "",
                f"`LAKESAGA_DUCKDB_MEMORY_LIMIT={s['memory_limit']}`, "
                f"`LAKESAGA_DUCKDB_THREADS={s['threads']}`: the saga worker's process budget, "
                "of which DuckDB gets the budget less a quarter. The plain script's DuckDB gets "
                "`memory_limit` of the whole value and the same `threads`.", "",
                pipeline.render(mem), "",
                f"Saga worker peak RSS {s['saga']['peak_rss_mib']:,.0f} MiB against a limit of "
                f"{s['memory_limit']}: {verdict(s['saga_within_memory_limit'])}.", ""]
    if orch:
        out += ["## Orchestration overhead", "",
                "A 5-step saga whose steps do nothing. *transition* = one persisted transition: "
                "for lakesaga one StepLog write (the claim with the first step's start, a "
                "step's success with the next step's start or, after the last, the saga's success; "
                "each its own transaction with its event rows), for sagaz one "
                "`save_saga_state`, for dbos one step call (its output recorded). *saga* = one "
                "saga's time in the worker. lakesaga sagas are created beforehand (creation "
                "rate in the last column) and claimed by the workers; sagaz *as shipped* persists "
                "a saga at its start and end only, *per-step* adds a listener that upserts it "
                "after every step. The rows with one saga in flight (one thread, one task) give "
                "each engine's own cost per saga, without interleaving. *sqlite3 (floor)*: the "
                "statements and transactions of the lakesaga row above it, recorded as its "
                "driver got them in an unmeasured run and replayed on a copy of the same log by "
                "Python's sqlite3 alone (no SQLAlchemy, no engine): what lakesaga's writes cost "
                "SQLite itself; its *transition* is one transaction.", "",
                orchestration.render(orch), ""]
        floor = orchestration.floor_share(orch)
        if floor:
            out += [floor, ""]
        for backend, path in orch.get("profiles", {}).items():
            out.append(f"- profile of one lakesaga worker (1 thread) on {backend}: `{path}`")
        out.append("")
    if api_result:
        out += ["## API", "",
                "`lakesaga serve --no-workers [--processes N]`, rate and active-saga limits off "
                "(`LAKESAGA_RATE_LIMIT_PER_S=0`, `LAKESAGA_MAX_ACTIVE_SAGAS_PER_KEY=0`), log level "
                "WARNING. Each POST names one source file of "
                f"{api_result['source_bytes'] / 1024:,.0f} KiB (hashed at accept) and sends its own "
                "Idempotency-Key; GETs read random sagas created by the POSTs. Server and client "
                "CPU are in cores (CPU seconds per second). A POST on PostgreSQL is a transaction "
                "that takes its partition's advisory lock (and, with the active-saga limit on, the "
                "default, 100, its key's lock and a count) before the insert. The POST target is met by the "
                "fastest level whose p99 is within 50 ms and whose answers were all 2xx.", "",
                api.render(api_result), ""]
    polls = load("long_polls", quick)
    if polls:
        out += ["## Long polls", "", LONG_POLLS_TEXT, "", long_polls.render(polls), ""]
    claims = [r for r in (load("claim", quick), load("claim-before", quick)) if r]
    if claims:
        out += ["## Claim cost with sagas queued behind a busy partition", "",
                "`bench/claim.py`: `StepLog.claim_next` in one thread, with 0 and with N pending "
                "sagas queued behind one running saga of the same partition. *idle*: nothing is "
                "claimable (the claim finds nothing); *take*: one saga of another partition, "
                "created after the queued ones, is claimed (with its first step's start). "
                "*ratio*: p50 over the p50 with nothing queued, same backend.", ""]
        for result in claims:
            out += [f"{result['label']} (`{result['command']}`):", "", claim.render(result), ""]
    out += ["## Reproduce", "", "```bash",
            "make bench                                # creates .venv-bench, runs everything, "
            "renders this page",
            "python3 bench/run_all.py                  # the same, once .venv-bench exists"]
    out += [r["command"] for r in present]
    out += ["```", ""]
    return "\n".join(out)


LONG_POLLS_TEXT = (
    "`bench/long_polls.py`: `lakesaga serve --no-workers` on SQLite, one key holding N "
    "`GET /sagas/{id}?wait=60` on a pending saga that does not change, a second key probing "
    "`GET /datasets` one request every 20 ms. *waits only* = server CPU (cores) over 10 s with "
    "nothing but the waits open (after they settled); *probe only* = the same probe with no "
    "wait open. Earlier code is measured with its source first on `PYTHONPATH` and a `--label`.")


def main() -> None:
    harness.ensure_bench_python()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    p.add_argument("--only", help="comma-separated subset: " + ", ".join(n for n, _ in steps(False)))
    p.add_argument("--render-only", action="store_true", help="render from existing results")
    a = p.parse_args()
    failed = []
    if not a.render_only:
        wanted = set(a.only.split(",")) if a.only else None
        for name, argv in steps(a.quick):
            if wanted and name not in wanted:
                continue
            print(f"\n=== {name}: python bench/{' '.join(argv)}", flush=True)
            code = subprocess.run([sys.executable, str(harness.BENCH / argv[0]), *argv[1:]],  # noqa: S603
                                  cwd=harness.ROOT).returncode
            if code != 0:
                failed.append(name)
    target = harness.RESULTS / "BENCHMARKS.quick.md" if a.quick else DOC
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(a.quick))
    print(f"\nrendered {target.relative_to(harness.ROOT)}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
