"""API keys, scopes, idempotency per caller and the request limits, over real HTTP against a live
server (SQLite and PostgreSQL saga databases)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lakesaga_live import PARTITION, Live
from sqlalchemy import select
from starlette.routing import Route

from app.auth import create_key, revoke_key
from app.db.models import ApiKeyRow, SagaRow
from app.main import create_app

OPEN_PATHS = {"/healthz", "/readyz"}
PATH_VALUES = {"saga_id": "00000000-0000-0000-0000-000000000000", "name": "clickstream",
               "partition_date": PARTITION, "consumer_id": "00000000-0000-0000-0000-000000000000"}


def _app_routes() -> Iterator[tuple[str, set[str], Any]]:
    """(path, methods, dependant) of every route of ``app.routes``, documentation included;
    routers included with ``include_router`` are expanded (FastAPI >= 0.16x nests them)."""
    for route in create_app(run_workers=False).routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            for context in contexts():
                yield context.path, set(context.methods or ()), context.dependant
        else:
            assert isinstance(route, Route), route
            yield route.path, set(route.methods or ()), getattr(route, "dependant", None)


def _routes() -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app serves."""
    found = []
    for template, methods, _ in _app_routes():
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PATH_VALUES[m.group(1)], template)
        found.extend((method, path) for method in sorted(methods) if method != "HEAD")
    return found


def _guards(dependant: Any) -> set[str]:
    """Names of the ``require_<scope>`` dependencies anywhere in a route's dependency tree."""
    if dependant is None:
        return set()
    name = getattr(dependant.call, "__name__", "")
    found = {name} if name.startswith("require_") else set()
    for sub in dependant.dependencies:
        found |= _guards(sub)
    return found


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    assert body["status"] == status and body["detail"], body
    assert "Traceback" not in resp.text
    return body


def _secret(token: str) -> str:
    """The secret part of ``lsk_<16 hex id>_<secret>`` (the secret may itself contain '_')."""
    return token[len("lsk_") + 16 + 1:]


def _key_id(token: str) -> str:
    return token[len("lsk_"):len("lsk_") + 16]


def _key(live: Live, *scopes: str) -> str:
    return create_key(live.service.db, f"k-{'-'.join(scopes)}", list(scopes))[0]


@pytest.fixture
def anonymous(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.base_url, timeout=30) as client:
        yield client


# -- authentication -------------------------------------------------------------------------------


def test_every_route_but_health__requires_a_key(live_factory: Callable[..., Live]) -> None:
    live = live_factory(auth_failure_burst=1000)  # ~40 wrong keys from one client, on purpose
    anonymous = httpx.Client(base_url=live.base_url, timeout=30)
    routes = _routes()
    guarded = [(m, p) for m, p in routes if p not in OPEN_PATHS]
    # the walk is not vacuous: it reaches the API's main operations and the schema
    assert {("POST", "/sagas"), ("GET", "/sagas"), ("DELETE", f"/consumers/{PATH_VALUES['consumer_id']}"),
            ("GET", "/openapi.json")} <= set(guarded)
    assert len(guarded) >= 12, guarded
    unknown_key = "lsk_0123456789abcdef_" + "A" * 43
    for method, path in guarded:
        for headers in ({}, _bearer(unknown_key), {"Authorization": "Basic dXNlcjpwdw=="},
                        _bearer("not-a-key")):
            resp = anonymous.request(method, path, headers=headers, json={})
            _problem(resp, 401)
            assert resp.headers["www-authenticate"] == "Bearer"
    for path in OPEN_PATHS:
        assert anonymous.get(path).status_code == 200
    anonymous.close()


def test_every_route_but_health__depends_on_a_scope_check() -> None:
    walked = list(_app_routes())
    assert len(walked) >= 12
    for path, methods, dependant in walked:
        guards = _guards(dependant)
        if path in OPEN_PATHS:
            assert not guards, path
        else:
            assert len(guards) == 1, (path, methods, guards)


