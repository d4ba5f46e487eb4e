"""Secrets never leave the service: not in logs, error bodies, saga rows, events, metrics or the
fault trace.

A real ``lakesaga serve`` process logs at DEBUG on a PostgreSQL saga database whose DSN carries a
canary password (the server trusts local connections, so any password connects); the derived
DuckLake catalog gets the same password. An admin API key, a webhook consumer secret and wrong
tokens built around canaries go through a session of successes and errors: 401 (missing, unknown,
malformed and wrong-secret keys, keys and tokens in query strings), 403, 404, 409, 413, 422 (bad
secrets, malformed JSON, unsafe URL), a succeeded saga whose webhook, to a consumer URL carrying
a canary token in its path and query, is delivered and verified with a stock Standard Webhooks
verifier, a compensated one. Two more servers die attaching a lake whose catalog DSN (keyword
and URI form) names a missing database with another canary password, and ``lakesaga keys list``
and ``lakesaga check`` run on the same settings. Then every canary is searched for in: the
stdout/stderr of every process, every HTTP response of the session (status, headers, body), the
saga database (every table of every schema), the lake directory, the fault trace and the webhook
requests received.
The only places a secret may be are by design: the consumer secret in the consumers table (it
signs webhooks) and, in its ``whsec_`` form, in the one ``POST /consumers`` answer that creates
it; the consumer URL's token in the consumers table, that answer and the admin's consumer
listing (a read key's listing shows no path or query); the API key only as the SHA-256 of its
secret.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from lakesaga_live import WebhookReceiver
from sqlalchemy.engine import make_url
from standardwebhooks import Webhook

from app.auth import create_key
from app.db.session import Database
from app.lakehouse.generator import generate_clickstream

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]

PARTITION = "2026-01-06"
SAGA = {"dataset": "clickstream", "partition_date": PARTITION,
        "source": {"path": f"clickstream/{PARTITION}/*.ndjson", "format": "json"}}


def _canary(kind: str) -> str:
    return f"canary-{kind}-{secrets.token_hex(8)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lakesaga() -> str:
    return str(Path(sys.executable).parent / "lakesaga")


@dataclass
class Transcript:
    """Every HTTP response of the session, as text: request line, status, headers, body."""

    entries: list[tuple[str, str]]

    def record(self, response: httpx.Response) -> None:
        response.read()
        head = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.entries.append((f"#{len(self.entries)} {response.request.method} "
                             f"{response.request.url.path} -> {response.status_code}",
                             f"{head}\n\n{response.text}"))


@dataclass
class Deployment:
    home: Path
    env: dict[str, str]
    database_url: str  # with the canary password
    plain_url: str  # the same database, without it (trust auth)


@pytest.fixture
def deployment(tmp_path: Path, pg_database_factory: Callable[[], str]) -> Deployment:
    plain = pg_database_factory()
    canary_url = make_url(plain).set(drivername="postgresql+psycopg", password=_canary("pw"))
    home = tmp_path / "home"
    generate_clickstream(home / "raw" / "clickstream" / PARTITION, records=500, files=2, seed=3,
                         partition_date=date.fromisoformat(PARTITION))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKESAGA_")}
    env.update({
        "PYTHONUNBUFFERED": "1", "NO_COLOR": "1",
        "LAKESAGA_DATABASE_URL": canary_url.render_as_string(hide_password=False),
        "LAKESAGA_SOURCE_ROOT": str(home / "raw"),
        "LAKESAGA_LAKE_DIR": str(home / "lake"),
        "LAKESAGA_LOG_LEVEL": "DEBUG",
        "LAKESAGA_POLL_INTERVAL_S": "0.05",
        "LAKESAGA_STEP_BACKOFF_S": "0.01",
        "LAKESAGA_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "LAKESAGA_WEBHOOK_TIMEOUT_S": "2",
        "LAKESAGA_FAULTS": "aggregate_to_gold=raise@2",  # the second saga compensates
        "LAKESAGA_FAULT_TRACE": str(tmp_path / "fault-trace.txt"),
    })
    return Deployment(home=home, env=env, database_url=env["LAKESAGA_DATABASE_URL"],
                      plain_url=plain)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], Path, Path]]]:
    """``lakesaga serve`` processes started by the test (killed at teardown if still up)."""
    started: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    yield started
    for proc, _, _ in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _serve(deployment: Deployment, processes: list[Any], name: str) -> str:
    out, err = deployment.home.parent / f"{name}.stdout", deployment.home.parent / f"{name}.stderr"
    port = _free_port()
    with out.open("wb") as out_f, err.open("wb") as err_f:
        proc = subprocess.Popen([_lakesaga(), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                env=deployment.env, cwd=deployment.home.parent, stdout=out_f,
                                stderr=err_f, stdin=subprocess.DEVNULL)
    processes.append((proc, out, err))
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{name} exited:\n{err.read_text()[-3000:]}"
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return base_url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{name} not healthy after 60 s:\n{err.read_text()[-3000:]}")


def _wait(api: httpx.Client, saga_id: str, done: Callable[[dict[str, Any]], bool],
          timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not done(saga := api.get(f"/sagas/{saga_id}").json()):
        assert time.monotonic() < deadline, saga
        time.sleep(0.1)
    return saga


def _run_session(base_url: str, token: str, read_token: str, secret: str, url_token: str,
                 query_canary: str, wrong_tokens: list[str], receiver: WebhookReceiver,
                 transcript: Transcript) -> tuple[dict[str, Any], str]:
    """Successes and every kind of error the API has, each answer recorded. Returns the
    succeeded saga and the transcript entry of the admin's consumer listing."""
    hooks = {"response": [transcript.record]}
    with httpx.Client(base_url=base_url, timeout=30, event_hooks=hooks) as anon, \
            httpx.Client(base_url=base_url, timeout=30, event_hooks=hooks,
                         headers={"Authorization": f"Bearer {token}"}) as api:
        for path in ("/healthz", "/readyz", "/sagas", "/openapi.json"):
            anon.get(path)
        for wrong in wrong_tokens:
            assert anon.get("/sagas", headers={"Authorization": wrong}).status_code == 401
        assert anon.post("/sagas", json=SAGA,
                         headers={"Authorization": f"Bearer {read_token}"}).status_code == 403
        # secrets in query strings: refused, and never written to the access log
        for params in ({"api_key": token}, {"api_key": query_canary},
                       {"access_token": query_canary, "limit": "5"}):
            assert anon.get("/sagas", params=params).status_code == 401
        assert api.get("/sagas", params={"token": query_canary, "limit": 5}).status_code == 200

        consumer = {"name": "canary", "dataset": "clickstream",
                    "url": f"{receiver.url}/hook/{url_token}?token={url_token}", "secret": secret}
        created = api.post("/consumers", json=consumer)
        assert created.status_code == 201, created.text
        assert api.post("/consumers", json=consumer).status_code == 409
        for bad in ({**consumer, "name": "bad1", "secret": f"{secret} with spaces"},
                    {**consumer, "name": "bad2", "secret": secret * 20},
                    {**consumer, "name": "bad3", "url": "http://169.254.169.254/latest"},
                    {**consumer, "name": "bad4", "extra": secret}):
            assert api.post("/consumers", json=bad).status_code == 422, bad
        malformed = api.post("/consumers", content=f'{{"secret": "{secret}", '.encode(),
                             headers={"Content-Type": "application/json"})
        assert malformed.status_code == 422, malformed.text
        too_large = api.post("/consumers", content=secret.encode() * 5000,
                             headers={"Content-Type": "application/json"})
        assert too_large.status_code == 413, too_large.text
        api.get("/consumers")
        admin_listing = transcript.entries[-1][0]
        reader = anon.get("/consumers", headers={"Authorization": f"Bearer {read_token}"})
        assert reader.json()[0]["url"] == f"{receiver.url}/…", reader.text

        ok = api.post("/sagas", json=SAGA, headers={"Idempotency-Key": "secrets-1"})
        assert ok.status_code == 202, ok.text
        succeeded = _wait(api, ok.json()["id"], lambda s: s["status"] == "succeeded"
                          and [d["status"] for d in s["deliveries"]] == ["delivered"])
        second = api.post("/sagas", json=SAGA)
        assert second.status_code == 202, second.text
        compensated = _wait(api, second.json()["id"], lambda s: s["status"] == "compensated")
        assert "FaultInjected" in (compensated["error"] or ""), compensated

        assert api.post("/sagas", json={**SAGA, "dataset": "nope"}).status_code == 404
        assert api.post("/sagas", json={**SAGA, "source": {"path": "../etc/*"}}).status_code == 422
        assert api.post("/sagas", json={**SAGA, "partition_date": "2026-01-07"},
                        headers={"Idempotency-Key": "secrets-1"}).status_code == 422
        for saga in (succeeded, compensated):
            api.get(f"/sagas/{saga['id']}")
            api.get(f"/sagas/{saga['id']}/events")
            assert api.post(f"/sagas/{saga['id']}/cancel").status_code == 409
            assert api.post(f"/sagas/{saga['id']}/retry").status_code == 409
        for path in ("/sagas", "/sagas?status=compensated", "/sagas?cursor=%21", "/datasets",
                     f"/datasets/clickstream/partitions/{PARTITION}", "/sagas/unknown",
                     "/datasets/clickstream/partitions/2020-01-01", "/no/such/route"):
            api.get(path)
        api.delete("/sagas")
        return succeeded, admin_listing


