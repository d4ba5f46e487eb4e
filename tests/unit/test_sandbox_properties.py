"""Property tests of the validators that stand between outside text and the machine: the source
path sandbox (``check_pattern``/``resolve_manifest``), the SQL identifier check
(``check_identifier``/``quote``) and the spec SQL allowlist (``check_rule``/``check_aggregation``).
"""

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

from app.lakehouse import silver
from app.lakehouse.pinned import SourceChanged, verify_manifest
from app.lakehouse.pipeline import IDENTIFIER, SpecError, check_identifier, quote
from app.lakehouse.sources import SourceError, check_pattern, resolve_manifest
from app.lakehouse.spec_sql import SpecSQLError, allowed_functions, check_aggregation, check_rule

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


def test_verify_manifest__many_files_report_the_first_change_in_manifest_order() -> None:
    with tree([]) as root:
        for i in range(8):
            (root / f"f{i}.ndjson").write_bytes(b"x" * (1000 + i))
        manifest = resolve_manifest(root, "*.ndjson", "json", max_files=10, max_bytes=10**6,
                                    hash_max_bytes=0)
        hashes = verify_manifest(root, manifest, {})  # hashed on several threads
        assert hashes == {f"f{i}.ndjson": hashlib.sha256(b"x" * (1000 + i)).hexdigest()
                          for i in range(8)}
        for i in (6, 3):  # two files change; f3 comes first in the manifest
            path = root / f"f{i}.ndjson"
            info = path.stat()
            path.write_bytes(b"y" * (1000 + i))
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        with pytest.raises(SourceChanged, match=r"^source file f3\.ndjson changed"):
            verify_manifest(root, manifest, hashes)
        (root / "f5.ndjson").unlink()
        with pytest.raises(SourceChanged, match=r"^source file f3\.ndjson changed"):
            verify_manifest(root, manifest, hashes)


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


# -- spec SQL ----------------------------------------------------------------------------------

_PLAIN = duckdb.connect()
#: Every function, table function, pragma and keyword DuckDB knows, and what they parse to.
_KNOWN_NAMES = sorted(
    {n for (n,) in _PLAIN.execute("SELECT function_name FROM duckdb_functions()").fetchall()}
    | {n for (n,) in _PLAIN.execute("SELECT keyword_name FROM duckdb_keywords()").fetchall()}
    | {"sqlite_scan", "sqlite_attach", "postgres_scan", "postgres_query", "postgres_execute",
       "ducklake_snapshots", "getenv"})
#: Names the parser reads as SQL syntax, not as a call (``not(x)``, ``coalesce(x)``, ...).
_SYNTAX = {"coalesce", "columns", "grouping", "grouping_id", "interval", "not", "select", "try",
           "unpack"}
SPEC_COLUMNS = frozenset({"event_id", "event_type", "duration_ms"})


def _accepts(check: object, sql: str) -> bool:
    try:
        check(sql, SPEC_COLUMNS)  # type: ignore[operator]
    except SpecSQLError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(name=st.one_of(st.from_regex(IDENTIFIER, fullmatch=True), st.sampled_from(_KNOWN_NAMES)),
       qualifier=st.sampled_from(["", "", "", "main.", "system.main.", "pg_catalog.", "lake.main.",
                                  "memory.main.", "__ducklake_metadata_lake.main."]))
def test_spec_sql__calls_only_allowed_functions(name: str, qualifier: str) -> None:
    call = f"{qualifier}{name}(duration_ms)"
    if _accepts(check_rule, f"{call} IS NULL"):
        assert name.lower() in allowed_functions() or name in _SYNTAX, call
        assert qualifier in ("", "main.", "system.main."), call
    # Never as a FROM item.
    assert not _accepts(check_aggregation, f"SELECT 1 AS dimension, 1 AS metric, 1 AS value "
                                           f"FROM {call}")


#: FROM items and expressions, each marked whether it stays inside ``{silver}``.
_SOURCES = [("{silver}", True), ("(SELECT * FROM {silver})", True),
            ("(FROM {silver} WHERE duration_ms > 0)", True), ("(VALUES (1, 'v'))", True),
            ("c", True), ("secret", False), ("memory.main.secret", False),
            ("silver_rows", False), ("read_csv('/etc/passwd')", False), ("'/etc/passwd'", False),
            ("range(3)", False), ("glob('*')", False), ("(SELECT * FROM secret)", False),
            ("(SELECT * FROM {silver} JOIN silver_rows USING (event_id))", False),
            ("(SELECT * FROM {silver}, read_text('/etc/hostname'))", False)]
_CALLS = [("lower", True), ("md5", True), ("length", True), ("getenv", False),
          ("current_setting", False), ("read_text", False), ("json_serialize_plan", False)]


