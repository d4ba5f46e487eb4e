"""Pipeline vs the physical limit: the clickstream Bronze -> Silver -> Gold SQL as a plain
DuckDB + DuckLake script, against a lakesaga saga submitted over HTTP, on the same files and the
same DuckLake catalog kind, alternating runs; medians, ratios, peak RSS and the per-step times.

    python bench/pipeline.py --quick                 # 145,231 records, 2 runs each (smoke)
    python bench/pipeline.py                         # 145,231 and 10,000,000 records (25 files)
    python bench/pipeline.py --sizes 10000000x25 --memory-limit 2GB --threads 2 --name pipeline-memlimit

Each side runs in its own process (a fresh ``lakesaga serve`` with its executor, or a fresh
``python bench/pipeline.py _plain``) on a fresh lake, so each process's own ``ru_maxrss`` is its
peak RSS. The saga's time is observed by the client: POST /sagas, then long polls
(``GET /sagas/{id}?wait=30``, answered as soon as the saga changes) until ``succeeded``. The
plain script's time is its three lake transactions (the saga server has the lake attached and
the tables created before the POST, so attach and DDL are reported apart).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

DATASET = "clickstream"
#: (name, type, fill) of the clickstream spec, in order (app/lakehouse/datasets/clickstream.yaml).
COLUMNS = [
    ("event_id", "VARCHAR", None), ("user_id", "VARCHAR", None), ("session_id", "VARCHAR", None),
    ("event_type", "VARCHAR", None), ("page_url", "VARCHAR", "/"),
    ("referrer", "VARCHAR", "direct"), ("device", "VARCHAR", "unknown"),
    ("country", "VARCHAR", "ZZ"), ("event_ts", "TIMESTAMP", None), ("duration_ms", "BIGINT", 0),
]
#: Each GET /sagas/{id} waits up to this long for the saga to change (long polling).
WAIT_S = 30


# ---------------------------------------------------------------------------------------------
# The plain script: what a data engineer would write by hand with the same SQL as lakesaga
# (app/lakehouse/bronze.py, silver.py, gold.py, tables.py at the time of writing). It imports
# nothing from the app, so its RSS is DuckDB's plus a bare interpreter's.
# ---------------------------------------------------------------------------------------------

BRONZE = 'lake."bronze"."raw_clickstream"'
SILVER = 'lake."silver"."cleaned_clickstream"'
GOLD = 'lake."gold"."clickstream_metrics"'

DDL = [
    'CREATE SCHEMA IF NOT EXISTS lake."bronze"',
    'CREATE SCHEMA IF NOT EXISTS lake."silver"',
    'CREATE SCHEMA IF NOT EXISTS lake."gold"',
    f"CREATE TABLE IF NOT EXISTS {BRONZE} (\"partition_date\" DATE, "
    + ", ".join(f'"{c}" VARCHAR' for c, _, _ in COLUMNS)
    + ', "_batch_id" VARCHAR, "_source_file" VARCHAR, "_ingested_at" TIMESTAMP)',
    f"ALTER TABLE {BRONZE} SET PARTITIONED BY (partition_date)",
    f"CREATE TABLE IF NOT EXISTS {SILVER} (\"partition_date\" DATE, "
    + ", ".join(f'"{c}" {t}' for c, t, _ in COLUMNS)
    + ', "_batch_id" VARCHAR, "_source_file" VARCHAR, "_saga_id" VARCHAR)',
    f"ALTER TABLE {SILVER} SET PARTITIONED BY (partition_date)",
    f'CREATE TABLE IF NOT EXISTS {GOLD} ("partition_date" DATE, "aggregation" VARCHAR, '
    '"dimension" VARCHAR, "metric" VARCHAR, "value" DOUBLE, "_saga_id" VARCHAR)',
    f"ALTER TABLE {GOLD} SET PARTITIONED BY (partition_date)",
]

BRONZE_INSERT = (
    f"INSERT INTO {BRONZE} SELECT CAST($partition_date AS DATE), "
    + ", ".join(f'CAST("{c}" AS VARCHAR)' for c, _, _ in COLUMNS)
    + ", $batch_id, replace(_source_path, $prefix, ''), now()::TIMESTAMP "
    "FROM read_json($files, format='newline_delimited', columns=$columns, "
    "filename='_source_path')"
)

_CAST_FAILED = " OR ".join(f'("{c}" IS NOT NULL AND TRY_CAST("{c}" AS {t}) IS NULL)'
                           for c, t, _ in COLUMNS)
_TYPED = ", ".join(f'TRY_CAST("{c}" AS {t}) AS "{c}"' for c, t, _ in COLUMNS)
_FILLED = ", ".join(f'coalesce("{c}", CAST($fill_{i} AS {t})) AS "{c}"' if f is not None
                    else f'"{c}"' for i, (c, t, f) in enumerate(COLUMNS))
_NULLS = " + ".join(f'CAST("{c}" IS NULL AS INTEGER)' for c, _, f in COLUMNS if f is not None)
STAGING = f"""
WITH raw AS (
    SELECT *, ({_CAST_FAILED}) AS _cast_failed,
           CASE WHEN "event_id" IS NOT NULL THEN row_number() OVER (
               PARTITION BY "event_id" ORDER BY _ingested_at, _batch_id, _source_file) END AS _copy
    FROM {BRONZE} WHERE partition_date = CAST($partition_date AS DATE)
), typed AS (
    SELECT {_TYPED}, _batch_id, _source_file, _cast_failed, _copy FROM raw
), filled AS (
    SELECT {_FILLED}, _batch_id, _source_file, coalesce(_copy > 1, FALSE) AS _duplicate,
           _cast_failed OR "event_id" IS NULL OR "user_id" IS NULL OR "event_type" IS NULL
               OR "event_ts" IS NULL AS _unusable,
           {_NULLS} AS _nulls
    FROM typed
)
SELECT * EXCLUDE (_unusable), _unusable OR NOT (
    coalesce((event_type IN ('page_view', 'click', 'add_to_cart', 'checkout', 'purchase',
                             'search')), FALSE)
    AND coalesce((CAST(event_ts AS DATE) = CAST($partition_date AS DATE)), FALSE)
    AND coalesce((duration_ms >= 0), FALSE)) AS _invalid
