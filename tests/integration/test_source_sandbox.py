"""The source sandbox: request globs resolve to regular files inside the source root only,
within the limits, and a file changed between accept and bronze fails the saga cleanly."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lakesaga_live import PARTITION, Live

from app.lakehouse import sources
from app.lakehouse.sources import SourceError, resolve_manifest

LIMITS = {"max_files": 100, "max_bytes": 1_000_000, "hash_max_bytes": 1_000_000}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A source root with ``ok/a.ndjson`` and ``ok/b.ndjson``, beside an ``outside`` folder."""
    root = tmp_path / "raw"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "a.ndjson").write_text('{"event_id": "a"}\n')
    (root / "ok" / "b.ndjson").write_text('{"event_id": "b"}\n')
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.ndjson").write_text('{"S3cretCanary": 1}\n')
    return root


def _manifest(root: Path, pattern: str, **limits: int) -> dict[str, Any]:
    return resolve_manifest(root, pattern, "json", **{**LIMITS, **limits})


def _refused(root: Path, pattern: str, **limits: int) -> str:
    with pytest.raises(SourceError) as caught:
        _manifest(root, pattern, **limits)
    message = str(caught.value)
    assert "S3cretCanary" not in message and "outside/" not in message
    return message


_ABSOLUTE, _UP, _CONTROL = "not absolute", "must not contain '..'", "NUL, control or backslash"
_EMPTY = "empty or '.' components"


@pytest.mark.parametrize(("pattern", "reason"), [
    ("/etc/passwd", _ABSOLUTE), ("//etc/passwd", _ABSOLUTE), ("~/x", _ABSOLUTE),
    ("~root/.bashrc", _ABSOLUTE), ("../outside/secret.ndjson", _UP),
    ("ok/../../outside/*.ndjson", _UP), ("ok/..", _UP), ("..", _UP),
    ("ok\\a.ndjson", _CONTROL), ("ok/a.ndjson\x00.txt", _CONTROL), ("ok/\x01*", _CONTROL),
    ("ok/a\n.ndjson", _CONTROL), ("ok/\x7f", _CONTROL), ("ok//a.ndjson", _EMPTY),
    ("./ok/a.ndjson", _EMPTY), ("ok/./a.ndjson", _EMPTY), ("ok/", _EMPTY), (".", _EMPTY),
    ("", "non-empty glob"), ("x" * 1025, "at most 1024 characters"),
    ("a**b", "whole component"), ("ok/**x", "whole component"),
    ("**/**/*.ndjson", "'**' once"), ("/".join(["d"] * 65), "more than 64 components"),
    ("ok/\ud800.ndjson", "valid UTF-8"),
])
def test_pattern__refused(root: Path, pattern: str, reason: str) -> None:
    assert reason in _refused(root, pattern)


def test_pattern__relative_glob_resolves_regular_files(root: Path) -> None:
    manifest = _manifest(root, "ok/*.ndjson")
    assert [f["path"] for f in manifest["files"]] == ["ok/a.ndjson", "ok/b.ndjson"]
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"])
    assert [f["path"] for f in _manifest(root, "**/*.ndjson")["files"]] == [
        "ok/a.ndjson", "ok/b.ndjson"]
    assert [f["path"] for f in _manifest(root, "o?/[a]*")["files"]] == ["ok/a.ndjson"]


def test_symlink__file_outside_is_refused(root: Path) -> None:
    (root / "ok" / "c.ndjson").symlink_to(root.parent / "outside" / "secret.ndjson")
    assert "outside the source root" in _refused(root, "ok/*.ndjson")
    assert "outside the source root" in _refused(root, "ok/c.ndjson")
    assert "outside the source root" in _refused(root, "**/*.ndjson")


@pytest.mark.parametrize("pattern", ["out/*.ndjson", "out/secret.ndjson", "*/secret.ndjson",
                                     "o*/*", "out/**/*.ndjson", "out"])
def test_symlink__directory_outside_holding_a_file_is_refused(root: Path, pattern: str) -> None:
    (root / "out").symlink_to(root.parent / "outside")
    assert "outside the source root" in _refused(root, pattern)


def test_symlink__double_star_does_not_walk_through_a_directory_link(root: Path) -> None:
    # '**' never follows a symlinked directory (as pathlib), so the link's content is not seen.
    (root / "ok" / "out").symlink_to(root.parent / "outside")
    manifest = _manifest(root, "**/*.ndjson")
    assert [f["path"] for f in manifest["files"]] == ["ok/a.ndjson", "ok/b.ndjson"]


def test_symlink__inside_the_root_is_resolved_and_deduplicated(root: Path) -> None:
    (root / "alias").symlink_to(root / "ok")
    (root / "ok" / "again.ndjson").symlink_to("a.ndjson")
    manifest = _manifest(root, "alias/*.ndjson")
    assert [f["path"] for f in manifest["files"]] == ["ok/a.ndjson", "ok/b.ndjson"]


def test_symlink__loop_and_dangling_are_refused(root: Path) -> None:
    (root / "loop").mkdir()
    (root / "loop" / "a.ndjson").symlink_to("b.ndjson")
    (root / "loop" / "b.ndjson").symlink_to("a.ndjson")
    (root / "dangling").mkdir()
    (root / "dangling" / "x.ndjson").symlink_to("nowhere.ndjson")
    assert "cannot be resolved" in _refused(root, "loop/*.ndjson")
    assert "cannot be resolved" in _refused(root, "dangling/*")
    (root / "dirloop").symlink_to("dirloop")
    assert "cannot be resolved" in _refused(root, "dirloop/*.ndjson")


