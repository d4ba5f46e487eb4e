"""Schemathesis against every operation of the OpenAPI document, on the real app: no 5xx and no
response the document does not describe.

The app is ``create_app(service=..., run_workers=False)`` called in-process through
schemathesis's ASGI transport (its lifespan sets ``app.state.service``) on a real saga database
with an admin key, on SQLite and on PostgreSQL. A service with workers first runs three real
sagas, so that reads meet every shape of state: one succeeded (catalogued partition, a webhook
delivered to a loopback receiver), one compensated, one failed (compensation exhausted); a
fourth stays pending. Each test gets its own copy of that database (an SQLite backup, or a
PostgreSQL database made from it as a template).

``test_api__happy_paths_conform_to_openapi`` calls every operation once with inputs that must
succeed and checks the 2xx answer, so success bodies are always validated.
``test_api__conforms_to_openapi`` fuzzes each operation: 100 fuzzing-phase examples (about half
schema-violating) plus the coverage and explicit-examples phases;
``test_api__conforms_to_openapi_on_postgresql`` the same with 25 (it adds about 10 s), for what
only PostgreSQL's driver refuses. Hooks mix the seeded ids, the
catalogued partitions and valid ``POST /sagas`` / ``POST /consumers`` bodies into the generated
data, so that 202, 409 and the like come up beside 404 and 422, and NUL in every path
parameter and in text query parameters (PostgreSQL cannot hold it: a 500 there, once); a valid
``wait`` is cut to 0.2 s (the pending saga would hold the request for up to a minute).
Negative cases that drop the ``Authorization`` header send none and get 401. ``/healthz`` and
``/readyz`` take no input: hypothesis exhausts them after the one possible request. At teardown
the module asserts that the operations fuzzed are exactly those ``GET /openapi.json`` serves,
each with its 100 (or 25) examples.

Checks (schemathesis's defaults minus two, plus one of ours):
  - ``not_a_server_error`` (no 5xx), ``status_code_conformance`` (status documented),
    ``content_type_conformance``, ``response_headers_conformance`` and
    ``response_schema_conformance`` (the body validates): the point of this module;
  - ``unsupported_method``, ``allow_header_conformance`` and our ``allow_names_every_method``
    (a 405 carries an ``Allow`` naming exactly the path's methods; the built-in checks let an
    empty one through), ``ignored_auth`` (missing or wrong credentials are refused),
    ``missing_required_header``, ``max_response_time`` (10 s); ``use_after_free`` and
    ``ensure_resource_availability`` are on but need the stateful phase, which does not run here.
Off:
  - ``positive_data_acceptance``: schema-valid input correctly gets 404 (unknown id), 409, 422
    (a glob matching no file) or 400 (a cursor this API never issued);
  - ``negative_data_rejection``: the hooks swap known-good values into cases generated as
    invalid, and the test re-adds the ``Authorization`` header a negative case removed, so a 2xx
    there is expected.
Found so far, and fixed: ``GET /sagas/{id}/events?after=2**63`` was a 500 (SQLite overflow);
a 405's ``Allow`` named only the first route of the path; ``partition_date=0`` was accepted as
1970-01-01 (pydantic reads a number as a Unix timestamp; dates are now ``YYYY-MM-DD`` text only);
on PostgreSQL, NUL in a path or query parameter was a 500 (now 400 before any route).
"""

from __future__ import annotations

import base64
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.auth import create_key
from app.lakehouse.generator import generate_clickstream
from app.main import create_app
from app.service import Service
from app.settings import Settings

pytestmark = pytest.mark.timeout(300)

MIN_EXAMPLES = 100
#: PostgreSQL answers what SQLite answers; its leg looks for what only its driver refuses (NUL
#: in text, out-of-range integers) with fewer examples, plus the coverage phase.
PG_EXAMPLES = 25
EXCLUDED_CHECKS = [positive_data_acceptance, negative_data_rejection]
#: The happy paths make one request each and send it again for nothing else.
RESPONSE_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
                   response_headers_conformance, response_schema_conformance]
#: Partition dates of the seeded sagas, by the status each ends in.
DAYS = {"succeeded": "2026-01-06", "compensated": "2026-01-07", "failed": "2026-01-08"}
#: aggregate_to_gold fails for the 2nd and 3rd saga; silver's compensation fails from its 2nd
#: hit on (the 1st is the 2nd saga's, which must succeed), so the 3rd saga ends failed.
SEED_FAULTS = "aggregate_to_gold=raise@2-3,delete_silver_partition=raise@2-999"


class LateApp:
    """The ASGI app under test, bound by the ``fuzz`` fixture. The schema is built at import,
    before any database exists (``schemathesis.pytest.from_fixture`` would defer it, but 4.32
    sets ``node._nodeid``, which pytest 9.2 no longer has), and every request, the checks' own
    included, goes to ``schema.app``."""

    app: FastAPI | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert self.app is not None, "the fuzz fixture binds the app"
        await self.app(scope, receive, send)