def test_openapi__documents_the_key_on_every_operation_but_health(live: Live) -> None:
    schema = live.client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]
        ["apiKey"]["description"]}
    operations = [(path, method, op) for path, item in schema["paths"].items()
                  for method, op in item.items()]
    assert len(operations) >= 11
    for path, method, op in operations:
        if path in OPEN_PATHS:
            assert "security" not in op, (path, method)
        else:
            assert op["security"] == [{"apiKey": []}], (path, method)
            assert {"401", "403", "429"} <= set(op["responses"]), (path, method)


def test_scopes__read_write_admin(live: Live) -> None:
    live.generate()
    reader, writer, admin = _key(live, "read"), _key(live, "write"), _key(live, "admin")
    body = {"dataset": "clickstream", "partition_date": PARTITION,
            "source": {"path": f"clickstream/{PARTITION}/*.ndjson"}}
    consumer = {"name": "c1", "dataset": "clickstream", "url": "http://127.0.0.1:9/hook"}
    api = live.client

    assert api.get("/sagas", headers=_bearer(reader)).status_code == 200
    forbidden = api.post("/sagas", headers=_bearer(reader), json=body)
    assert "write" in _problem(forbidden, 403)["detail"]
    assert forbidden.headers["www-authenticate"] == 'Bearer error="insufficient_scope", scope="write"'
    _problem(api.post("/consumers", headers=_bearer(writer), json=consumer), 403)
    _problem(api.delete("/consumers/x", headers=_bearer(writer)), 403)
    saga = api.post("/sagas", headers=_bearer(writer), json=body)
    assert saga.status_code == 202, saga.text
    assert api.get(f"/sagas/{saga.json()['id']}", headers=_bearer(writer)).status_code == 200
    created = api.post("/consumers", headers=_bearer(admin), json=consumer)
    assert created.status_code == 201, created.text
    assert api.get("/consumers", headers=_bearer(reader)).status_code == 200
    assert live.wait(saga.json()["id"])["status"] == "succeeded"


def test_revoked_key__is_refused_on_the_next_request(live: Live) -> None:
    token, info = create_key(live.service.db, "short-lived", ["read"])
    assert live.client.get("/sagas", headers=_bearer(token)).status_code == 200

    assert revoke_key(live.service.db, info["id"])
    _problem(live.client.get("/sagas", headers=_bearer(token)), 401)
    assert not revoke_key(live.service.db, info["id"])
    # the same id with another secret is refused as well (the secret is what is checked)
    forged = token[: -43] + ("B" if token[-1] != "B" else "C") * 43
    _problem(live.client.get("/sagas", headers=_bearer(forged)), 401)


def test_keys__only_a_hash_of_the_secret_is_stored(live: Live) -> None:
    token, info = create_key(live.service.db, "hashed", ["write"])
    secret = _secret(token)
    with live.service.db.sessions() as s:
        row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.id == info["id"])).one()
        values = json.dumps({c.name: str(getattr(row, c.name)) for c in ApiKeyRow.__table__.columns})
    assert secret not in values and token not in values
    assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()


