"""Long polls (``GET /sagas/{id}?wait=``) under load: bounded per API key and per process, woken
by changes another process makes, and costing one read per interval for all waiters together
(not one per waiter) while nothing changes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from typing import Any

import httpx
import psycopg
import pytest
from lakesaga_live import PARTITION, serve
from sqlalchemy import event

from app.auth import Principal, create_key
from app.lakehouse.generator import generate_clickstream
from app.service import WAIT_POLL_S, Service
from app.settings import Settings

BODY = {"dataset": "clickstream", "partition_date": PARTITION,
        "source": {"path": f"clickstream/{PARTITION}/*.ndjson", "format": "json"}}


@pytest.fixture
def services(database_url: str, settings_factory: Callable[..., Settings],
             ) -> Iterator[Callable[[], Service]]:
    """Services without workers on one database: a saga submitted to one stays pending."""
    made: list[Service] = []

    def make() -> Service:
        made.append(Service(settings_factory(database_url)))
        return made[-1]

    try:
        yield make
    finally:
        for service in made:
            service.close()


def _pending_saga(service: Service) -> str:
    generate_clickstream(service.settings.source_root / "clickstream" / PARTITION, records=20,
                         files=1, partition_date=date.fromisoformat(PARTITION))
    return str(service.submit(BODY, None)[0]["id"])


def test_long_poll__over_the_per_key_or_process_limit_is_429(
        database_url: str, settings_factory: Callable[..., Settings]) -> None:
    service = Service(settings_factory(database_url, max_waits=3, max_waits_per_key=2))
    server, thread, port = serve(service)  # the API without workers: the saga stays pending
    try:
        _assert_waits_bounded(service, f"http://127.0.0.1:{port}")
    finally:
        service.watch.close()
        server.should_exit = True
        thread.join(timeout=15)
        service.close()


def _assert_waits_bounded(service: Service, base_url: str) -> None:
    saga_id = _pending_saga(service)
    tokens = [create_key(service.db, f"k{i}", ["read"])[0] for i in range(3)]

    def get(token: str, wait: float = 5) -> httpx.Response:
        return httpx.get(f"{base_url}/sagas/{saga_id}", params={"wait": wait}, timeout=10,
                         headers={"Authorization": f"Bearer {token}"})

    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(get, tokens[0]), pool.submit(get, tokens[0])]
        deadline = time.monotonic() + 5
        while service.watch.waiting < 2:
            assert time.monotonic() < deadline, "the waits did not start"
            time.sleep(0.01)
        per_key = get(tokens[0])
        assert per_key.status_code == 429, per_key.text
        assert per_key.headers["retry-after"] == "1"
        assert "LAKESAGA_MAX_WAITS_PER_KEY" in per_key.json()["detail"]
        assert get(tokens[0], wait=0).status_code == 200  # reading without waiting is fine

        held.append(pool.submit(get, tokens[1]))  # another key: the third wait of the process
        while service.watch.waiting < 3:
            assert time.monotonic() < deadline, "the third wait did not start"
            time.sleep(0.01)
        per_process = get(tokens[2])
        assert per_process.status_code == 429, per_process.text
        assert "LAKESAGA_MAX_WAITS" in per_process.json()["detail"]
        service.watch.close()  # end the held waits now
        assert [f.result().status_code for f in held] == [200, 200, 200]


def test_long_poll__woken_by_a_change_another_service_makes(
        services: Callable[[], Service]) -> None:
    waiting, other = services(), services()
    saga_id = _pending_saga(waiting)

    async def wait_and_cancel() -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        task = asyncio.create_task(waiting.saga_once_changed(saga_id, 10))
        await asyncio.sleep(0.3)
        admin = Principal(key_id="operator", name="operator", scopes=frozenset({"admin"}))
        await asyncio.to_thread(other.cancel, saga_id, admin)  # nothing tells `waiting`'s watch
        saga = await task
        return saga, time.monotonic() - started

    saga, took_s = asyncio.run(wait_and_cancel())
    assert saga["cancel_requested"] is True
    assert took_s < 0.3 + 5 * WAIT_POLL_S, took_s


def test_long_poll__many_waiters_cost_one_read_per_interval(
        services: Callable[[], Service]) -> None:
    service = services()
    saga_id = _pending_saga(service)
    statements = statements_run(service)
    waiters, window_s = 50, 6 * WAIT_POLL_S

    async def wait_quietly() -> list[str]:
        tasks = [asyncio.create_task(service.saga_once_changed(saga_id, 30))
                 for _ in range(waiters)]
        await asyncio.sleep(3 * WAIT_POLL_S)  # all in; the poller has seen them all
        assert service.watch.waiting == waiters
        statements.clear()
        await asyncio.sleep(window_s)
        seen = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
        service.watch.close()
        await asyncio.gather(*tasks)
        return seen

    seen = asyncio.run(wait_quietly())
    # One query per interval reads the versions of all the watched sagas (the old code read the
    # saga once per waiter per interval: 50 x 6 reads here).
    assert 1 <= len(seen) <= window_s / WAIT_POLL_S + 1, seen


def statements_run(service: Service) -> list[str]:
    """Every statement the service's database connections run from now on, as their driver
    gets it: the saga reads go to the DBAPI cursor directly (``run_on_driver``), past
    SQLAlchemy's execute events, so a pool ``checkout`` listener traces each connection."""
    statements: list[str] = []
    traced: set[int] = set()

    class CountingCursor(psycopg.Cursor):  # type: ignore[type-arg]
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            statements.append(str(query))
            return super().execute(query, *args, **kwargs)

    def trace(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if id(dbapi_connection) in traced:
            return
        traced.add(id(dbapi_connection))
        if isinstance(dbapi_connection, sqlite3.Connection):
            dbapi_connection.set_trace_callback(statements.append)
        else:
            dbapi_connection.cursor_factory = CountingCursor

    event.listen(service.db.engine, "checkout", trace)
    return statements