# The document the tests are generated from (building it touches no database); the fixtures
# check that it is the one the running app serves.
schema = schemathesis.openapi.from_dict(create_app(Settings(), run_workers=False).openapi())
schema.app = late_app = LateApp()


def _operations(document: dict[str, Any]) -> dict[str, bool]:
    """``METHOD /path`` of every operation -> whether it takes any input (parameters, a body or
    credentials)."""
    return {f"{method.upper()} {path}": bool(op.get("parameters") or op.get("requestBody")
                                              or op.get("security"))
            for path, item in document["paths"].items() for method, op in item.items()}


OPERATIONS = _operations(schema.raw_schema)


def _source(day: str) -> dict[str, Any]:
    return {"dataset": "clickstream", "partition_date": day,
            "source": {"path": f"clickstream/{day}/*.ndjson", "format": "json"}}


@dataclass
class Seeded:
    """The saga database every test copies, and what is in it."""

    settings: Settings
    receiver_url: str
    sagas: dict[str, str]  # status -> saga id
    consumer_id: str
    #: A private copy of the seeded saga database (its URL), given a directory for SQLite files.
    copy_database: Callable[[Path], str]


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def _wait(svc: Service, saga_id: str, done: Any, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not done(saga := svc.saga(saga_id)):
        assert time.monotonic() < deadline, f"seed saga stuck: {saga}"
        time.sleep(0.05)
    return saga


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """The seeded saga database on SQLite; each copy is an online backup of the file."""
    tmp = tmp_path_factory.mktemp("seed")
    url = f"sqlite:///{tmp / 'lakesaga.db'}"

    def copy(directory: Path) -> str:
        database = directory / "lakesaga.db"
        with sqlite3.connect(url.removeprefix("sqlite:///")) as source, \
                sqlite3.connect(database) as target:
            source.backup(target)
        source.close()
        target.close()
        return f"sqlite:///{database}"

    return _seed(tmp, url, copy)


@pytest.fixture(scope="module")
def seeded_pg(tmp_path_factory: pytest.TempPathFactory,
              pg_database_factory: Callable[..., str]) -> Seeded:
    """The seeded saga database (and DuckLake catalog) on PostgreSQL; each copy is a database
    created from it as a template."""
    url = pg_database_factory()
    return _seed(tmp_path_factory.mktemp("seed-pg"), url,
                 lambda _: pg_database_factory(template=url.rsplit("/", 1)[1]))


SEEDED = {"sqlite": "seeded", "postgresql": "seeded_pg"}
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _seed(tmp: Path, database_url: str, copy: Callable[[Path], str]) -> Seeded:
    """Run one succeeded, one compensated and one failed saga with real workers; add a pending
    one."""
    settings = Settings(database_url=database_url, source_root=tmp / "raw",
                        lake_dir=tmp / "lake", poll_interval_s=0.05, step_backoff_s=0.01,
                        webhook_allow_hosts=["127.0.0.1"], rate_limit_per_s=0,
                        auth_failure_rate_per_s=0)  # the fuzzer sends wrong keys on purpose
    for day in DAYS.values():
        generate_clickstream(settings.source_root / "clickstream" / day, records=200, files=2,
                             seed=7, partition_date=date.fromisoformat(day))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=httpd.serve_forever, name="seed-webhooks", daemon=True)
    thread.start()
    receiver_url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    svc = Service(settings.model_copy(update={"faults": SEED_FAULTS}))
    try:
        svc.start_workers()
        consumer = svc.add_consumer({"name": "seed", "dataset": "clickstream", "url": receiver_url})
        sagas = {}
        for status, day in DAYS.items():
            saga, _ = svc.submit(_source(day), None)
            sagas[status] = saga["id"]
            assert _wait(svc, saga["id"], lambda s: s["status"] in DAYS)["status"] == status
        _wait(svc, sagas["succeeded"],
              lambda s: [d["status"] for d in s["deliveries"]] == ["delivered"])
    finally:
        svc.close()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    pending = Service(settings)  # no workers from here on: this one stays pending
    try:
        sagas["pending"] = pending.submit(_source(DAYS["succeeded"]), None)[0]["id"]
    finally:
        pending.close()
    return Seeded(settings=settings, receiver_url=receiver_url, sagas=sagas,
                  consumer_id=consumer["id"], copy_database=copy)


@dataclass
class Api:
    """An app on a private copy of the seeded database, and its admin key."""

    app: FastAPI
    service: Service
    headers: dict[str, str]