def test_cli__keys_create_list_revoke(live: Live, anonymous: httpx.Client) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESAGA_")}
    env.update(LAKESAGA_DATABASE_URL=live.settings.database_url, NO_COLOR="1")
    lakesaga = str(Path(sys.executable).with_name("lakesaga"))

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([lakesaga, "keys", *args], env=env, capture_output=True,
                              text=True, timeout=60, cwd=live.settings.lake_dir)

    created = keys("create", "pipeline", "--scope", "write", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["scopes"] == ["write"] and key["token"].startswith(f"lsk_{key['id']}_")
    assert anonymous.get("/sagas", headers=_bearer(key["token"])).status_code == 200
    _problem(anonymous.post("/consumers", headers=_bearer(key["token"]), json={}), 403)

    listed = keys("list")
    assert listed.returncode == 0 and key["id"] in listed.stdout and "pipeline" in listed.stdout
    assert _secret(key["token"]) not in listed.stdout

    assert keys("revoke", key["id"]).returncode == 0
    _problem(anonymous.get("/sagas", headers=_bearer(key["token"])), 401)
    again = keys("revoke", key["id"])
    assert again.returncode == 1 and "no active key" in again.stdout
    bad = keys("create", "x", "--scope", "root")
    assert bad.returncode == 2 and "scopes must be" in bad.stderr
    assert "revoked" in keys("list").stdout


# -- idempotency ----------------------------------------------------------------------------------


def test_idempotency__20_concurrent_posts_with_one_key_create_one_saga(live: Live) -> None:
    live.generate()
    barrier = threading.Barrier(20)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(base_url=live.base_url, timeout=60,
                          headers=_bearer(live.token)) as client:
            barrier.wait()
            resp = client.post(
                "/sagas", headers={"Idempotency-Key": "nightly-2026-01-06"},
                json={"dataset": "clickstream", "partition_date": PARTITION,
                      "source": {"path": f"clickstream/{PARTITION}/*.ndjson", "format": "json"}})
        with lock:
            responses.append(resp)

    threads = [threading.Thread(target=post) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert len(responses) == 20
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    with live.service.db.sessions() as s:
        assert list(s.scalars(select(SagaRow.id))) == list(ids)
    assert live.wait(ids.pop())["status"] == "succeeded"


def test_idempotency__keys_are_scoped_to_the_caller(live: Live) -> None:
    live.generate()
    other = _key(live, "write")
    body = {"dataset": "clickstream", "partition_date": PARTITION,
            "source": {"path": f"clickstream/{PARTITION}/*.ndjson", "format": "json"}}
    mine = live.client.post("/sagas", json=body, headers={"Idempotency-Key": "k1"})
    theirs = live.client.post("/sagas", json=body,
                              headers={"Idempotency-Key": "k1", **_bearer(other)})
    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"]
    assert "idempotent-replayed" not in theirs.headers
    # each caller's key still replays its own saga, and refuses another body
    replay = live.client.post("/sagas", json=body, headers={"Idempotency-Key": "k1", **_bearer(other)})
    assert replay.json()["id"] == theirs.json()["id"]
    changed = {**body, "partition_date": "2026-01-07"}
    assert "Idempotency-Key" in _problem(live.client.post(
        "/sagas", json=changed, headers={"Idempotency-Key": "k1"}), 422)["detail"]
    for saga in (mine, theirs):
        assert live.wait(saga.json()["id"])["status"] == "succeeded"


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_idempotency__invalid_keys_are_refused(live: Live, key: str) -> None:
    live.generate()
    resp = live.client.post("/sagas", headers={"Idempotency-Key": key}, json={
        "dataset": "clickstream", "partition_date": PARTITION,
        "source": {"path": f"clickstream/{PARTITION}/*.ndjson"}})
    assert "1 to 255 printable ASCII" in _problem(resp, 400)["detail"]
    assert live.table_counts()["sagas"] == 0


# -- limits ---------------------------------------------------------------------------------------


def test_body_over_the_limit__is_413_with_or_without_content_length(live: Live) -> None:
    live.generate()
    big = json.dumps({"dataset": "clickstream", "partition_date": PARTITION,
                      "source": {"path": "x" * (live.settings.max_request_bytes + 10)}}).encode()

    declared = live.client.post("/sagas", content=big, headers={"content-type": "application/json"})
    assert "limited to" in _problem(declared, 413)["detail"]

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start:start + 4096]

    streamed = live.client.post("/sagas", content=chunks(),
                                headers={"content-type": "application/json"})
    assert "content-length" not in streamed.request.headers
    _problem(streamed, 413)
    assert live.table_counts()["sagas"] == 0
    # a body just under the limit reaches the app (and is judged on its content)
    assert live.client.post("/sagas", json={"pad": "y" * 1000}).status_code == 422


def test_rate_limit__is_429_with_retry_after_per_key(live_factory: Callable[..., Live]) -> None:
    live = live_factory(rate_limit_per_s=0.2, rate_limit_burst=3)
    statuses = [live.client.get("/sagas").status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200]
    limited = live.client.get("/sagas")
    _problem(limited, 429)
    assert 1 <= int(limited.headers["retry-after"]) <= 5
    assert live.client.get("/sagas", headers=_bearer(_key(live, "read"))).status_code == 200
    assert live.client.get("/healthz").status_code == 200  # health is never limited


def test_active_saga_limit__is_429_per_key(live_factory: Callable[..., Live]) -> None:
    live = live_factory(max_active_sagas_per_key=1, faults="ingest_to_bronze=sleep:3000@1")
    for day in ("2026-01-06", "2026-01-07"):
        live.generate(day, partition_date=day)
    first = live.submit()
    assert first.status_code == 202, first.text
    second = live.submit(path="clickstream/2026-01-07/*.ndjson", partition_date="2026-01-07")
    assert "limit of 1 unfinished sagas" in _problem(second, 429)["detail"]
    assert second.headers["retry-after"].isdigit()
    other = live.client.post("/sagas", headers=_bearer(_key(live, "write")), json={
        "dataset": "clickstream", "partition_date": "2026-01-07",
        "source": {"path": "clickstream/2026-01-07/*.ndjson"}})
    assert other.status_code == 202, other.text
    assert live.wait(first.json()["id"])["status"] == "succeeded"
    again = live.submit(path="clickstream/2026-01-07/*.ndjson", partition_date="2026-01-07")
    assert again.status_code == 202, again.text
    for saga in (other, again):
        assert live.wait(saga.json()["id"])["status"] == "succeeded"


def _fill_one_partition(live: Live, count: int) -> list[httpx.Response]:
    """``count`` POSTs to one partition: the first saga runs (it sleeps in bronze), the others
    wait behind it, pending."""
    live.generate()
    return [live.submit() for _ in range(count)]


def test_active_saga_limit__counts_pending_sagas(live_factory: Callable[..., Live]) -> None:
    live = live_factory(max_active_sagas_per_key=3, faults="ingest_to_bronze=sleep:1000@1")
    accepted = _fill_one_partition(live, 3)
    assert [r.status_code for r in accepted] == [202, 202, 202]
    assert {r.json()["status"] for r in accepted} == {"pending"}

    fourth = live.submit()
    assert "its limit of 3 unfinished sagas" in _problem(fourth, 429)["detail"]
    assert fourth.headers["retry-after"].isdigit()
    assert live.table_counts()["sagas"] == 3


def test_active_saga_limit__is_checked_before_the_source_is_hashed(
        live_factory: Callable[..., Live], monkeypatch: pytest.MonkeyPatch) -> None:
    import app.lakehouse.sources as sources

    hashed: list[Path] = []
    real = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda path, **kw: (hashed.append(path),
                                                                      real(path, **kw))[1])
    live = live_factory(max_active_sagas_per_key=1, faults="ingest_to_bronze=sleep:1000@1")
    assert _fill_one_partition(live, 1)[0].status_code == 202
    assert len(hashed) == 3  # the first saga's three files, at accept

    _problem(live.submit(), 429)
    assert len(hashed) == 3  # refused without reading its source