def test_special_files__fifo_socket_and_device_are_refused(root: Path) -> None:
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "x.ndjson")
    assert "not a regular file" in _refused(root, "fifo/*")
    (root / "sock").mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock" / "x.ndjson"))
        assert "not a regular file" in _refused(root, "sock/*")
    (root / "dev").mkdir()
    (root / "dev" / "null.ndjson").symlink_to("/dev/null")  # a device, and outside the root
    assert "outside the source root" in _refused(root, "dev/*")  # resolved before typed


def test_limits__files_and_bytes(root: Path) -> None:
    assert "more than 1 files" in _refused(root, "ok/*", max_files=1)
    assert "more than 20 bytes" in _refused(root, "ok/*", max_bytes=20)
    assert "no file" in _refused(root, "ok/*.csv")


def test_limits__a_huge_tree_is_cut_off_while_walking(root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    wide = root / "wide"
    wide.mkdir()
    for i in range(300):
        (wide / f"d{i:03}").mkdir()
    listed: list[Path] = []
    real_scandir = os.scandir

    def scandir(path: Path) -> Any:
        listed.append(Path(path))
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    message = _refused(root, "**/*.ndjson", max_entries=100)
    assert "more than 100 directory entries" in message
    assert len(listed) < 10  # stopped long before listing the 300 directories


def test_limits__too_many_matches_stop_the_walk_early(root: Path) -> None:
    many = root / "many"
    many.mkdir()
    for i in range(50):
        (many / f"e{i:02}.ndjson").write_text("{}\n")
    # Hashing happens after the walk: a refused match set is never hashed.
    assert "more than 10 files" in _refused(root, "many/*.ndjson", max_files=10)


def test_limits__double_star_depth(root: Path) -> None:
    deep = root
    for _ in range(sources.MAX_DEPTH + 2):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "x.ndjson").write_text("{}\n")
    assert "deeper than" in _refused(root, "**/x.ndjson")


def test_names__zstd_files_are_refused_at_accept(root: Path) -> None:
    (root / "z").mkdir()
    (root / "z" / "events.ndjson.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    assert "z/events.ndjson.zst: zstd-compressed files are not supported" in _refused(root, "z/*")


def test_names__glob_characters_and_non_utf8_are_refused(root: Path) -> None:
    (root / "g").mkdir()
    (root / "g" / "ev[1].ndjson").write_text("{}\n")
    assert "glob characters" in _refused(root, "g/*")
    raw = os.fsencode(root) + b"/bytes"
    os.mkdir(raw)
    with open(raw + b"/\xff.ndjson", "wb") as fh:
        fh.write(b"{}\n")
    assert "UTF-8" in _refused(root, "bytes/*")


# -- accept -> bronze: the frozen manifest is verified before any row is read ------------------

def _replace_by_outside_link(victim: Path) -> None:
    victim.unlink()
    victim.symlink_to(victim.parents[3] / "outside" / "secret.ndjson")


def _replace_by_inside_link(victim: Path) -> None:
    other = victim.with_name("copy.bin")
    other.write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(other.name)


def _rewrite_same_size(victim: Path) -> None:
    info = victim.stat()
    content = victim.read_bytes()
    victim.write_bytes(content.replace(b"u0", b"x0", 1))
    os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))  # hide it from the mtime check


def _replace_by_fifo(victim: Path) -> None:
    victim.unlink()
    os.mkfifo(victim)


TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "appended": (lambda p: p.write_bytes(p.read_bytes() + b'{"event_id": "late"}\n'),
                 "changed after the saga was accepted (size"),
    "same_size_other_content": (_rewrite_same_size, "different content, same size"),
    "deleted": (lambda p: p.unlink(), "disappeared after the saga was accepted"),
    "link_outside": (_replace_by_outside_link, "now resolves outside the source root"),
    "link_inside": (_replace_by_inside_link, "is now a symlink"),
    "fifo": (_replace_by_fifo, "is not a regular file"),
}


@pytest.fixture
def slow_bronze(live_factory: Callable[..., Live], tmp_path: Path) -> Iterator[Live]:
    """A live server whose bronze step waits 1.5 s before it looks at the files."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.ndjson").write_text('{"S3cretCanary": 1}\n')
    yield live_factory(faults="ingest_to_bronze=sleep:1500")


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_bronze__file_tampered_after_accept_compensates(slow_bronze: Live, kind: str) -> None:
    live = slow_bronze
    live.generate(records=300, files=2)
    resp = live.submit()
    assert resp.status_code == 202, resp.text
    started = time.monotonic()
    tamper, expected = TAMPERING[kind]
    victim = sorted((live.source_root / "clickstream" / PARTITION).glob("*.ndjson"))[-1]
    tamper(victim)
    assert time.monotonic() - started < 1.0, "tampered too late: bronze may have read the file"
    saga = live.wait(resp.json()["id"])
    assert saga["status"] == "compensated", saga
    assert expected in saga["error"], saga["error"]
    assert "S3cretCanary" not in saga["error"]
    bronze = {s["name"]: s for s in saga["steps"]}["ingest_to_bronze"]
    assert bronze["status"] in ("failed", "compensated"), bronze
    assert live.lake_count("bronze") == 0


def test_saga__symlinked_directory_inside_the_root_succeeds(live: Live) -> None:
    live.generate(records=300, files=2)
    (live.source_root / "alias").symlink_to(live.source_root / "clickstream" / PARTITION)
    resp = live.submit(path="alias/*.ndjson")
    assert resp.status_code == 202, resp.text
    saga = live.wait(resp.json()["id"])
    assert saga["status"] == "succeeded", saga["error"]
    assert live.lake_count("bronze") == 300
    assert live.lake_count("silver") > 0