@st.composite
def aggregations(draw: st.DrawFn) -> tuple[str, bool]:
    """An aggregation from the pieces above, and whether every piece is safe."""
    safe = True
    with_cte = draw(st.booleans())

    def source(alias: str, cte_visible: bool) -> str:
        nonlocal safe
        text, ok = draw(st.sampled_from(_SOURCES))
        safe &= ok and (text != "c" or cte_visible)
        return f"{text} AS {alias}"

    def call() -> str:
        nonlocal safe
        name, ok = draw(st.sampled_from(_CALLS))
        safe &= ok
        return f"{name}('x')"

    sql = f"WITH c AS (SELECT * FROM {source('b', False)}) " if with_cte else ""
    value = draw(st.sampled_from(["count(*)", "sub", "call"]))
    if value == "sub":
        value = f"(SELECT count(*) FROM {source('s', with_cte)})"
    elif value == "call":
        value = f"length(CAST({call()} AS VARCHAR))"
    sql += f"SELECT 'd' AS dimension, 'm' AS metric, {value} AS value FROM {source('t1', with_cte)}"
    if draw(st.booleans()):
        sql += f" CROSS JOIN {source('t2', with_cte)}"
    if draw(st.booleans()):
        sql += f" UNION ALL SELECT 'e', 'n', 1 FROM {source('t3', with_cte)}"
    return sql, safe


def _runtime() -> duckdb.DuckDBPyConnection:
    """Where accepted SQL is run in the pipeline's shape: silver rows, nothing else readable."""
    con = duckdb.connect(config={"enable_external_access": "false"})
    con.execute("CREATE TABLE silver_rows AS SELECT * FROM (VALUES ('a', 'click', 5), "
                "('b', 'search', 0)) AS v(event_id, event_type, duration_ms)")
    return con


_RUNTIME = _runtime()


@settings(max_examples=400, deadline=None)
@given(case=aggregations())
def test_spec_sql__aggregation_accepted_iff_it_reads_only_silver(case: tuple[str, bool]) -> None:
    sql, safe = case
    assert _accepts(check_aggregation, sql) == safe, sql
    if safe:  # and it runs where gold runs it
        _RUNTIME.cursor().execute(
            "SELECT * FROM (" + sql.replace("{silver}", "(SELECT * FROM silver_rows)") + ")"
        ).fetchall()


_TERMS = [("duration_ms", True), ("length(event_type)", True), ("abs(-1)", True),
          ("year({partition_date})", True), ("(SELECT count(*) FROM (VALUES (1)) AS v(x))", True),
          ("(SELECT count(*) FROM secret)", False), ("(SELECT count(*) FROM silver_rows)", False),
          ("(SELECT count(*) FROM read_csv('/etc/passwd'))", False),
          ("(SELECT count(*) FROM range(3))", False), ("length(getenv('HOME'))", False),
          ("length(current_setting('threads'))", False), ("nextval('s')", False),
          ("length(current_user)", False)]


@settings(max_examples=300, deadline=None)
@given(terms=st.lists(st.tuples(st.sampled_from(_TERMS), st.sampled_from(["<", ">=", "<>"]),
                                st.sampled_from(_TERMS)), min_size=1, max_size=3),
       joiner=st.sampled_from([" AND ", " OR "]))
def test_spec_sql__rule_accepted_iff_it_reads_only_its_row(
        terms: list[tuple[tuple[str, bool], str, tuple[str, bool]]], joiner: str) -> None:
    check = joiner.join(f"{a} {op} {b}" for (a, _), op, (b, _) in terms)
    safe = all(a_ok and b_ok for (_, a_ok), _, (_, b_ok) in terms)
    assert _accepts(check_rule, check) == safe, check
    if safe:  # and it runs where silver runs it
        pasted = check.replace("{partition_date}", silver.PARTITION_DATE)
        _RUNTIME.cursor().execute(f"SELECT coalesce(({pasted}), FALSE) FROM silver_rows "
                                  f"WHERE {silver.PARTITION_DATE} IS NOT NULL",
                                  {"partition_date": "2026-01-06"}).fetchall()


def test_verify_manifest__unhashed_file_rewritten_with_its_mtime_restored_is_caught() -> None:
    # A source too large to be hashed at accept has no sha256 in its manifest: a same-size
    # rewrite with the mtime put back is caught by the inode's ctime, a rename-swap by the inode.
    for swap in ("rewrite", "rename"):
        with tree([]) as root:
            path = root / "f.ndjson"
            path.write_bytes(b'{"a": "1"}\n')
            manifest = resolve_manifest(root, "f.ndjson", "json", max_files=1, max_bytes=100,
                                        hash_max_bytes=0)
            assert "sha256" not in manifest["files"][0]
            info = path.stat()
            if swap == "rewrite":
                path.write_bytes(b'{"a": "2"}\n')
            else:
                (root / "g.tmp").write_bytes(b'{"a": "2"}\n')
                os.replace(root / "g.tmp", path)
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
            with pytest.raises(SourceChanged, match=r"^source file f\.ndjson changed after"):
                verify_manifest(root, manifest, {})