def _api(seeded: Seeded, directory: Path) -> Api:
    settings = seeded.settings.model_copy(
        update={"database_url": seeded.copy_database(directory)})
    service = Service(settings)
    token, _ = create_key(service.db, "schemathesis", ["admin"])
    return Api(create_app(service=service, run_workers=False), service,
               {"Authorization": f"Bearer {token}"})


def _assert_serves_schema(app: Any, headers: dict[str, str]) -> None:
    with asgi.get_client(app) as client:
        served = client.get("/openapi.json", headers=headers)
    assert served.status_code == 200, served.text
    assert served.json() == schema.raw_schema, "the document tested is not the one served"


@pytest.mark.parametrize("backend", BACKENDS)
def test_api__happy_paths_conform_to_openapi(backend: str, tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    seeded: Seeded = request.getfixturevalue(SEEDED[backend])
    api = _api(seeded, tmp_path)
    sagas = seeded.sagas
    calls: list[tuple[str, dict[str, Any], int]] = [
        ("POST /sagas", {"body": _source(DAYS["succeeded"]),
                         "headers": {"Idempotency-Key": "happy"}}, 202),
        ("POST /sagas", {"body": _source(DAYS["succeeded"]),
                         "headers": {"Idempotency-Key": "happy"}}, 202),  # replayed
        ("GET /sagas", {"query": {"limit": 1}}, 200),
        ("GET /sagas", {"query": {"status": "failed", "dataset": "clickstream",
                                  "partition_date": DAYS["failed"]}}, 200),
        *[("GET /sagas/{saga_id}", {"path_parameters": {"saga_id": i}}, 200)
          for i in sagas.values()],
        *[("GET /sagas/{saga_id}/events", {"path_parameters": {"saga_id": i}}, 200)
          for i in sagas.values()],
        ("POST /sagas/{saga_id}/cancel", {"path_parameters": {"saga_id": sagas["pending"]}}, 202),
        ("POST /sagas/{saga_id}/retry", {"path_parameters": {"saga_id": sagas["failed"]}}, 202),
        ("GET /datasets", {}, 200),
        ("GET /datasets/{name}/partitions/{partition_date}",
         {"path_parameters": {"name": "clickstream", "partition_date": DAYS["succeeded"]}}, 200),
        ("POST /consumers", {"body": {"name": "happy", "dataset": "clickstream",
                                      "url": seeded.receiver_url}}, 201),
        ("GET /consumers", {"query": {"dataset": "clickstream"}}, 200),
        ("DELETE /consumers/{consumer_id}",
         {"path_parameters": {"consumer_id": seeded.consumer_id}}, 204),
        ("GET /healthz", {}, 200),
        ("GET /readyz", {}, 200),
    ]
    assert {label for label, _, _ in calls} == set(OPERATIONS)
    try:
        _assert_serves_schema(api.app, api.headers)
        for label, data, expected in calls:
            method, path = label.split(" ", 1)
            headers = {**data.pop("headers", {}), **api.headers}
            case = schema[path][method].Case(headers=headers, **data)
            response = case.call_and_validate(app=api.app, checks=RESPONSE_CHECKS)
            assert response.status_code == expected, f"{label} {data}: {response.text}"
    finally:
        asgi.shutdown_lifespans()
        api.service.close()


@dataclass
class Known:
    """Seeded values the hooks below mix into generated data."""

    path_parameters: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    bodies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: By operation label: query parameters to send instead of the generated ones.
    queries: dict[str, list[dict[str, str]]] = field(default_factory=dict)


_known = Known()


@dataclass
class Fuzz:
    headers: dict[str, str]
    #: Fuzzing-phase examples each operation must get.
    min_examples: int
    #: Fuzzing-phase examples per operation, and the operations whose test failed.
    examples: Counter[str] = field(default_factory=Counter)
    failed: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def fuzz(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> Iterator[Fuzz]:
    yield from _fuzzed(seeded, tmp_path_factory.mktemp("fuzz"), request,
                       "test_api__conforms_to_openapi", MIN_EXAMPLES)


@pytest.fixture(scope="module")
def fuzz_pg(seeded_pg: Seeded, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Fuzz]:
    yield from _fuzzed(seeded_pg, tmp_path_factory.mktemp("fuzz-pg"), request,
                       "test_api__conforms_to_openapi_on_postgresql", PG_EXAMPLES)


def _fuzzed(seeded: Seeded, directory: Path, request: pytest.FixtureRequest, test: str,
            min_examples: int) -> Iterator[Fuzz]:
    """Bind the app under test (and the seeded values the hooks mix in) while ``test``'s
    operations run; the tests of one backend run one after the other, in definition order."""
    api = _api(seeded, directory)
    state = Fuzz(headers=api.headers, min_examples=min_examples)
    saga_ids = [{"saga_id": saga_id} for saga_id in seeded.sagas.values()]
    _known.path_parameters = {
        **{path: saga_ids for path in ("/sagas/{saga_id}", "/sagas/{saga_id}/events",
                                       "/sagas/{saga_id}/cancel", "/sagas/{saga_id}/retry")},
        "/consumers/{consumer_id}": [{"consumer_id": seeded.consumer_id}],
        "/datasets/{name}/partitions/{partition_date}": [
            {"name": "clickstream", "partition_date": day} for day in DAYS.values()],
    }
    # NUL reached PostgreSQL's driver from any text parameter (a 500 there, 404 on SQLite).
    _known.path_parameters = {path: [*values, {k: f"{v}\x00" for k, v in values[0].items()}]
                              for path, values in _known.path_parameters.items()}
    _known.bodies = {
        "/sagas": [_source(day) for day in DAYS.values()],
        "/consumers": [{"name": name, "dataset": "clickstream", "url": seeded.receiver_url}
                       for name in ("seed", "fuzz")],
    }
    nul_cursor = base64.urlsafe_b64encode(b"2026-01-06T00:00:00|\x00").decode()
    _known.queries = {"GET /sagas": [{"dataset": "click\x00stream"}, {"cursor": nul_cursor}],
                      "GET /consumers": [{"dataset": "\x00"}]}
    late_app.app = api.app
    try:
        _assert_serves_schema(late_app, api.headers)
        yield state
    finally:
        asgi.shutdown_lifespans()
        late_app.app = None
        _known.path_parameters, _known.bodies, _known.queries = {}, {}, {}
        api.service.close()
    _assert_every_operation_fuzzed(state, request, test)


def _assert_every_operation_fuzzed(state: Fuzz, request: pytest.FixtureRequest,
                                   test: str) -> None:
    selected = {getattr(item, "operation_label", None) for item in request.session.items
                if item.module is request.module
                and getattr(item, "originalname", None) == test} & set(OPERATIONS)
    if selected == set(OPERATIONS):  # the whole module ran, not a -k subset
        assert set(state.examples) | state.failed == set(OPERATIONS)
    for label in selected - state.failed:
        needed = state.min_examples if OPERATIONS[label] else 1
        assert state.examples[label] >= needed, f"{label}: {state.examples[label]} examples"


def allow_names_every_method(_ctx: Any, response: schemathesis.Response,
                             case: schemathesis.Case) -> None:
    """A 405 lists exactly the methods the document gives the path (the built-in checks accept
    an empty ``Allow``)."""
    if response.status_code != 405:
        return
    allow = response.headers.get("allow", [""])[0]
    documented = {method.upper() for method in schema.raw_schema["paths"][case.operation.path]}
    assert {m.strip() for m in allow.split(",") if m.strip()} == documented, f"Allow: {allow!r}"


def _mixed(generated: Any, known: list[Any] | None) -> st.SearchStrategy[Any]:
    if not known or not isinstance(generated, dict):
        return st.just(generated)
    return st.sampled_from([generated, *known])


@schema.hook
def flatmap_path_parameters(context: schemathesis.HookContext,
                            path_parameters: dict[str, Any]) -> st.SearchStrategy[Any]:
    assert context.operation is not None
    return _mixed(path_parameters, _known.path_parameters.get(context.operation.path))


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    assert context.operation is not None
    return _mixed(body, _known.bodies.get(context.operation.path))


@schema.hook
def flatmap_query(context: schemathesis.HookContext, query: Any) -> st.SearchStrategy[Any]:
    assert context.operation is not None
    return _mixed(query, _known.queries.get(context.operation.label))


#: A valid ``wait`` (up to 60 s) on the pending saga would hold the request that long: valid
#: waits are cut to this, invalid ones are sent as generated.
MAX_WAIT_S = 0.2


@schema.hook
def map_query(context: schemathesis.HookContext, query: Any) -> Any:
    wait = query.get("wait") if isinstance(query, dict) else None
    if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 < wait <= 60:
        query["wait"] = min(wait, MAX_WAIT_S)
    return query


@schema.parametrize()
@settings(max_examples=MIN_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_api__conforms_to_openapi(case: schemathesis.Case, fuzz: Fuzz) -> None:
    _call_and_validate(case, fuzz)


@pytest.mark.postgres
@schema.parametrize()
@settings(max_examples=PG_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_api__conforms_to_openapi_on_postgresql(case: schemathesis.Case, fuzz_pg: Fuzz) -> None:
    _call_and_validate(case, fuzz_pg)


def _call_and_validate(case: schemathesis.Case, fuzz: Fuzz) -> None:
    label = case.operation.label
    if case.meta is not None and case.meta.phase.name.value == "fuzzing":
        fuzz.examples[label] += 1
    try:
        case.call_and_validate(headers=dict(fuzz.headers), excluded_checks=EXCLUDED_CHECKS,
                               additional_checks=[allow_names_every_method])
    except BaseException:
        fuzz.failed.add(label)
        raise
