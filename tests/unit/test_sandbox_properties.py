"""Property tests of the two validators that stand between request text and the machine: the
source path sandbox (``check_pattern``/``resolve_manifest``) and the SQL identifier check
(``check_identifier``/``quote``)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.lakehouse.bronze import SourceChanged, verify_manifest
from app.lakehouse.pipeline import IDENTIFIER, SpecError, check_identifier, quote
from app.lakehouse.sources import SourceError, check_pattern, resolve_manifest

FS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the source path sandbox -------------------------------------------------------------------

NAMES = ["a", "b", "ok", "x.ndjson", "y.csv", ".hidden", "in", "out", "ev[1].ndjson"]
#: Symlink targets: relative ones inside and outside the root, absolute ones outside, loops.
TARGETS = ["x.ndjson", "a", "../x.ndjson", "../a", "../../outside", "../../outside/secret.ndjson",
           "{outside}", "{outside}/secret.ndjson", "{root}/a", ".", "..", "missing", "/dev/null"]
KINDS = ["file", "file", "file", "dir", "dir", "link", "link", "fifo"]

entries = st.lists(
    st.tuples(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
              st.sampled_from(KINDS), st.sampled_from(TARGETS), st.binary(max_size=40)),
    max_size=14,
)
#: Pattern components: plausible globs, and hostile ones mixed in now and then.
plain = st.sampled_from(["*", "**", "?", "*.ndjson", "a", "b", "ok", "in", "out", "x.ndjson",
                         "[a-o]*", ".hidden", "[!x]*", "o?t", "*.*"])
hostile = st.sampled_from(["..", ".", "", "~", "*/", "a**", "\\", "\x00", "\n"])
globs = st.one_of(st.lists(plain, min_size=1, max_size=4).map("/".join),
                  st.lists(st.one_of(plain, plain, plain, hostile), min_size=1, max_size=4)
                  .map("/".join))
patterns = st.one_of(globs, globs, st.text(max_size=40),
                     st.text(alphabet="*?[]/.~\\ab\x00\n", max_size=20))


#: Links out of the root that a tree may start with.
LEAKS = [(["ok", "leak.ndjson"], "link", "{outside}/secret.ndjson", b""),
         (["out"], "link", "{outside}", b""), (["in", "up"], "link", "../..", b"")]


@contextmanager
def tree(spec: list[tuple[list[str], str, str, bytes]], leaks: bool = False) -> Iterator[Path]:
    """A source root with ``ok/x.ndjson``, ``in/b``, maybe ``LEAKS``, and ``spec``, beside an
    ``outside`` folder holding secret files."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp).resolve()
        root, outside = base / "raw", base / "outside"
        root.mkdir()
        (outside / "sub").mkdir(parents=True)
        (outside / "secret.ndjson").write_text('{"S3cretCanary": 1}\n')
        (outside / "sub" / "x.ndjson").write_text('{"S3cretCanary": 2}\n')
        base_files = [(["ok", "x.ndjson"], "file", "", b"{}\n"), (["in", "b"], "file", "", b"")]
        for parts, kind, target, content in [*base_files, *(LEAKS if leaks else []), *spec]:
            path = root.joinpath(*parts)
            if not _make_parents(root, path) or os.path.lexists(path):
                continue  # a parent is a file or a link: the generated tree is just smaller
            if kind == "file":
                path.write_bytes(content)
            elif kind == "dir":
                path.mkdir()
            elif kind == "link":
                path.symlink_to(target.format(root=root, outside=outside))
            else:
                os.mkfifo(path)
        yield root


def _make_parents(root: Path, path: Path) -> bool:
    """Create the directories above ``path`` without following any link (never outside)."""
    folder = root
    for part in path.relative_to(root).parts[:-1]:
        folder = folder / part
        if not os.path.lexists(folder):
            folder.mkdir()
        elif folder.is_symlink() or not folder.is_dir():
            return False
    return True


