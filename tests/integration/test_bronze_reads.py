"""How bronze reads source files: exactly the bytes it verified (a file swapped after its
verification ends the saga, never lands unverified rows, never hangs it), within the decompressed
byte and row limits, with values exactly as received (no hive partitioning), and with errors that
name files relative to the source root."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest
from lakesaga_live import PARTITION, Live

from app.lakehouse.pinned import IngestLimitExceeded, PinnedSources, SourceChanged
from app.lakehouse.sources import resolve_manifest
from app.saga.errors import PermanentError

VERIFIED = "ingest_to_bronze.after_checkpoint"


def _submit(live: Live, path: str, fmt: str = "json") -> str:
    resp = live.client.post("/sagas", json={
        "dataset": "clickstream", "partition_date": PARTITION,
        "source": {"path": path, "format": fmt}})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _wait_for_point(trace: Path, point: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (trace.exists() and point in trace.read_text().split()):
        assert time.monotonic() < deadline, f"fault point {point} not reached"
        time.sleep(0.01)


def _no_server_paths(live: Live, saga: dict[str, Any]) -> None:
    text = json.dumps(saga)
    assert str(live.source_root) not in text and "/proc/self/fd" not in text, text


def _rename_over(victim: Path) -> None:
    other = victim.with_name("incoming.tmp")
    other.write_bytes(victim.read_bytes().replace(b'"event_type":"', b'"event_type":"x'))
    os.rename(other, victim)


def _fifo_in_place_of(victim: Path) -> None:
    victim.unlink()
    os.mkfifo(victim)


@pytest.mark.parametrize("swap", [_rename_over, _fifo_in_place_of], ids=["rename", "fifo"])
def test_bronze__file_swapped_after_verification_compensates(
        live_factory: Callable[..., Live], tmp_path: Path, swap: Callable[[Path], None]) -> None:
    """A file swapped between bronze's verification and DuckDB's read: DuckDB reads the verified
    descriptor, not the name, and the swap ends the saga compensated, naming the file. A FIFO
    swapped in can neither block the read (the saga must end) nor keep the lease."""
    trace = tmp_path / "trace"
    live = live_factory(faults=f"{VERIFIED}=sleep:400", fault_trace=str(trace))
    live.generate(records=300, files=2)
    saga_id = _submit(live, f"clickstream/{PARTITION}/*.ndjson")
    _wait_for_point(trace, VERIFIED)
    victim = sorted((live.source_root / "clickstream" / PARTITION).glob("*.ndjson"))[-1]
    swap(victim)
    try:
        saga = live.wait(saga_id, timeout=15)
    finally:
        _release_a_blocked_reader(victim)
    assert saga["status"] == "compensated", saga
    name = f"clickstream/{PARTITION}/{victim.name}"
    assert f"source file {name} was replaced or removed while bronze read it" in saga["error"], saga["error"]
    assert live.lake_count("bronze") == 0
    _no_server_paths(live, saga)


def _release_a_blocked_reader(path: Path) -> None:
    """Let a reader blocked opening the FIFO go on (to EOF), so that a failure can clean up."""
    if path.is_fifo():
        with contextlib.suppress(OSError):  # ENXIO: nobody has it open for reading
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def _records(live: Live, records: int) -> list[dict[str, Any]]:
    data = live.generate("gen", records=records, files=1)
    return [json.loads(line) for line in data.files[0].read_text().splitlines()]


def test_bronze__gzip_bomb_over_the_decompressed_limit_compensates(
        live_factory: Callable[..., Live]) -> None:
    live = live_factory(max_source_bytes=200_000, max_ingest_bytes=1_000_000)
    line = json.dumps(_records(live, 1)[0]).encode() + b"\n"
    bomb = gzip.compress(line * (3_000_000 // len(line)))  # 3 MB of rows in a few kB
    assert len(bomb) < 200_000
    folder = live.source_root / "bomb"
    folder.mkdir()
    (folder / "events.ndjson.gz").write_bytes(bomb)
    saga = live.wait(_submit(live, "bomb/*.gz"))
    assert saga["status"] == "compensated", saga
    assert "more than 1000000 bytes" in saga["error"], saga["error"]
    assert "LAKESAGA_MAX_INGEST_BYTES" in saga["error"], saga["error"]
    assert live.lake_count("bronze") == 0


def test_bronze__gzip_within_the_limits_is_read_decompressed(
        live_factory: Callable[..., Live]) -> None:
    live = live_factory(max_ingest_bytes=1_000_000)
    rows = _records(live, 200)
    folder = live.source_root / "gz"
    folder.mkdir()
    (folder / "events.ndjson.gz").write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    saga = live.wait(_submit(live, "gz/*.gz"))
    assert saga["status"] == "succeeded", saga["error"]
    assert live.lake_count("bronze") == 200
    sources = live.lake_query("SELECT DISTINCT _source_file FROM lake.bronze.raw_clickstream")
    assert sources == [("gz/events.ndjson.gz",)]


def test_bronze__rows_over_the_limit_compensate(live_factory: Callable[..., Live]) -> None:
    live = live_factory(max_ingest_rows=100)
    live.generate(records=300, files=2)
    saga = live.wait(_submit(live, f"clickstream/{PARTITION}/*.ndjson"))
    assert saga["status"] == "compensated", saga
    assert "more than 100 rows" in saga["error"], saga["error"]
    assert "LAKESAGA_MAX_INGEST_ROWS" in saga["error"], saga["error"]
    assert live.lake_count("bronze") == 0


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_bronze__hive_style_directory_does_not_rewrite_values(live: Live, fmt: str) -> None:
    """A file under ``event_type=purchase/`` holding click events stays click events."""
    rows = [{**r, "event_type": "click"} for r in _records(live, 50)]
    folder = live.source_root / "h" / "event_type=purchase"
    folder.mkdir(parents=True)
    source = folder / "part.ndjson"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if fmt != "json":
        target = folder / f"part.{fmt}"
        with duckdb.connect() as con:
            con.execute(f"COPY (SELECT * FROM read_json(?, hive_partitioning=false, "
                        f"columns={{{', '.join(f'{k!r}: {chr(39)}VARCHAR{chr(39)}' for k in rows[0])}}})) "
                        f"TO '{target}' (FORMAT {fmt})", [str(source)])
        source.unlink()
    saga = live.wait(_submit(live, f"h/*/part.{'ndjson' if fmt == 'json' else fmt}", fmt))
    assert saga["status"] == "succeeded", saga["error"]
    values = live.lake_query("SELECT DISTINCT event_type FROM lake.bronze.raw_clickstream")
    assert values == [("click",)]
    columns = [r[0] for r in live.lake_query("DESCRIBE lake.bronze.raw_clickstream")]
    assert "filename" not in columns


def test_bronze__malformed_file_error_names_it_relative_to_the_source_root(live: Live) -> None:
    folder = live.source_root / "bad"
    folder.mkdir()
    (folder / "broken.ndjson").write_text('{"event_id": "a"}\n{"event_id": \n')
    saga = live.wait(_submit(live, "bad/*.ndjson"))
    assert saga["status"] == "compensated", saga
    assert "bad/broken.ndjson" in saga["error"], saga["error"]
    _no_server_paths(live, saga)


def _pinned(root: Path, name: str, **limits: int) -> PinnedSources:
    manifest = resolve_manifest(root, name, "json", max_files=10, max_bytes=10**7,
                                hash_max_bytes=10**7)
    return PinnedSources(root, manifest, {}, **limits)


def test_pinned__write_into_the_verified_file_is_caught_before_commit(tmp_path: Path) -> None:
    """The descriptor pins the inode, not its content: a write into it (even with the mtime
    put back) changes its ctime, and ``check`` refuses the read."""
    source = tmp_path / "a.ndjson"
    source.write_bytes(b'{"event_id": "a"}\n')
    with _pinned(tmp_path, "a.ndjson") as pinned:
        pinned.check()
        info = source.stat()
        time.sleep(0.01)
        with open(source, "r+b") as fh:
            fh.write(b'{"event_id": "b"}\n')
        os.utime(source, ns=(info.st_atime_ns, info.st_mtime_ns))
        with pytest.raises(SourceChanged, match="source file a.ndjson was modified while bronze"):
            pinned.check()


def test_pinned__gzip_is_counted_decompressed_across_members(tmp_path: Path) -> None:
    (tmp_path / "a.ndjson.gz").write_bytes(gzip.compress(b"x" * 1000) + gzip.compress(b"y" * 500))
    with _pinned(tmp_path, "a.ndjson.gz", max_ingest_bytes=1500) as pinned:
        assert pinned.files[0].decompressed_bytes == 1500
    with pytest.raises(IngestLimitExceeded, match="more than 1499 bytes"):
        _pinned(tmp_path, "a.ndjson.gz", max_ingest_bytes=1499).__enter__()


def test_pinned__truncated_gzip_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "t.ndjson.gz").write_bytes(gzip.compress(b"x" * 100_000, mtime=0)[:-20])
    with pytest.raises(PermanentError, match="source file t.ndjson.gz is not valid gzip"):
        _pinned(tmp_path, "t.ndjson.gz").__enter__()
