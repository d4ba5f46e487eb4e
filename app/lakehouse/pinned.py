"""Source files as bronze reads them: each opened once, verified from that descriptor, and read
by DuckDB through the same descriptor, so that what bronze commits is exactly the bytes whose
size and sha256 the manifest records.

Why the descriptor rather than a private copy or a hard link: DuckDB, given
``/proc/self/fd/N``, resolves the link (the file's current path) and checks it against the
connection's ``allowed_directories``, then opens that link, which reaches the very inode that was
verified whatever has happened to its name since. A copy would write up to
``LAKESAGA_MAX_SOURCE_BYTES`` a second time; a hard link needs the source root and the lake on
one filesystem and write access to the file (``fs.protected_hardlinks``), and still shares the
inode with anyone who writes into it. The one thing the descriptor does not stop, a write into
the file itself, changes the inode's ctime, which no user can set: ``PinnedSources.check``
compares it (and size, mtime, and that the name still leads to the inode) with what it was before
hashing, after DuckDB's read and before the lake commit. Every open is ``O_NONBLOCK |
O_NOFOLLOW`` and refuses anything but a regular file at once, so no open (ours, or DuckDB's
reopen of a regular file's inode) can block on a FIFO.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import stat
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from app.saga.errors import PermanentError

_T = TypeVar("_T")
_R = TypeVar("_R")
_CHUNK = 1 << 20
#: Where a descriptor of this process can be opened again (Linux procfs).
FD_DIR = "/proc/self/fd"


class SourceChanged(PermanentError):
    """A source file differs from the manifest frozen when the saga was accepted."""


class IngestLimitExceeded(PermanentError):
    """A source decompresses to more bytes, or holds more rows, than a saga may ingest."""


class NotRegularFile(OSError):
    """A path that was a regular file is now something else (a FIFO, a device, a symlink)."""


#: Never block on a FIFO swapped in for a file; never read through a symlink swapped in for it.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _open_fd(path: Path, *, follow_symlinks: bool) -> int:
    """A descriptor of ``path``, refused (``NotRegularFile``) unless it is a regular file; the
    type is checked on the descriptor, so nothing swapped in after an earlier ``stat`` passes."""
    flags = _OPEN_FLAGS if follow_symlinks else _OPEN_FLAGS | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise NotRegularFile(errno.ELOOP, "is now a symlink", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "is not a regular file", str(path))
    return fd


@contextlib.contextmanager
def open_regular(path: Path, *, follow_symlinks: bool = True) -> Iterator[BinaryIO]:
    """``path`` opened for reading, refused (``NotRegularFile``) unless it is a regular file."""
    with os.fdopen(_open_fd(path, follow_symlinks=follow_symlinks), "rb") as fh:
        yield fh


def _sha256(fh: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path, *, size: int | None = None) -> str:
    """sha256 of a regular file; with ``size``, refuses a file that is not that size."""
    with open_regular(path) as fh:
        if size is not None and os.fstat(fh.fileno()).st_size != size:
            raise NotRegularFile(errno.EINVAL, "changed size", str(path))
        return _sha256(fh)


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


def compression_of(name: str) -> str:
    """How DuckDB is told to read ``name`` (it cannot guess from ``/proc/self/fd/N``)."""
    return "gzip" if name.endswith(".gz") else "uncompressed"


@dataclass
class PinnedFile:
    """One manifest file, held open from its verification to the lake commit."""

    name: str  #: relative to the source root
    fd: int
    #: ``fstat`` just before hashing: the inode whose bytes were verified, and its ctime.
    info: os.stat_result
    sha256: str = ""
    #: Bytes DuckDB gets from the file once decompressed (its size when not compressed).
    decompressed_bytes: int = 0

    @property
    def reader_path(self) -> str:
        return f"{FD_DIR}/{self.fd}"


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class PinnedSources:
    """The files of a manifest opened, verified and kept open while bronze reads them.

    Use as a context manager (the descriptors are closed on exit). ``max_ingest_bytes`` bounds
    the bytes DuckDB would get once gzip files are decompressed (all files together).
    """

    def __init__(self, root: Path, manifest: dict[str, Any], known_hashes: dict[str, str], *,
                 max_ingest_bytes: int | None = None) -> None:
        self.root = root.resolve()
        self.entries = manifest["files"]
        self.known_hashes = known_hashes
        self.max_ingest_bytes = max_ingest_bytes
        self.files: list[PinnedFile] = []

    def __enter__(self) -> PinnedSources:
        try:
            self._pin()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for pinned in self.files:
            with contextlib.suppress(OSError):
                os.close(pinned.fd)
        self.files = []

    @property
    def hashes(self) -> dict[str, str]:
        return {pinned.name: pinned.sha256 for pinned in self.files}

    def _pin(self) -> None:
        if not os.path.isdir(FD_DIR):
            raise PermanentError(f"bronze reads source files through {FD_DIR} (Linux procfs), "
                                 "which this host does not have")
        _make_room_for(len(self.entries))
        opened: list[PinnedFile | None] = [None] * len(self.entries)
        try:
            # Every task has ended when this returns or raises (the pool waits for them).
            map_on_cores(lambda i: self._verify(i, opened), range(len(self.entries)))
        finally:
            self.files = [pinned for pinned in opened if pinned is not None]
        total = sum(pinned.decompressed_bytes for pinned in self.files)
        if self.max_ingest_bytes is not None and total > self.max_ingest_bytes:
            raise self._over_bytes()

    def _open(self, entry: dict[str, Any]) -> PinnedFile:
        name = entry["path"]
        path = self.root / name
        if not path.resolve().is_relative_to(self.root):
            raise SourceChanged(f"source file {name} now resolves outside the source root")
        try:
            fd = _open_fd(path, follow_symlinks=False)
        except FileNotFoundError:
            raise SourceChanged(f"source file {name} disappeared after the saga was "
                                "accepted") from None
        except NotRegularFile as exc:
            raise SourceChanged(f"source file {name} {exc.strerror} "
                                "(it was a regular file when the saga was accepted)") from None
        except OSError as exc:
            raise SourceChanged(f"source file {name} cannot be read: {exc.strerror}") from None
        pinned = PinnedFile(name, fd, os.fstat(fd))
        try:
            # What was opened lies at the manifest's path (no directory above it was swapped).
            at = os.readlink(pinned.reader_path)
        except OSError:
            at = ""
        if at != str(path):
            os.close(fd)
            raise SourceChanged(f"source file {name} was moved or replaced while bronze "
                                "opened it")
        return pinned

    def _verify(self, index: int, opened: list[PinnedFile | None]) -> None:
        entry = self.entries[index]
        pinned = opened[index] = self._open(entry)
        name, info = pinned.name, pinned.info
        if info.st_size != entry["size"] or info.st_mtime != entry["mtime"]:
            raise SourceChanged(f"source file {name} changed after the saga was accepted "
                                f"(size {entry['size']} -> {info.st_size})")
        if not entry.get("sha256"):
            # Too large to be hashed at accept: the inode and its ctime (which no user can set)
            # stand in for the hash, so a same-size rewrite with its mtime put back is caught.
            # Manifests frozen before they were recorded have neither.
            if entry.get("inode", info.st_ino) != info.st_ino:
                raise SourceChanged(f"source file {name} changed after the saga was accepted "
                                    "(replaced by another file)")
            if entry.get("ctime_ns", info.st_ctime_ns) != info.st_ctime_ns:
                raise SourceChanged(f"source file {name} changed after the saga was accepted "
                                    "(written to, or its metadata changed)")
        digest = hashlib.sha256()
        inflate = _Inflater(name, self._over_bytes) if compression_of(name) == "gzip" else None
        offset = 0
        while chunk := os.pread(pinned.fd, _CHUNK, offset):
            offset += len(chunk)
            digest.update(chunk)
            if inflate is not None:
                inflate.feed(chunk, self.max_ingest_bytes)
        pinned.sha256 = digest.hexdigest()
        pinned.decompressed_bytes = inflate.finish() if inflate is not None else offset
        if self.max_ingest_bytes is not None and pinned.decompressed_bytes > self.max_ingest_bytes:
            raise self._over_bytes()
        expected = entry.get("sha256") or self.known_hashes.get(name)
        if expected and pinned.sha256 != expected:
            raise SourceChanged(f"source file {name} changed after the saga was accepted "
                                "(different content, same size)")

    def _over_bytes(self) -> IngestLimitExceeded:
        return IngestLimitExceeded(
            f"the source decompresses to more than {self.max_ingest_bytes} bytes, the most one "
            "saga may ingest (LAKESAGA_MAX_INGEST_BYTES); split it into smaller sagas")

    def check(self) -> None:
        """Refuse (``SourceChanged``) if any file was written to, or its name now leads to
        another file, since it was verified: then DuckDB may have read other bytes."""
        for pinned in self.files:
            try:
                named = os.lstat(self.root / pinned.name)
            except OSError:
                named = None
            info = pinned.info
            if named is None or (named.st_dev, named.st_ino) != (info.st_dev, info.st_ino):
                raise SourceChanged(f"source file {pinned.name} was replaced or removed while "
                                    "bronze read it")
            if _identity(os.fstat(pinned.fd)) != _identity(info):
                raise SourceChanged(f"source file {pinned.name} was modified while bronze "
                                    "read it")

    def relative(self, text: str) -> str:
        """``text`` (a DuckDB error) with every path of a source file relative to the root."""
        for pinned in sorted(self.files, key=lambda p: -p.fd):  # fd 12 before fd 1
            text = text.replace(pinned.reader_path, pinned.name)
        return text.replace(str(self.root) + "/", "").replace(str(self.root), ".")


class _Inflater:
    """Counts the bytes a gzip stream (members one after another, as DuckDB reads them)
    decompresses to, without ever holding more than a chunk of them."""

    def __init__(self, name: str, over: Callable[[], Exception]) -> None:
        self._name = name
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._over = over
        self._member_started = False
        self.total = 0

    def feed(self, data: bytes, limit: int | None) -> None:
        while data:
            self._member_started = True
            try:
                out = self._z.decompress(data, _CHUNK)
            except zlib.error as exc:
                raise PermanentError(f"source file {self._name} is not valid gzip: "
                                     f"{exc}") from None
            self.total += len(out)
            if limit is not None and self.total > limit:
                raise self._over()
            if self._z.eof:
                data = self._z.unused_data
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._member_started = False
            else:
                data = self._z.unconsumed_tail

    def finish(self) -> int:
        if self._member_started and not self._z.eof:
            raise PermanentError(f"source file {self._name} is not valid gzip: it ends "
                                 "before its compressed stream does")
        return self.total


def _make_room_for(files: int) -> None:
    """Raise this process's soft limit of open files so that ``files`` more fit, if it can."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = files + 256  # DuckDB's own files, the databases, sockets
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < needed:
            raise PermanentError(f"the source has {files} files and this process may open only "
                                 f"{soft} files at once: raise its limit (ulimit -n)")


def verify_manifest(root: Path, manifest: dict[str, Any],
                    known_hashes: dict[str, str]) -> dict[str, str]:
    """Check every file against the frozen manifest; return the sha256 of each file.

    Files hashed at accept time are checked against that hash; others against ``known_hashes``
    (recorded by an earlier attempt of this step), or hashed now for the first time. The
    manifest holds resolved paths, so a symlink found at one now means the file was replaced.
    The error reported is that of the first failing file in manifest order.
    """
    with PinnedSources(root, manifest, known_hashes) as pinned:
        return pinned.hashes
