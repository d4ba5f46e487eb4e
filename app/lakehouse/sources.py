"""Source resolution: a request's relative glob becomes a frozen manifest of regular files that
all lie inside the configured source root (symlinks resolved), within the configured limits.

The glob is walked here rather than by ``pathlib`` so that the walk itself is bounded: it never
steps through a symlink that leads outside the root, ``**`` does not follow symlinked
directories, and it stops as soon as a limit (files, bytes, directory entries looked at) is
exceeded instead of listing a whole tree first.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.lakehouse.pinned import map_on_cores, sha256_file

FORMATS = ("json", "csv", "parquet")
_GLOB_CHARS = set("*?[]{}")
_WILDCARDS = set("*?[")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_PATTERN_CHARS = 1024
#: Path components of a pattern, and directory levels below the root that ``**`` descends to.
MAX_DEPTH = 64
#: Directory entries one resolution may look at: bounds the cost of a glob like ``**/*`` over a
#: huge tree, which the file and byte limits (counting matches only) do not.
MAX_SCANNED_ENTRIES = 200_000


class SourceError(ValueError):
    """The requested source cannot be ingested; the message is safe to show the client."""


def check_pattern(pattern: str) -> str:
    """Refuse anything but a relative glob whose components stay below the root."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise SourceError(
            f"source.path must be a non-empty glob of at most {MAX_PATTERN_CHARS} characters")
    if _CONTROL.search(pattern) or "\\" in pattern:
        raise SourceError("source.path must not contain NUL, control or backslash characters")
    try:
        pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError("source.path must be valid UTF-8 text") from None
    if pattern.startswith(("/", "~")):
        raise SourceError("source.path must be relative to the source root, not absolute")
    parts = pattern.split("/")
    if any(part == ".." for part in parts):
        raise SourceError("source.path must not contain '..'")
    if any(part in ("", ".") for part in parts):
        raise SourceError("source.path must not contain empty or '.' components")
    if any("**" in part and part != "**" for part in parts):
        raise SourceError("'**' must be a whole component of source.path (as in 'a/**/*.json')")
    if parts.count("**") > 1:
        raise SourceError("source.path may contain '**' once")
    if len(parts) > MAX_DEPTH:
        raise SourceError(f"source.path has more than {MAX_DEPTH} components")
    return pattern


def resolve_manifest(root: Path, pattern: str, fmt: str, *, max_files: int, max_bytes: int,
                     hash_max_bytes: int, max_entries: int = MAX_SCANNED_ENTRIES) -> dict[str, Any]:
    """Resolve ``pattern`` under ``root`` into a manifest: paths, sizes, mtimes (and sha256)."""
    check_pattern(pattern)
    if fmt not in FORMATS:
        raise SourceError(f"source.format must be one of {', '.join(FORMATS)}")
    root = root.resolve()
    if not root.is_dir():
        raise SourceError("the source root does not exist on this server")
    walk = _Walk(root, max_entries)
    files: dict[str, dict[str, Any]] = {}
    total = 0
    for match in walk.matches(tuple(pattern.split("/"))):
        entry = _entry(root, match)
        if entry is None or entry["path"] in files:  # a directory, or a second link to a file
            continue
        files[entry["path"]] = entry
        total += entry["size"]
        if len(files) > max_files:
            raise SourceError(f"source.path matches more than {max_files} files")
        if total > max_bytes:
            raise SourceError(f"source.path matches more than {max_bytes} bytes")
    if not files:
        raise SourceError(f"source.path {pattern!r} matches no file under the source root")
    manifest = [files[p] for p in sorted(files)]
    if total <= hash_max_bytes:
        for entry, digest in zip(manifest, map_on_cores(lambda e: _hash(root, e), manifest),
                                 strict=True):
            entry["sha256"] = digest
    return {"format": fmt, "files": manifest, "total_bytes": total}


def _hash(root: Path, entry: dict[str, Any]) -> str:
    try:
        return sha256_file(root / entry["path"], size=entry["size"])
    except OSError as exc:  # NotRegularFile too: replaced since the walk saw it
        raise SourceError(f"{entry['path']} changed while it was being hashed") from exc