def _check_manifest(root: Path, pattern: str) -> None:
    try:
        manifest = resolve_manifest(root, pattern, "json", max_files=50, max_bytes=10**6,
                                    hash_max_bytes=10**6, max_entries=5_000)
    except SourceError as exc:
        assert "S3cretCanary" not in str(exc)
        return
    assert manifest["files"], "an accepted pattern matches at least one file"
    for entry in manifest["files"]:
        relative = Path(entry["path"])
        assert not relative.is_absolute() and ".." not in relative.parts
        path = root / relative
        assert path.resolve(strict=True) == path, "the manifest holds resolved paths"
        assert path.is_relative_to(root)
        info = os.lstat(path)
        assert stat.S_ISREG(info.st_mode)
        assert info.st_size == entry["size"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert not set("*?[]{}") & set(entry["path"])
    assert manifest["total_bytes"] == sum(e["size"] for e in manifest["files"])


@FS
@given(spec=entries, leaks=st.booleans(), pattern=patterns)
def test_resolve_manifest__refuses_or_stays_inside_the_root(
        spec: list[tuple[list[str], str, str, bytes]], leaks: bool, pattern: str) -> None:
    with tree(spec, leaks) as root:
        _check_manifest(root, pattern)


@FS
@given(spec=entries, leaks=st.booleans(), pattern=globs)
def test_resolve_manifest__every_file_read_is_inside_the_root(
        spec: list[tuple[list[str], str, str, bytes]], leaks: bool, pattern: str) -> None:
    # Also checked from the other side: nothing outside is opened while resolving.
    with tree(spec, leaks) as root:
        outside = root.parent / "outside"
        for path in outside.rglob("*"):
            os.utime(path, (0, path.stat().st_mtime))
        _check_manifest(root, pattern)
        assert all(path.stat().st_atime == 0 for path in outside.rglob("*") if path.is_file())


@FS
@given(spec=entries, leaks=st.booleans(), data=st.data())
def test_resolve_manifest__globs_over_paths_of_the_tree(
        spec: list[tuple[list[str], str, str, bytes]], leaks: bool, data: st.DataObject) -> None:
    # Patterns made from paths that exist (through links in and out of the root), with some
    # components turned into wildcards, so that most of them match something.
    with tree(spec, leaks) as root:
        paths = [p.relative_to(root).parts for p in root.rglob("*")]
        parts = list(data.draw(st.sampled_from(paths)))
        wild = st.sampled_from(["*", "?*", "[!.]*", "**"])
        for i in range(len(parts)):
            if data.draw(st.booleans()):
                parts[i] = data.draw(wild)
        if data.draw(st.booleans()):
            parts.append(data.draw(st.sampled_from(["*", "x.ndjson", "secret.ndjson", "**"])))
        pattern = "/".join(parts)
        _check_manifest(root, pattern)


@settings(max_examples=500, deadline=None)
@given(pattern=st.text(max_size=80))
def test_check_pattern__accepted_text_is_a_plain_relative_glob(pattern: str) -> None:
    try:
        check_pattern(pattern)
    except SourceError:
        return
    parts = pattern.split("/")
    assert pattern and not pattern.startswith(("/", "~"))
    assert not re.search(r"[\x00-\x1f\x7f\\]", pattern)
    assert all(part not in ("", ".", "..") for part in parts)
    assert all(part == "**" or "**" not in part for part in parts)
    pattern.encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(original=st.binary(min_size=1, max_size=64), replacement=st.binary(min_size=1, max_size=64))
def test_verify_manifest__any_change_after_accept_is_caught(original: bytes,
                                                            replacement: bytes) -> None:
    with tree([]) as root:
        path = root / "f.ndjson"
        path.write_bytes(original)
        manifest = resolve_manifest(root, "f.ndjson", "json", max_files=1, max_bytes=100,
                                    hash_max_bytes=100)
        info = path.stat()
        path.write_bytes(replacement)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # even with the mtime restored
        if replacement == original:
            verify_manifest(root, manifest, {})
        else:
            with pytest.raises(SourceChanged):
                verify_manifest(root, manifest, {})


# -- SQL identifiers ---------------------------------------------------------------------------

IDENT_START = string.ascii_lowercase
IDENT_REST = string.ascii_lowercase + string.digits + "_"


def is_identifier(name: str) -> bool:
    """The rule, written independently of the regex: ``^[a-z][a-z0-9_]{0,62}$``."""
    return (1 <= len(name) <= 63 and name[0] in IDENT_START
            and all(c in IDENT_REST for c in name[1:]))


valid_names = st.from_regex(IDENTIFIER, fullmatch=True)
hostile = st.sampled_from(['"', "'", ";", " ", "\n", "\x00", "A", "é", "ı", "-", ".", "`", "$",
                           "\\", "/*", "--", "K", "\u212a", "０", "\t"])
near_misses = st.builds(lambda name, bad, at: name[:at] + bad + name[at:], valid_names, hostile,
                        st.integers(0, 63))
names = st.one_of(st.text(max_size=70), valid_names, near_misses,
                  st.text(alphabet=IDENT_REST, min_size=60, max_size=66))


@settings(max_examples=1000, deadline=None)
@given(name=names)
def test_check_identifier__accepts_exactly_the_rule(name: str) -> None:
    if is_identifier(name):
        assert check_identifier(name) == name
    else:
        with pytest.raises(SpecError):
            check_identifier(name)


_DUCK = duckdb.connect()


@settings(max_examples=500, deadline=None)
@given(name=names)
def test_quote__is_a_safe_quoted_identifier_or_refuses(name: str) -> None:
    internal = name.startswith("_") and is_identifier(name[1:]) and len(name) <= 63
    if not (is_identifier(name) or internal):
        with pytest.raises(SpecError):
            quote(name)
        return
    quoted = quote(name)
    assert quoted == f'"{name}"' and quoted.count('"') == 2
    # DuckDB reads it back as exactly one identifier with exactly that name.
    cur = _DUCK.cursor()
    cur.execute(f"SELECT 1 AS {quoted}")
    assert [d[0] for d in cur.description] == [name]
    cur.execute(f"CREATE OR REPLACE TEMP TABLE t ({quoted} INTEGER)")
    assert cur.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 't'"
                       ).fetchall() == [(name,)]
