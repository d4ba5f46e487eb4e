"""Source resolution: a request's relative glob becomes a frozen manifest of regular files that
all lie inside the configured source root (symlinks resolved), within the configured limits."""

from __future__ import annotations

import stat
from pathlib import Path, PurePosixPath
from typing import Any

from app.lakehouse.bronze import sha256_file

FORMATS = ("json", "csv", "parquet")
_GLOB_CHARS = set("*?[]{}")


class SourceError(ValueError):
    """The requested source cannot be ingested; the message is safe to show the client."""


def check_pattern(pattern: str) -> str:
    if not pattern or len(pattern) > 1024:
        raise SourceError("source.path must be a non-empty glob of at most 1024 characters")
    if "\x00" in pattern or "\\" in pattern:
        raise SourceError("source.path must not contain NUL or backslash characters")
    path = PurePosixPath(pattern)
    if path.is_absolute() or pattern.startswith("~"):
        raise SourceError("source.path must be relative to the source root, not absolute")
    if any(part == ".." for part in path.parts):
        raise SourceError("source.path must not contain '..'")
    return pattern


def resolve_manifest(root: Path, pattern: str, fmt: str, *, max_files: int, max_bytes: int,
                     hash_max_bytes: int) -> dict[str, Any]:
    """Resolve ``pattern`` under ``root`` into a manifest: paths, sizes, mtimes (and sha256)."""
    check_pattern(pattern)
    if fmt not in FORMATS:
        raise SourceError(f"source.format must be one of {', '.join(FORMATS)}")
    root = root.resolve()
    if not root.is_dir():
        raise SourceError("the source root does not exist on this server")
    files: list[dict[str, Any]] = []
    total = 0
    try:
        matches = sorted(root.glob(pattern))
    except (ValueError, IndexError) as exc:  # pathlib rejects some patterns this way
        raise SourceError(f"source.path {pattern!r} is not a valid glob") from exc
    for match in matches:
        try:
            resolved = match.resolve(strict=True)
        except (OSError, RuntimeError) as exc:  # dangling link or a symlink loop
            raise SourceError(f"{match.relative_to(root)} cannot be resolved") from exc
        if not resolved.is_relative_to(root):
            # Name the link inside the root, never what lies outside it.
            raise SourceError("source.path matches a symlink that leads outside the source root")
        info = resolved.stat()
        if stat.S_ISDIR(info.st_mode):
            continue
        if not stat.S_ISREG(info.st_mode):
            raise SourceError(f"{match.relative_to(root)} is not a regular file")
        if _GLOB_CHARS & set(str(resolved.relative_to(root))):
            # DuckDB expands file lists as globs: such a name would read other files.
            raise SourceError(f"{match.relative_to(root)}: paths must not contain "
                              "glob characters (* ? [ ] { })")
        total += info.st_size
        files.append({"path": str(resolved.relative_to(root)), "size": info.st_size,
                      "mtime": info.st_mtime})
        if len(files) > max_files:
            raise SourceError(f"source.path matches more than {max_files} files")
        if total > max_bytes:
            raise SourceError(f"source.path matches more than {max_bytes} bytes")
    if not files:
        raise SourceError(f"source.path {pattern!r} matches no file under the source root")
    if total <= hash_max_bytes:
        for entry in files:
            entry["sha256"] = sha256_file(root / entry["path"])
    return {"format": fmt, "files": files, "total_bytes": total}