class _Walk:
    """Expands a checked pattern below ``root``, counting every directory entry it looks at."""

    def __init__(self, root: Path, max_entries: int) -> None:
        self.root = root
        self.max_entries = max_entries
        self.seen = 0

    def matches(self, parts: tuple[str, ...]) -> Iterator[Path]:
        # Depth-first over (directory, index of the next part, depth); every directory pushed
        # is a real path inside the root, so nothing below it can lead out unnoticed.
        stack: list[tuple[Path, int, int]] = [(self.root, 0, 0)]
        while stack:
            folder, index, depth = stack.pop()
            if index == len(parts):
                yield folder
                continue
            part, last = parts[index], index == len(parts) - 1
            if part == "**":
                stack.append((folder, index + 1, depth))
                for child in self._children(folder):
                    if child.is_dir(follow_symlinks=False):
                        if depth >= MAX_DEPTH:
                            raise SourceError(
                                f"'**' in source.path reaches deeper than {MAX_DEPTH} levels")
                        stack.append((Path(child.path), index, depth + 1))
                continue
            if _WILDCARDS & set(part):
                names = [c.name for c in self._children(folder) if fnmatch.fnmatchcase(c.name, part)]
            else:
                names = [part] if self._exists(folder / part) else []
            for name in sorted(names, reverse=True):
                path = folder / name
                if last:
                    yield path
                    continue
                real = _resolve_inside(self.root, path)
                if real.is_dir():
                    stack.append((real, index + 1, depth + 1))

    def _count(self) -> None:
        self.seen += 1
        if self.seen > self.max_entries:
            raise SourceError(f"source.path looks at more than {self.max_entries} directory "
                              "entries; use a narrower pattern")

    def _children(self, folder: Path) -> list[os.DirEntry[str]]:
        children = []
        try:
            with os.scandir(folder) as entries:
                for child in entries:
                    self._count()
                    children.append(child)
        except OSError as exc:
            name = _relative_name(self.root, folder)
            raise SourceError(f"{name} cannot be listed: {exc.strerror}") from None
        return children

    def _exists(self, path: Path) -> bool:
        self._count()
        try:
            os.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:  # a name too long, a file where a directory was expected, ...
            raise SourceError(f"{_relative_name(self.root, path)} cannot be read: {exc.strerror}") from None
        return True


def _entry(root: Path, match: Path) -> dict[str, Any] | None:
    """The manifest entry of one match, ``None`` for a directory; refuses anything unsafe."""
    resolved = _resolve_inside(root, match)
    info = resolved.stat()
    if stat.S_ISDIR(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):
        raise SourceError(f"{_relative_name(root, match)} is not a regular file")
    relative = str(resolved.relative_to(root))
    if _GLOB_CHARS & set(relative):
        # DuckDB expands file lists as globs: such a name would read other files.
        raise SourceError(f"{_relative_name(root, match)}: paths must not contain "
                          "glob characters (* ? [ ] { })")
    if relative.endswith(".zst"):
        # Bronze reads gzip only, counting what it decompresses to (LAKESAGA_MAX_INGEST_BYTES).
        raise SourceError(f"{_relative_name(root, match)}: zstd-compressed files are not "
                          "supported; use gzip (.gz) or uncompressed files")
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError("source.path matches a file whose name is not valid UTF-8") from None
    # The inode and its ctime (which no user can set) tell bronze that a file too large to be
    # hashed here is the one accepted, unwritten since.
    return {"path": relative, "size": info.st_size, "mtime": info.st_mtime,
            "inode": info.st_ino, "ctime_ns": info.st_ctime_ns}


def _resolve_inside(root: Path, path: Path) -> Path:
    """``path`` with every symlink resolved, refused unless it stays inside ``root``.

    Every caller passes a name in a directory that is itself resolved and inside the root
    (the walk only descends into such directories), so a name that is no symlink is already
    resolved: one ``lstat`` instead of one per component of the whole path.
    """
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return path
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # gone, a dangling link or a symlink loop
        raise SourceError(f"{_relative_name(root, path)} cannot be resolved") from exc
    if not resolved.is_relative_to(root):
        # Name the link inside the root, never what lies outside it.
        raise SourceError("source.path matches a symlink that leads outside the source root")
    return resolved


def _relative_name(root: Path, path: Path) -> str:
    """How an error message names ``path``: relative to the root, as printable UTF-8."""
    if not path.is_relative_to(root):
        return "a matched path"
    return str(path.relative_to(root)).encode("utf-8", "backslashreplace").decode("utf-8")