def _verify_signatures(receiver: WebhookReceiver, secret: str) -> int:
    """The deliveries were signed with the consumer's secret (so it was used): a stock
    Standard Webhooks verifier accepts them with the ``whsec_`` form POST /consumers returned."""
    received = receiver.received()
    for request in received:
        Webhook(secret).verify(request.body, request.headers)
    return len(received)


def _database_dump(url: str) -> dict[str, str]:
    """``schema.table`` -> every row as text, for every table the deployment created."""
    dump: dict[str, str] = {}
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')").fetchall()
        for schema_name, table in tables:
            rows = conn.execute(f'SELECT t::text FROM "{schema_name}"."{table}" t').fetchall()
            dump[f"{schema_name}.{table}"] = "\n".join(row[0] for row in rows)
    return dump


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _leaks(canaries: dict[str, str], haystacks: dict[str, str | bytes]) -> list[str]:
    found = []
    for where, text in haystacks.items():
        data = text if isinstance(text, bytes) else text.encode()
        found += [f"{name} in {where}" for name, canary in canaries.items()
                  if canary.encode() in data]
    return found


def test_secrets__never_in_logs_bodies_rows_or_traces(
        deployment: Deployment, processes: list[Any], webhook_receiver: WebhookReceiver,
        tmp_path: Path) -> None:
    base_url = _serve(deployment, processes, "server")
    db = Database(deployment.plain_url)
    try:
        token, key = create_key(db, "secrets-admin", ["admin"])
        read_token, _ = create_key(db, "secrets-read", ["read"])
    finally:
        db.dispose()
    key_secret = token.split("_", 2)[2]
    consumer_secret = _canary("whsec")
    whsec = "whsec_" + base64.b64encode(consumer_secret.encode()).decode()
    url_token, query_canary = _canary("urltoken"), _canary("query")
    wrong = {name: _canary(name) for name in ("tok1", "tok2", "tok3", "tok4")}
    basic = base64.b64encode(f"admin:{wrong['tok4']}".encode()).decode()
    wrong_tokens = [
        f"Bearer lsk_{secrets.token_hex(8)}_{wrong['tok1'].ljust(43, 'x')}",  # well-formed
        f"Bearer lsk_{key['id']}_{wrong['tok2'].ljust(43, 'x')}",  # a real key id
        f"Bearer {wrong['tok3']}",
        f"Basic {basic}",
        "Bearer",
    ]
    transcript = Transcript([])
    succeeded, admin_listing = _run_session(base_url, token, read_token, consumer_secret,
                                            url_token, query_canary, wrong_tokens,
                                            webhook_receiver, transcript)
    assert _verify_signatures(webhook_receiver, whsec) >= 1
    assert {r.path for r in webhook_receiver.received()} == {f"/hook/{url_token}?token={url_token}"}
    assert succeeded["deliveries"][0]["status"] == "delivered"

    lake_passwords = {"lake-pw-keyword": _canary("lakepw"), "lake-pw-uri": _canary("lakepw")}
    pg = make_url(deployment.plain_url)
    missing_db = f"lakesaga_missing_{secrets.token_hex(4)}"
    catalogs = [
        f"postgres:dbname={missing_db} host={pg.host} port={pg.port} user={pg.username} "
        f"password={lake_passwords['lake-pw-keyword']}",
        f"postgres:postgresql://{pg.username}:{lake_passwords['lake-pw-uri']}@{pg.host}:{pg.port}"
        f"/{missing_db}",
    ]
    outputs: dict[str, str | bytes] = {}
    for i, catalog in enumerate(catalogs):
        env = {**deployment.env, "LAKESAGA_LAKE_CATALOG": catalog}
        result = subprocess.run([_lakesaga(), "serve", "--port", str(_free_port())], env=env,
                                cwd=tmp_path, capture_output=True, timeout=120)
        assert result.returncode != 0, result.stderr.decode()[-2000:]
        assert b"cannot attach the lake" in result.stderr, result.stderr.decode()[-2000:]
        outputs[f"bad-catalog-{i} stdout"], outputs[f"bad-catalog-{i} stderr"] = (
            result.stdout, result.stderr)
    for command in (["keys", "list"], ["check"]):
        result = subprocess.run([_lakesaga(), *command], env=deployment.env, cwd=tmp_path,
                                capture_output=True, timeout=120)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        outputs[f"lakesaga {' '.join(command)} stdout"] = result.stdout
        outputs[f"lakesaga {' '.join(command)} stderr"] = result.stderr

    proc, out, err = processes[0]
    proc.terminate()
    proc.wait(timeout=30)
    outputs["server stdout"], outputs["server stderr"] = out.read_bytes(), err.read_bytes()
    assert b"DEBUG" in outputs["server stderr"], "the server did not log at DEBUG"

    db_password = make_url(deployment.database_url).password
    assert db_password
    canaries = {"dsn-password": str(db_password), "api-key": key_secret,
                "consumer-secret": consumer_secret, "consumer-secret-whsec": whsec,
                "consumer-url-token": url_token, "query-parameter": query_canary,
                **lake_passwords, **wrong, "tok4-basic": basic}
    responses = dict(transcript.entries)
    created = next(k for k in responses if k.endswith("POST /consumers -> 201"))
    assert responses[created].count(whsec) == 1  # shown once, by design
    assert url_token in responses[admin_listing]  # admins see consumer URLs in full
    def but(*allowed: str) -> dict[str, str]:
        return {k: v for k, v in canaries.items() if k not in allowed}

    dump = _database_dump(deployment.plain_url)
    assert hashlib.sha256(key_secret.encode()).hexdigest() in dump["public.api_keys"]
    assert consumer_secret in dump["public.consumers"]  # it signs the webhooks
    trace = tmp_path / "fault-trace.txt"
    assert trace.exists()

    leaks = [
        *_leaks(canaries, outputs),
        *_leaks(but("consumer-secret-whsec", "consumer-url-token"), {created: responses[created]}),
        *_leaks(but("consumer-url-token"), {admin_listing: responses[admin_listing]}),
        *_leaks(canaries, {k: v for k, v in responses.items() if k not in (created, admin_listing)}),
        *_leaks(but("consumer-secret", "consumer-url-token"),
                {"db " + k: v for k, v in dump.items()}),
        *_leaks(canaries, {"db " + k: v for k, v in dump.items() if k != "public.consumers"}),
        *_leaks(canaries, _files(deployment.home / "lake")),
        *_leaks(canaries, {"fault trace": trace.read_text()}),
        *_leaks(canaries, {f"webhook {i}": "\n".join(f"{k}: {v}" for k, v in r.headers.items())
                           + r.body.decode() for i, r in enumerate(webhook_receiver.received())}),
    ]
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)
    assert len(responses) >= 40, sorted(responses)
    for status in ("401", "403", "404", "405", "409", "413", "422", "202", "201"):
        assert any(k.endswith(f"-> {status}") for k in responses), (status, sorted(responses))