# -- who may do what ------------------------------------------------------------------------------


def test_cancel_and_retry__only_by_the_owner_or_an_admin(live_factory: Callable[..., Live]) -> None:
    live = live_factory(faults="ingest_to_bronze=sleep:1500")  # sagas stay cancellable a while
    live.generate()
    owner, other = _key(live, "write"), _key(live, "write")
    owner_id = _key_id(owner)
    body = {"dataset": "clickstream", "partition_date": PARTITION,
            "source": {"path": f"clickstream/{PARTITION}/*.ndjson"}}
    first, second = (live.client.post("/sagas", headers=_bearer(owner), json=body).json()["id"]
                     for _ in range(2))

    for action in ("cancel", "retry"):
        refused = live.client.post(f"/sagas/{first}/{action}", headers=_bearer(other))
        assert f"may {action} it" in _problem(refused, 403)["detail"]
    # the owner passes the check (retry is then judged on the saga's state: not failed)
    _problem(live.client.post(f"/sagas/{first}/retry", headers=_bearer(owner)), 409)
    cancelled = live.client.post(f"/sagas/{first}/cancel", headers=_bearer(owner))
    assert cancelled.status_code == 202, cancelled.text
    # an admin key may cancel anyone's saga (live.client sends one)
    assert live.client.post(f"/sagas/{second}/cancel").status_code == 202
    admin_id = _key_id(live.token)

    for saga_id, by in ((first, owner_id), (second, admin_id)):
        assert live.wait(saga_id)["status"] == "compensated"
        events = live.client.get(f"/sagas/{saga_id}/events").json()["items"]
        assert [e["payload"] for e in events if e["kind"] == "cancel_requested"] == [{"by": by}]