FROM filled
"""
STAGING_PARAMS = {f"fill_{i}": f for i, (_, _, f) in enumerate(COLUMNS) if f is not None}

_SILVER_PART = f"(SELECT * FROM {SILVER} WHERE partition_date = CAST($partition_date AS DATE))"
AGGREGATIONS = [
    ("daily_event_counts", "SELECT event_type AS dimension, 'events' AS metric, count(*) AS value "
     "FROM {silver} GROUP BY event_type"),
    ("hourly_user_activity", "SELECT lpad(CAST(hour(event_ts) AS VARCHAR), 2, '0') AS dimension, "
     "'active_users' AS metric, count(DISTINCT user_id) AS value FROM {silver} GROUP BY 1"),
    ("page_popularity", "SELECT page_url AS dimension, 'views' AS metric, count(*) AS value "
     "FROM {silver} GROUP BY page_url"),
    ("device_country_sessions", "SELECT device || '/' || country AS dimension, 'sessions' AS "
     "metric, count(DISTINCT session_id) AS value FROM {silver} GROUP BY device, country"),
]
GOLD_INSERT = (
    f"INSERT INTO {GOLD} SELECT CAST($partition_date AS DATE), aggregation, dimension, metric, "
    "value, $batch_id FROM ("
    + " UNION ALL ".join(
        f"SELECT CAST($aggregation_{i} AS VARCHAR) AS aggregation, CAST(dimension AS VARCHAR) "
        "AS dimension, CAST(metric AS VARCHAR) AS metric, CAST(value AS DOUBLE) AS value "
        f"FROM ({sql.replace('{silver}', _SILVER_PART)})"
        for i, (_, sql) in enumerate(AGGREGATIONS))
    + ")"
)


def _extension(con: Any, name: str, module: str) -> None:
    """LOAD from the pinned ``duckdb-extension-*`` wheel, as lakesaga does (no network)."""
    import importlib.util

    import duckdb

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations, f"{module} is not installed"
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    con.execute(f"LOAD '{path}'")


def plain_main(argv: list[str]) -> None:
    """The plain script (run as ``pipeline.py _plain``): prints its timings and counts as JSON."""
    p = argparse.ArgumentParser(prog="pipeline.py _plain")
    p.add_argument("--source-dir", type=Path, required=True)
    p.add_argument("--lake-dir", type=Path, required=True)
    p.add_argument("--catalog", default="sqlite")
    p.add_argument("--memory-limit", default="")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    t: dict[str, float] = {}
    start = time.perf_counter()

    import duckdb

    config: dict[str, Any] = {"autoinstall_known_extensions": "false",
                              "autoload_known_extensions": "false"}
    if a.memory_limit:
        config["memory_limit"] = a.memory_limit
    if a.threads:
        config["threads"] = a.threads
    con = duckdb.connect(config=config)
    _extension(con, "ducklake", "duckdb_extension_ducklake")
    data = a.lake_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    if a.catalog == "sqlite":
        _extension(con, "sqlite_scanner", "duckdb_extension_sqlite_scanner")
        con.execute(f"ATTACH 'ducklake:sqlite:{a.lake_dir}/catalog.sqlite' AS lake "
                    f"(DATA_PATH '{data}/')")
    else:  # a libpq connection string of a scratch database
        _extension(con, "postgres_scanner", "duckdb_extension_postgres_scanner")
        con.execute(f"ATTACH 'ducklake:postgres:{a.catalog}' AS lake "
                    f"(DATA_PATH '{data}/', METADATA_SCHEMA 'ducklake')")
    con.execute(f"SET temp_directory = '{a.lake_dir}/tmp'")
    t["connect_attach_s"] = time.perf_counter() - start

    mark = time.perf_counter()
    for statement in DDL:
        con.execute(statement)
    t["create_tables_s"] = time.perf_counter() - mark
    idle_rss_mib = _vm_rss_mib()  # like the saga server's idle RSS: attached, tables created

    files = sorted(glob.glob(str(a.source_dir / "*.ndjson")))
    root = str(a.source_dir.parents[1]).rstrip("/") + "/"
    batch = "plain-batch"
    params = {"partition_date": harness.PARTITION}
    counts: dict[str, Any] = {}

    mark = time.perf_counter()
    con.execute("BEGIN")
    con.execute(f"DELETE FROM {BRONZE} WHERE _batch_id = ?", [batch])
    con.execute(BRONZE_INSERT, {**params, "batch_id": batch, "prefix": root, "files": files,
                                "columns": {c: "VARCHAR" for c, _, _ in COLUMNS}})
    counts["bronze_records"] = con.execute(
        f"SELECT count(*) FROM {BRONZE} WHERE _batch_id = ?", [batch]).fetchall()[0][0]
    con.execute("COMMIT")
    t["bronze_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    con.execute(f"CREATE OR REPLACE TEMP TABLE stage AS {STAGING}", {**params, **STAGING_PARAMS})
    row = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE _duplicate), "
        "count(*) FILTER (WHERE NOT _duplicate AND _invalid), "
        "coalesce(sum(_nulls) FILTER (WHERE NOT _duplicate AND NOT _invalid), 0) FROM stage"
    ).fetchall()[0]
    counts.update(zip(("silver_records_in", "duplicates_removed", "invalid_removed",
                       "nulls_filled"), (int(v) for v in row), strict=True))
    con.execute("BEGIN")
    con.execute(f"DELETE FROM {SILVER} WHERE partition_date = CAST(? AS DATE)", [harness.PARTITION])
    con.execute(f"INSERT INTO {SILVER} SELECT CAST(? AS DATE), "
                + ", ".join(f'"{c}"' for c, _, _ in COLUMNS)
                + ", _batch_id, _source_file, ? FROM stage WHERE NOT _duplicate AND NOT _invalid",
                [harness.PARTITION, batch])
    counts["silver_records"] = con.execute(
        f"SELECT count(*) FROM {SILVER} WHERE partition_date = CAST(? AS DATE)",
        [harness.PARTITION]).fetchall()[0][0]
    con.execute("COMMIT")
    con.execute("DROP TABLE IF EXISTS stage")
    t["silver_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    con.execute("BEGIN")
    con.execute(f"DELETE FROM {GOLD} WHERE partition_date = CAST(? AS DATE)", [harness.PARTITION])
    con.execute(GOLD_INSERT, {**params, "batch_id": batch,
                              **{f"aggregation_{i}": n for i, (n, _) in enumerate(AGGREGATIONS)}})
    counts["gold_records"] = con.execute(
        f"SELECT count(*) FROM {GOLD} WHERE partition_date = CAST(? AS DATE)",
        [harness.PARTITION]).fetchall()[0][0]
    con.execute("COMMIT")
    t["gold_s"] = time.perf_counter() - mark

    t["pipeline_s"] = t["bronze_s"] + t["silver_s"] + t["gold_s"]
    t["script_s"] = time.perf_counter() - start
    con.close()
    print(json.dumps({"timings": t, "counts": counts, "idle_rss_mib": idle_rss_mib}))


def _vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------


def ensure_data(records: int, files: int) -> dict[str, Any]:
    """Generate the input once per (records, files); later runs reuse it (it is deterministic)."""
    root = harness.WORK / f"data-{records}x{files}"
    source_dir = root / DATASET / harness.PARTITION
    marker = root / ".complete.json"
    if marker.exists():
        info = json.loads(marker.read_text())
    else:
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        done = harness.run_measured([harness.lakesaga_bin(), "generate", "--records", str(records),
                                     "--files", str(files), "--out", str(source_dir)])
        if done.returncode != 0:
            raise RuntimeError(f"lakesaga generate failed: {done.stderr[-2000:]}")
        info = {"records": records, "files": files,
                "generate_s": round(time.perf_counter() - started, 2),
                "generate_cpu_s": round(done.user_s + done.sys_s, 2),
                "bytes": sum(f.stat().st_size for f in source_dir.glob("*.ndjson")),
                "generated_under_load": list(os.getloadavg())}
        marker.write_text(json.dumps(info))
        os.sync()  # no writeback of the fresh files competing with the first measured run
    return {**info, "source_root": str(root), "source_dir": str(source_dir)}


def run_plain(data: dict[str, Any], run_dir: Path, a: argparse.Namespace,
              pg_name: str) -> dict[str, Any]:
    lake = harness.fresh_dir(run_dir / "plain-lake")
    catalog = "sqlite"
    if a.catalog == "postgres":
        url = harness.recreate_pg_database(pg_name)
        from app.lakehouse.duck import libpq_dsn

        catalog = libpq_dsn(url)
    cmd = [sys.executable, __file__, "_plain", "--source-dir", data["source_dir"],
           "--lake-dir", str(lake), "--catalog", catalog, "--threads", str(a.threads or 0)]
    if a.memory_limit:
        cmd += ["--memory-limit", a.memory_limit]
    started = time.perf_counter()
    done = harness.run_measured(cmd)
    wall = time.perf_counter() - started
    shutil.rmtree(lake, ignore_errors=True)
    if a.catalog == "postgres":
        harness.drop_pg_database(pg_name)
    if done.returncode != 0:
        raise RuntimeError(f"plain script failed: {done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {**out, "process_wall_s": wall, "peak_rss_mib": done.maxrss_mib,
            "cpu_s": done.user_s + done.sys_s}


def run_saga(data: dict[str, Any], run_dir: Path, a: argparse.Namespace,
             pg_name: str) -> dict[str, Any]:
    import httpx

    lake = harness.fresh_dir(run_dir / "saga-lake")
    if a.catalog == "postgres":
        url = harness.recreate_pg_database(pg_name)
    else:
        url = f"sqlite:///{run_dir / 'saga.db'}"
        (run_dir / "saga.db").unlink(missing_ok=True)
    token = harness.admin_token(url)
    env = harness.lakesaga_env(url, Path(data["source_root"]), lake,
                               duckdb_memory_limit=a.memory_limit or None,
                               duckdb_threads=a.threads or None, worker_concurrency=1)
    server = harness.Server(env).start()
    try:
        idle_rss = server.rss_mib()
        body = {"dataset": DATASET, "partition_date": harness.PARTITION,
                "source": {"path": f"{DATASET}/{harness.PARTITION}/*.ndjson", "format": "json"}}
        with httpx.Client(base_url=server.url, timeout=600,
                          headers={"Authorization": f"Bearer {token}"}) as api:
            t0 = time.perf_counter()
            resp = api.post("/sagas", json=body, headers={"Idempotency-Key": run_dir.name})
            post_s = time.perf_counter() - t0
            if resp.status_code != 202:
                raise RuntimeError(f"POST /sagas -> {resp.status_code}: {resp.text}")
            saga_id = resp.json()["id"]
            saga = resp.json()
            while saga["status"] not in ("succeeded", "compensated", "failed"):
                saga = api.get(f"/sagas/{saga_id}", params={"wait": WAIT_S}).json()
            e2e = time.perf_counter() - t0
    finally:
        finished = server.stop()
        shutil.rmtree(lake, ignore_errors=True)
        if a.catalog == "postgres":
            harness.drop_pg_database(pg_name)
    if saga["status"] != "succeeded":
        raise RuntimeError(f"saga {saga['status']}: {saga.get('error')}")
    steps = {s["name"]: s["duration_s"] for s in saga["steps"]}
    metrics = {s["name"]: s["metrics"] for s in saga["steps"]}
    from datetime import datetime

    def ts(value: str) -> datetime:
        return datetime.fromisoformat(value.rstrip("Z"))

    first_start = min(ts(s["started_at"]) for s in saga["steps"])
    server_s = (ts(saga["finished_at"]) - ts(saga["created_at"])).total_seconds()
    silver = metrics["process_to_silver"]
    counts = {
        "bronze_records": metrics["ingest_to_bronze"]["records"],
        "silver_records_in": silver["records_in"],
        "duplicates_removed": silver["duplicates_removed"],
        "invalid_removed": silver["invalid_removed"],
        "nulls_filled": silver["nulls_filled"],
        "silver_records": silver["records"],
        "gold_records": metrics["aggregate_to_gold"]["aggregated_records"],
    }
    return {
        "timings": {"e2e_s": e2e, "post_s": post_s, "server_s": server_s,
                    "claim_delay_s": (first_start - ts(saga["created_at"])).total_seconds(),
                    "steps_s": steps, "steps_sum_s": sum(v or 0 for v in steps.values())},
        "counts": counts, "peak_rss_mib": finished.maxrss_mib, "idle_rss_mib": idle_rss,
        "cpu_s": finished.user_s + finished.sys_s, "saga_id": saga_id,
    }


def measure_size(records: int, files: int, a: argparse.Namespace) -> dict[str, Any]:
    data = ensure_data(records, files)
    print(f"input: {records:,} records in {files} files, {data['bytes'] / 2**20:,.0f} MiB "
          f"(generated in {data['generate_s']} s)", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "saga": []}
    total = a.warmup + a.runs
    for i in range(total):
        order = ("plain", "saga") if i % 2 == 0 else ("saga", "plain")
        for side in order:
            run_dir = harness.fresh_dir(harness.WORK / f"pipeline-{side}-{os.getpid()}")
            fn = run_plain if side == "plain" else run_saga
            result = fn(data, run_dir, a, f"bench_pipeline_{side}")
            shutil.rmtree(run_dir, ignore_errors=True)
            warm = i < a.warmup
            label = "warm-up" if warm else f"run {i - a.warmup + 1}/{a.runs}"
            secs = result["timings"].get("e2e_s", result["timings"].get("pipeline_s"))
            print(f"  {label:>9} {side:<5} {secs:8.3f} s  peak RSS {result['peak_rss_mib']:7.0f} MiB",
                  flush=True)
            if not warm:
                runs[side].append(result)
    return summarize(records, files, data, runs, a)


def summarize(records: int, files: int, data: dict[str, Any],
              runs: dict[str, list[dict[str, Any]]], a: argparse.Namespace) -> dict[str, Any]:
    med = harness.median
    plain, saga = runs["plain"], runs["saga"]
    plain_pipeline = med(r["timings"]["pipeline_s"] for r in plain)
    plain_script = med(r["timings"]["script_s"] for r in plain)
    saga_e2e = med(r["timings"]["e2e_s"] for r in saga)
    plain_rss = med(r["peak_rss_mib"] for r in plain)
    saga_rss = med(r["peak_rss_mib"] for r in saga)
    step_names = list(saga[0]["timings"]["steps_s"]) if saga else []
    same = all(r["counts"] == plain[0]["counts"] for r in plain + saga) if plain else False
    limit_mib = _mib(a.memory_limit) if a.memory_limit else None
    return {
        "records": records, "files": files, "input_bytes": data["bytes"],
        "generate_s": data["generate_s"], "runs": a.runs, "warmup": a.warmup,
        "same_counts": same, "counts": plain[0]["counts"] if plain else None,
        "plain": {
            "pipeline_s": plain_pipeline, "script_s": plain_script,
            "steps_s": {k: med(r["timings"][k] for r in plain)
                        for k in ("connect_attach_s", "create_tables_s", "bronze_s", "silver_s",
                                  "gold_s")},
            "process_wall_s": med(r["process_wall_s"] for r in plain),
            "peak_rss_mib": plain_rss, "idle_rss_mib": med(r["idle_rss_mib"] for r in plain),
            "cpu_s": med(r["cpu_s"] for r in plain),
            "all_pipeline_s": [r["timings"]["pipeline_s"] for r in plain],
        },
        "saga": {
            "e2e_s": saga_e2e,
            "server_s": med(r["timings"]["server_s"] for r in saga),
            "post_s": med(r["timings"]["post_s"] for r in saga),
            "claim_delay_s": med(r["timings"]["claim_delay_s"] for r in saga),
            "steps_s": {n: med(r["timings"]["steps_s"][n] for r in saga) for n in step_names},
            "steps_sum_s": med(r["timings"]["steps_sum_s"] for r in saga),
            "peak_rss_mib": saga_rss, "idle_rss_mib": med(r["idle_rss_mib"] for r in saga),
            "cpu_s": med(r["cpu_s"] for r in saga),
            "all_e2e_s": [r["timings"]["e2e_s"] for r in saga],
        },
        "ratio_e2e_vs_pipeline": saga_e2e / plain_pipeline if saga_e2e and plain_pipeline else None,
        "ratio_e2e_vs_script": saga_e2e / plain_script if saga_e2e and plain_script else None,
        "ratio_peak_rss": saga_rss / plain_rss if saga_rss and plain_rss else None,
        # What each process added to its idle RSS for the pipeline: the working memory.
        "ratio_working_rss": _working_ratio(saga, plain),
        "memory_limit": a.memory_limit or None, "threads": a.threads or None,
        "saga_within_memory_limit": (saga_rss <= limit_mib) if limit_mib and saga_rss else None,
    }


def _working_ratio(saga: list[dict[str, Any]], plain: list[dict[str, Any]]) -> float | None:
    med = harness.median
    saga_mib = med(r["peak_rss_mib"] - r["idle_rss_mib"] for r in saga)
    plain_mib = med(r["peak_rss_mib"] - r["idle_rss_mib"] for r in plain)
    return saga_mib / plain_mib if saga_mib and plain_mib else None


def _mib(text: str) -> float:
    units = {"KB": 1e3 / 2**20, "MB": 1e6 / 2**20, "GB": 1e9 / 2**20, "TB": 1e12 / 2**20,
             "KIB": 1 / 1024, "MIB": 1.0, "GIB": 1024.0, "TIB": 1024.0**2}
    value = text.strip().upper().replace(" ", "")
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * factor
    return float(value) / 2**20


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(result: dict[str, Any]) -> str:
    rows, steps = [], []
    for s in result["sizes"]:
        rows.append([f"{s['records']:,}", s["plain"]["pipeline_s"], s["plain"]["script_s"],
                     s["saga"]["e2e_s"], f"{s['ratio_e2e_vs_pipeline']:.2f}x",
                     f"{s['ratio_e2e_vs_script']:.2f}x", s["plain"]["peak_rss_mib"],
                     s["saga"]["peak_rss_mib"], s["plain"].get("idle_rss_mib"),
                     s["saga"].get("idle_rss_mib"), f"{s['ratio_peak_rss']:.2f}x",
                     _ratio(s.get("ratio_working_rss")), "yes" if s["same_counts"] else "NO"])
        p, g = s["plain"]["steps_s"], s["saga"]["steps_s"]
        steps.append([f"{s['records']:,}", p["connect_attach_s"], p["create_tables_s"],
                      p["bronze_s"], p["silver_s"], p["gold_s"], s["saga"]["post_s"],
                      s["saga"]["claim_delay_s"], g.get("ingest_to_bronze"),
                      g.get("process_to_silver"), g.get("aggregate_to_gold"),
                      g.get("update_catalog"), g.get("notify_downstream"),
                      s["saga"]["e2e_s"] - s["saga"]["steps_sum_s"] - s["saga"]["claim_delay_s"]])
    out = [harness.table(["records", "plain SQL s", "plain script s", "saga e2e s",
                          "saga/plain SQL", "saga/plain script", "plain RSS MiB",
                          "saga RSS MiB", "plain idle RSS MiB", "saga idle RSS MiB",
                          "RSS ratio", "RSS above idle ratio", "same counts"],
                         rows),
           "",
           "Per step (medians, seconds). Plain: attach, DDL, bronze, silver, gold. Saga: POST, "
           "claim delay, the five steps, and what is left of the e2e time (transitions, answers):",
           "",
           harness.table(["records", "attach", "DDL", "bronze", "silver", "gold", "POST",
                          "claim", "bronze", "silver", "gold", "catalog", "notify", "rest"],
                         steps)]
    return "\n".join(out)


def main() -> None:
    harness.ensure_bench_python()
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        plain_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="145,231 records, 2 runs, no warm-up")
    p.add_argument("--sizes", help="RECORDSxFILES,... (default 145231x25,10000000x25)")
    p.add_argument("--runs", type=int, help="measured runs per side and size (default 5)")
    p.add_argument("--warmup", type=int, help="unmeasured runs per side first (default 1)")
    p.add_argument("--catalog", choices=("sqlite", "postgres"), default="sqlite",
                   help="DuckLake catalog (and saga log) kind; sqlite is the embedded default")
    p.add_argument("--memory-limit", default="",
                   help="memory budget, e.g. 2GB: the plain script's DuckDB memory_limit, "
                        "the saga server's LAKESAGA_DUCKDB_MEMORY_LIMIT")
    p.add_argument("--threads", type=int, default=0, help="DuckDB threads on both sides")
    p.add_argument("--name", default="pipeline", help="result file name (bench/results/NAME.json)")
    a = p.parse_args()
    sizes = a.sizes or ("145231x25" if a.quick else "145231x25,10000000x25")
    a.runs = a.runs or (2 if a.quick else 5)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.quick else 1)
    harness.print_header(f"pipeline ({a.catalog} catalog)", a.quick)
    results = []
    for size in sizes.split(","):
        records, files = (int(x) for x in size.lower().split("x"))
        runs_here = a.runs if records < 5_000_000 or a.quick or a.sizes else min(a.runs, 3)
        sub = argparse.Namespace(**{**vars(a), "runs": runs_here})
        results.append(measure_size(records, files, sub))
    result = {"catalog": a.catalog, "sizes": results}
    path = harness.write_result(a.name, a.quick, result)
    print()
    print(render(result))
    print(f"\nwritten {path.relative_to(harness.ROOT)}")


if __name__ == "__main__":
    main()
