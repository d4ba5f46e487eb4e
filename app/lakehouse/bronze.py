"""Bronze: raw rows exactly as received (every value kept as text) plus batch metadata.

Append-only: a saga's rows carry ``_batch_id = saga id``; a re-run replaces only its own batch and
compensation deletes only its own batch, so other ingestions of the partition are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import duckdb

from app.lakehouse.duck import first_row, lake_write
from app.lakehouse.pipeline import DatasetSpec, quote
from app.lakehouse.tables import bronze_table
from app.saga.errors import PermanentError

#: Table functions reading a file list bound as ``$files`` (and the JSON columns as ``$columns``).
#: DuckDB expands each listed path as a glob, which is why sources.py refuses paths with glob
#: characters; the connection's ``allowed_directories`` confine what any of them can reach.
READERS = {
    "json": "read_json($files, format='newline_delimited', columns=$columns, "
            "filename='_source_path')",
    "csv": "read_csv($files, all_varchar=true, union_by_name=true, filename='_source_path')",
    "parquet": "read_parquet($files, union_by_name=true, filename='_source_path')",
}


_T = TypeVar("_T")
_R = TypeVar("_R")


class SourceChanged(PermanentError):
    """A source file differs from the manifest frozen when the saga was accepted."""


class NotRegularFile(OSError):
    """A path that was a regular file is now something else (a FIFO, a device, a symlink)."""


#: Never block on a FIFO swapped in for a file; never read through a symlink swapped in for it.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def open_regular(path: Path, *, follow_symlinks: bool = True) -> Iterator[BinaryIO]:
    """``path`` opened for reading, refused (``NotRegularFile``) unless it is a regular file.

    The type is checked on the open descriptor, so a file replaced after an earlier ``stat``
    cannot slip through; a FIFO is opened non-blocking and refused instead of hanging the reader.
    """
    flags = _OPEN_FLAGS if follow_symlinks else _OPEN_FLAGS | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise NotRegularFile(errno.ELOOP, "is now a symlink", str(path)) from None
        raise
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "is not a regular file", str(path))
        yield fh


def _sha256(fh: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path, *, size: int | None = None) -> str:
    """sha256 of a regular file; with ``size``, refuses a file that is not that size."""
    with open_regular(path) as fh:
        if size is not None and os.fstat(fh.fileno()).st_size != size:
            raise NotRegularFile(errno.EINVAL, "changed size", str(path))
        return _sha256(fh)


def verify_manifest(root: Path, manifest: dict[str, Any],
                    known_hashes: dict[str, str]) -> dict[str, str]:
    """Check every file against the frozen manifest; return the sha256 of each file.

    Files hashed at accept time are checked against that hash; others against ``known_hashes``
    (recorded by an earlier attempt of this step), or hashed now for the first time. The
    manifest holds resolved paths, so a symlink found at one now means the file was replaced.
    Files are hashed on one thread per usable core (hashlib releases the GIL); the error
    reported is that of the first failing file in manifest order.
    """
    root = root.resolve()
    entries = manifest["files"]
    digests = map_on_cores(lambda entry: _verify_file(root, entry, known_hashes), entries)
    return {entry["path"]: digest for entry, digest in zip(entries, digests, strict=True)}


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def map_on_cores(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``[fn(item) for item in items]`` on one thread per usable core (for work that releases
    the GIL, such as hashing). The error raised is the first failing item's, in order, and no
    further item is started once one has failed."""
    workers = min(len(items), usable_cores())
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="lakesaga-hash") as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _verify_file(root: Path, entry: dict[str, Any], known_hashes: dict[str, str]) -> str:
    name = entry["path"]
    path = root / name
    if not path.resolve().is_relative_to(root):
        raise SourceChanged(f"source file {name} now resolves outside the source root")
    try:
        with open_regular(path, follow_symlinks=False) as fh:
            info = os.fstat(fh.fileno())
            if info.st_size != entry["size"] or info.st_mtime != entry["mtime"]:
                raise SourceChanged(
                    f"source file {name} changed after the saga was accepted "
                    f"(size {entry['size']} -> {info.st_size})"
                )
            digest = _sha256(fh)
    except FileNotFoundError:
        raise SourceChanged(f"source file {name} disappeared after the saga was accepted") from None
    except NotRegularFile as exc:
        raise SourceChanged(f"source file {name} {exc.strerror} "
                            "(it was a regular file when the saga was accepted)") from None
    except OSError as exc:
        raise SourceChanged(f"source file {name} cannot be read: {exc.strerror}") from None
    expected = entry.get("sha256") or known_hashes.get(name)
    if expected and digest != expected:
        raise SourceChanged(f"source file {name} changed after the saga was accepted "
                            "(different content, same size)")
    return digest


def reader_sql(fmt: str) -> str:
    if fmt not in READERS:
        raise PermanentError(f"unsupported source format {fmt!r}")
    return READERS[fmt]


def ingest(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, *, root: Path, files: list[str],
           fmt: str, partition_date: str, saga_id: str, tag: str) -> dict[str, Any]:
    """Write this saga's batch (replacing any earlier attempt of it) in one lake commit."""
    paths = [str(root / f) for f in files]
    prefix = str(root).rstrip("/") + "/"
    cols = ", ".join(f"CAST({quote(c.name)} AS VARCHAR)" for c in spec.columns)
    target = bronze_table(spec)
    params: dict[str, object] = {"partition_date": partition_date, "saga_id": saga_id,
                                 "prefix": prefix, "files": paths}
    if fmt == "json":
        params["columns"] = {c.name: "VARCHAR" for c in spec.columns}
    with lake_write(cur, tag, f"ingest_to_bronze {spec.name} {partition_date}"):
        cur.execute(f"DELETE FROM {target} WHERE _batch_id = ?", [saga_id])
        cur.execute(
            f"INSERT INTO {target} SELECT CAST($partition_date AS DATE), {cols}, $saga_id, "
            f"replace(_source_path, $prefix, ''), now()::TIMESTAMP FROM {reader_sql(fmt)}",
            params,
        )
        row = first_row(cur.execute(
            f"SELECT count(*) FROM {target} WHERE _batch_id = ?", [saga_id]
        ))
    records = int(row[0]) if row else 0
    return {"files": len(files), "records": records, "table": f"bronze.{spec.bronze_table}"}


def delete_batch(cur: duckdb.DuckDBPyConnection, spec: DatasetSpec, *, saga_id: str,
                 tag: str) -> dict[str, Any]:
    """Compensation: remove this saga's batch, and nothing else. Idempotent."""
    target = bronze_table(spec)
    with lake_write(cur, tag, f"delete_bronze_partition {spec.name}"):
        row = first_row(cur.execute(f"SELECT count(*) FROM {target} WHERE _batch_id = ?", [saga_id]))
        cur.execute(f"DELETE FROM {target} WHERE _batch_id = ?", [saga_id])
    return {"records_removed": int(row[0]) if row else 0}