def test_consumer_urls__in_full_to_admin_keys_only(live: Live) -> None:
    url = "http://127.0.0.1:9/hooks/lake?token=capability-0123"
    created = live.client.post("/consumers", json={"name": "c", "dataset": "clickstream",
                                                   "url": url})
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"  # it carries the secret
    listed = live.client.get("/consumers")  # an admin key
    assert listed.json()[0]["url"] == url and listed.headers["cache-control"] == "no-store"
    for scopes in (["read"], ["write"]):
        redacted = live.client.get("/consumers", headers=_bearer(_key(live, *scopes)))
        assert redacted.status_code == 200, redacted.text
        assert redacted.json()[0]["url"] == "http://127.0.0.1:9/…", scopes
        assert "capability" not in redacted.text and "hooks" not in redacted.text


def test_failed_authentications__are_limited_per_client_and_per_key_id(
        live_factory: Callable[..., Live]) -> None:
    live = live_factory(auth_failure_burst=5, auth_failure_rate_per_s=0.01)
    token, info = create_key(live.service.db, "attacked", ["read"])
    wrong = f"lsk_{info['id']}_" + "W" * 43
    # uvicorn takes the client address from X-Forwarded-For when the peer is 127.0.0.1
    attacker, bystander = {"X-Forwarded-For": "10.0.0.1"}, {"X-Forwarded-For": "10.0.0.2"}

    def status(token: str, client: dict[str, str]) -> int:
        return live.client.get("/sagas", headers={**_bearer(token), **client}).status_code

    assert [status(wrong, attacker) for _ in range(8)] == [401] * 5 + [429] * 3
    limited = live.client.get("/sagas", headers={**_bearer(wrong), **attacker})
    assert "failed authentications" in _problem(limited, 429)["title"].lower()
    assert int(limited.headers["retry-after"]) >= 1
    # a valid key from the same address still passes (clients behind one NAT share it)
    assert status(token, attacker) == 200
    assert status("lsk_0123456789abcdef_" + "W" * 43, attacker) == 429
    # from elsewhere, wrong secrets for the attacked key id are 429 too, but its holder is
    # never locked out (key ids are public) and other keys are judged on their own
    assert status(wrong, bystander) == 429
    assert status(token, bystander) == 200
    assert status("lsk_0123456789abcdef_" + "W" * 43, bystander) == 401
    assert status(token, {}) == 200  # no header: the test client's own address


def test_access_log__never_carries_the_query_string(live: Live,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    access = logging.getLogger("uvicorn.access")
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    access.addHandler(caplog.handler)
    try:
        canary = "canary-query-" + os.urandom(8).hex()
        assert live.client.get("/sagas", params={"api_key": canary},
                               headers={"Authorization": ""}).status_code == 401
        assert live.client.get("/sagas", params={"limit": 5, "token": canary}).status_code == 200
    finally:
        access.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert len(lines) == 2, lines
    assert all('"GET /sagas?[redacted] HTTP/1.1"' in line for line in lines), lines
    assert canary not in caplog.text


def test_retry__by_the_owner_is_recorded_in_the_event(live_factory: Callable[..., Live]) -> None:
    live = live_factory(faults="aggregate_to_gold=raise,delete_silver_partition=raise",
                        step_max_attempts=1, max_saga_attempts=1)
    live.generate(records=50, files=1)
    owner = _key(live, "write")
    saga_id = live.client.post("/sagas", headers=_bearer(owner), json={
        "dataset": "clickstream", "partition_date": PARTITION,
        "source": {"path": f"clickstream/{PARTITION}/*.ndjson"}}).json()["id"]
    assert live.wait(saga_id)["status"] == "failed"
    _problem(live.client.post(f"/sagas/{saga_id}/retry", headers=_bearer(_key(live, "write"))),
             403)
    retried = live.client.post(f"/sagas/{saga_id}/retry", headers=_bearer(owner))
    assert retried.status_code == 202, retried.text
    events = live.client.get(f"/sagas/{saga_id}/events").json()["items"]
    assert [e["payload"]["by"] for e in events if e["kind"] == "status"
            and e["payload"].get("reason") == "retry requested"] == [_key_id(owner)]
