"""Schemathesis against every operation of the OpenAPI document, on the real app: no 5xx and no
response the document does not describe.

The app is ``create_app(service=..., run_workers=False)`` called in-process through
schemathesis's ASGI transport (its lifespan sets ``app.state.service``) on a real SQLite saga
database with an admin key. A service with workers first runs three real sagas, so that reads
meet every shape of state: one succeeded (catalogued partition, a webhook delivered to a loopback
receiver), one compensated, one failed (compensation exhausted); a fourth stays pending. Each
test gets its own copy of that database.

``test_api__happy_paths_conform_to_openapi`` calls every operation once with inputs that must
succeed and checks the 2xx answer, so success bodies are always validated.
``test_api__conforms_to_openapi`` fuzzes each operation: 100 fuzzing-phase examples (about half
schema-violating) plus the coverage and explicit-examples phases. Hooks mix the seeded ids, the
catalogued partitions and valid ``POST /sagas`` / ``POST /consumers`` bodies into the generated
data, so that 202, 409 and the like come up beside 404 and 422; a valid ``wait`` is cut to
0.2 s (the pending saga would hold the request for up to a minute). Negative cases that drop the
``Authorization`` header send none and get 401. ``/healthz`` and ``/readyz`` take no input:
hypothesis exhausts them after the one possible request. At teardown the module asserts that
the operations fuzzed are exactly those ``GET /openapi.json`` serves, each with its 100 examples.

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
1970-01-01 (pydantic reads a number as a Unix timestamp; dates are now ``YYYY-MM-DD`` text only).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
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
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """Run one succeeded, one compensated and one failed saga with real workers; add a pending
    one."""
    tmp = tmp_path_factory.mktemp("seed")
    settings = Settings(database_url=f"sqlite:///{tmp / 'lakesaga.db'}", source_root=tmp / "raw",
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
    yield Seeded(settings=settings, receiver_url=receiver_url, sagas=sagas,
                 consumer_id=consumer["id"])


@dataclass
class Api:
    """An app on a private copy of the seeded database, and its admin key."""

    app: FastAPI
    service: Service
    headers: dict[str, str]


def _api(seeded: Seeded, directory: Path) -> Api:
    database = directory / "lakesaga.db"
    with sqlite3.connect(seeded.settings.database_url.removeprefix("sqlite:///")) as source, \
            sqlite3.connect(database) as copy:
        source.backup(copy)
    source.close()
    copy.close()
    settings = seeded.settings.model_copy(update={"database_url": f"sqlite:///{database}"})
    service = Service(settings)
    token, _ = create_key(service.db, "schemathesis", ["admin"])
    return Api(create_app(service=service, run_workers=False), service,
               {"Authorization": f"Bearer {token}"})


def _assert_serves_schema(app: Any, headers: dict[str, str]) -> None:
    with asgi.get_client(app) as client:
        served = client.get("/openapi.json", headers=headers)
    assert served.status_code == 200, served.text
    assert served.json() == schema.raw_schema, "the document tested is not the one served"


def test_api__happy_paths_conform_to_openapi(seeded: Seeded, tmp_path: Path) -> None:
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


_known = Known()


@dataclass
class Fuzz:
    headers: dict[str, str]
    #: Fuzzing-phase examples per operation, and the operations whose test failed.
    examples: Counter[str] = field(default_factory=Counter)
    failed: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def fuzz(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> Iterator[Fuzz]:
    api = _api(seeded, tmp_path_factory.mktemp("fuzz"))
    state = Fuzz(headers=api.headers)
    saga_ids = [{"saga_id": saga_id} for saga_id in seeded.sagas.values()]
    _known.path_parameters = {
        **{path: saga_ids for path in ("/sagas/{saga_id}", "/sagas/{saga_id}/events",
                                       "/sagas/{saga_id}/cancel", "/sagas/{saga_id}/retry")},
        "/consumers/{consumer_id}": [{"consumer_id": seeded.consumer_id}],
        "/datasets/{name}/partitions/{partition_date}": [
            {"name": "clickstream", "partition_date": day} for day in DAYS.values()],
    }
    _known.bodies = {
        "/sagas": [_source(day) for day in DAYS.values()],
        "/consumers": [{"name": name, "dataset": "clickstream", "url": seeded.receiver_url}
                       for name in ("seed", "fuzz")],
    }
    late_app.app = api.app
    try:
        _assert_serves_schema(late_app, api.headers)
        yield state
    finally:
        asgi.shutdown_lifespans()
        late_app.app = None
        _known.path_parameters, _known.bodies = {}, {}
        api.service.close()
    _assert_every_operation_fuzzed(state, request)


def _assert_every_operation_fuzzed(state: Fuzz, request: pytest.FixtureRequest) -> None:
    selected = {getattr(item, "operation_label", None) for item in request.session.items
                if item.module is request.module} & set(OPERATIONS)
    if selected == set(OPERATIONS):  # the whole module ran, not a -k subset
        assert set(state.examples) | state.failed == set(OPERATIONS)
    for label in selected - state.failed:
        needed = MIN_EXAMPLES if OPERATIONS[label] else 1
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
    label = case.operation.label
    if case.meta is not None and case.meta.phase.name.value == "fuzzing":
        fuzz.examples[label] += 1
    try:
        case.call_and_validate(headers=dict(fuzz.headers), excluded_checks=EXCLUDED_CHECKS,
                               additional_checks=[allow_names_every_method])
    except BaseException:
        fuzz.failed.add(label)
        raise
