"""The service interface the API and CLI share: submitting, reading and listing sagas, datasets,
partitions and consumers, plus the process's executor and webhook dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from datetime import date
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, or_, select
from sqlalchemy.exc import IntegrityError

from app.api.views import (
    accepted_view,
    consumer_view,
    decode_cursor,
    encode_cursor,
    iso,
    saga_query,
    saga_summary,
    step_view,
)
from app.auth import Principal, RateLimiter
from app.db.migrate import upgrade
from app.db.models import ConsumerRow, OutboxRow, SagaRow
from app.db.rows import rowcount, utcnow
from app.db.session import Database, run_on_driver
from app.errors import Problem
from app.faults import configure_faults
from app.lakehouse.catalog import current_entries
from app.lakehouse.ingestion import LakehouseIngestionSaga
from app.lakehouse.pipeline import DatasetSpec, load_datasets
from app.lakehouse.sources import SourceError, resolve_manifest
from app.notify.outbox import deliveries_for_saga
from app.notify.signing import InvalidSecret, check_supplied, new_secret, standard_form
from app.notify.urls import UnsafeUrl, check_webhook_url, redact_url
from app.saga.executor import Executor, ExecutorConfig
from app.saga.retry import RetryPolicy
from app.saga.states import FINISHED_SAGA_STATUSES, SagaStatus, StepStatus
from app.saga.step_log import ActiveLimitReached, NewSaga, StepLog
from app.saga.watch import SagaWatch, WaitLimitReached
from app.settings import Settings

log = logging.getLogger("lakesaga.service")
DEFINITION = "lakehouse_ingestion"
#: How often this process's watch reads the versions of the sagas requests wait on (changes
#: made by another process, webhook deliveries).
WAIT_POLL_S = 0.2


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configure_faults(settings.faults, settings.fault_trace)
        if settings.auto_migrate:
            upgrade(settings.database_url)
        self.db = Database(settings.database_url,
                           idle_in_transaction_timeout_s=settings.lease_ttl_s)
        self.log = StepLog(self.db)
        self.watch = SagaWatch(self.saga_versions, poll_interval_s=WAIT_POLL_S,
                               max_waits=settings.max_waits,
                               max_waits_per_key=settings.max_waits_per_key)
        self.log.on_change = self.watch.changed
        self.rate_limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        #: Failed authentications, per ``client:<address>`` and per ``key:<key id>``.
        self.auth_failures = RateLimiter(settings.auth_failure_rate_per_s,
                                         settings.auth_failure_burst)
        self.executor: Executor | None = None
        self._saga_query = saga_query(self.db.is_postgres)
        self._dispatcher: Any = None
        self._lake: Any = None

    @property
    def datasets(self) -> dict[str, DatasetSpec]:
        return load_datasets(self.settings.datasets_dir)

    def start_workers(self) -> None:
        """Attach the lake and start the executor and webhook dispatcher in this process."""
        from app.lakehouse.duck import Lake
        from app.lakehouse.ingestion import LakehouseServices
        from app.lakehouse.tables import ensure_tables
        from app.logs import quiet_http_clients
        from app.notify.webhooks import Dispatcher

        quiet_http_clients()  # the dispatcher's httpx would log each delivery's full URL
        s = self.settings
        self._lake = Lake(s)
        for spec in self.datasets.values():
            ensure_tables(self._lake.cursor(), spec)
        services = LakehouseServices(s, self.db, self._lake)
        self.executor = Executor(
            self.log,
            {DEFINITION: lambda: LakehouseIngestionSaga(services)},
            ExecutorConfig(
                concurrency=s.worker_concurrency,
                lease_ttl_s=s.lease_ttl_s,
                poll_interval_s=s.poll_interval_s,
                max_saga_attempts=s.max_saga_attempts,
                step_retry=RetryPolicy(s.step_max_attempts, s.step_backoff_s),
                step_timeout_s=s.step_timeout_s,
            ),
        )
        self.executor.start()
        self._dispatcher = Dispatcher(self.db, allow_hosts=s.webhook_allow_hosts,
                                      timeout_s=s.webhook_timeout_s,
                                      max_attempts=s.webhook_max_attempts,
                                      poll_interval_s=s.poll_interval_s,
                                      deadline_s=s.webhook_deadline_s,
                                      concurrency=s.webhook_concurrency)
        self._dispatcher.start()

    @property
    def lake(self) -> Any:
        """This process's lake connection (only after ``start_workers``)."""
        if self._lake is None:
            raise RuntimeError("the lake is attached by start_workers()")
        return self._lake

    def close(self) -> None:
        self.watch.close()
        stopped = self.executor.stop() if self.executor is not None else True
        if self._dispatcher is not None:
            self._dispatcher.stop()
        if self._lake is not None:
            if stopped:
                self._lake.close()
            else:  # closing DuckDB under a running query can abort the process
                log.warning("a saga step was still running at shutdown: the lake stays open "
                            "until the process exits; the saga resumes on the next start")
        self.db.dispose()

    def spec(self, name: str) -> DatasetSpec:
        spec = self.datasets.get(name)
        if spec is None:
            raise Problem(404, "Unknown dataset",
                          f"dataset {name!r} is not configured; known: {sorted(self.datasets)}")
        return spec

    def submit(self, body: dict[str, Any], idempotency_key: str | None, *,
               owner: str = "") -> tuple[dict[str, Any], bool]:
        """Validate, freeze the source manifest, and persist a pending saga for ``owner`` (the
        API key id; idempotency keys are scoped to it, and so is the active-saga limit).

        Returns (saga resource, created). Nothing is written unless the request is valid.
        """
        spec = self.spec(body["dataset"])
        partition_date = date.fromisoformat(body["partition_date"])
        print_fp = fingerprint(body)
        if idempotency_key is not None:
            with self.db.reading() as conn:
                existing = run_on_driver(conn, _IDEMPOTENT_QUERY, {
                    "owner": owner, "key": idempotency_key}).first()
            if existing is not None:
                return self._replay(existing.id, existing.request_fingerprint, print_fp), False
        s = self.settings
        max_active = s.max_active_sagas_per_key if owner else 0
        if max_active:  # before the source is walked and hashed: a refusal costs one read
            self._admit(owner, max_active)
        source = body["source"]
        try:
            manifest = resolve_manifest(
                s.source_root, source["path"], source["format"], max_files=s.max_source_files,
                max_bytes=s.max_source_bytes, hash_max_bytes=s.hash_at_accept_max_bytes,
            )
        except SourceError as exc:
            raise Problem(422, "Invalid source", str(exc)) from exc
        except OSError as exc:
            raise Problem(422, "Invalid source",
                          f"source could not be read: {exc.strerror or type(exc).__name__}") from exc
        try:
            row, created = self.log.create_saga(NewSaga(
                id=str(uuid.uuid4()), definition=DEFINITION, dataset=spec.name,
                partition_date=partition_date, request=body, manifest=manifest,
                request_fingerprint=print_fp, idempotency_key=idempotency_key,
                steps=LakehouseIngestionSaga.step_names(), owner=owner,
            ), max_active=max_active)
        except ActiveLimitReached as exc:
            raise _too_many_active(exc) from exc
        if not created:
            return self._replay(row.id, row.request_fingerprint, print_fp), False
        if self.executor is not None:
            self.executor.wake()
        return accepted_view(row, LakehouseIngestionSaga.step_names()), True

    def _admit(self, owner: str, max_active: int) -> None:
        try:
            self.log.check_active_limit(owner, max_active)
        except ActiveLimitReached as exc:
            raise _too_many_active(exc) from exc

    def _replay(self, saga_id: str, stored_fp: str, print_fp: str) -> dict[str, Any]:
        if stored_fp != print_fp:
            raise Problem(422, "Idempotency key reused",
                          "this Idempotency-Key was already used with a different request body")
        return self.saga(saga_id)

    def saga(self, saga_id: str) -> dict[str, Any]:
        """The saga resource, in one round trip: the saga joined with its steps (its manifest
        summarized by the database). The outbox is read only once the saga is past its pivot:
        webhooks are queued by the step after it, never before."""
        with self.db.reading() as conn:
            rows = run_on_driver(conn, self._saga_query, {"saga_id": saga_id}).rows
            if not rows:
                raise Problem(404, "Saga not found", f"no saga with id {saga_id!r}")
            steps = [step_view(row) for row in rows if row.step_name is not None]
            past_pivot = any(step["name"] == LakehouseIngestionSaga.pivot
                             and step["status"] == StepStatus.SUCCEEDED for step in steps)
            deliveries = deliveries_for_saga(conn, saga_id) if past_pivot else []
        row = rows[0]
        return {
            **saga_summary(row),
            "source": row.source,
            "manifest": {"files": row.manifest_files, "total_bytes": row.manifest_bytes,
                         "format": row.manifest_format},
            "steps": steps,
            "deliveries": deliveries,
        }

    async def saga_once_changed(self, saga_id: str, wait_s: float, key: str = "",
                                ) -> dict[str, Any]:
        """Long polling: the saga resource as soon as it differs from what it is now, or at
        once if the saga is at rest (succeeded, compensated, failed), or after ``wait_s``.
        ``key`` (the API key id) is counted against LAKESAGA_MAX_WAITS_PER_KEY."""
        try:
            with self.watch.watching(saga_id, key) as waiter:
                waiter.version = self.saga_versions([saga_id]).get(saga_id)
                first = current = self.saga(saga_id)
                if first["status"] in FINISHED_SAGA_STATUSES:
                    return first
                loop = asyncio.get_running_loop()
                deadline = loop.time() + wait_s
                while current == first and (left := deadline - loop.time()) > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(waiter.event.wait(), left)
                    waiter.event.clear()
                    if self.watch.closed:  # the server is stopping: answer with what is known
                        break
                    current = self.saga(saga_id)
                return current
        except WaitLimitReached as exc:
            raise Problem(429, "Too many waiting requests",
                          f"{exc}; retry later, or without wait", headers={"Retry-After": "1"},
                          ) from exc

    def saga_versions(self, saga_ids: list[str]) -> dict[str, Any]:
        """Each saga's version: it changes with every write to the saga and with every webhook
        delivery attempt for it. One query per 500 sagas (called from the watch's thread)."""
        versions: dict[str, Any] = {}
        with self.db.reading() as conn:
            for start in range(0, len(saga_ids), 500):
                for row in conn.execute(_VERSIONS, {"ids": saga_ids[start:start + 500]}):
                    versions[row[0]] = tuple(row[1:])
        return versions

    def list_sagas(self, *, status: str | None, dataset: str | None,
                   partition_date: date | None, limit: int, cursor: str | None,
                   ) -> dict[str, Any]:
        query = select(SagaRow)
        if status:
            query = query.where(SagaRow.status == status)
        if dataset:
            query = query.where(SagaRow.dataset == dataset)
        if partition_date:
            query = query.where(SagaRow.partition_date == partition_date)
        if cursor:
            created, last_id = decode_cursor(cursor)
            query = query.where(or_(SagaRow.created_at < created,
                                    and_(SagaRow.created_at == created, SagaRow.id < last_id)))
        query = query.order_by(SagaRow.created_at.desc(), SagaRow.id.desc()).limit(limit + 1)
        with self.db.read_sessions() as session:
            rows = list(session.scalars(query))
        page, more = rows[:limit], len(rows) > limit
        next_cursor = encode_cursor(page[-1]) if more and page else None
        return {"items": [saga_summary(r) for r in page], "next_cursor": next_cursor}

    def events(self, saga_id: str, after: int, limit: int) -> dict[str, Any]:
        self.saga_exists(saga_id)
        return {"items": [
            {"seq": e.seq, "kind": e.kind, "step": e.step, "epoch": e.epoch,
             "payload": e.payload, "at": iso(e.created_at)}
            for e in self.log.events(saga_id, after, limit)
        ]}

    def saga_exists(self, saga_id: str) -> None:
        if self.log.get(saga_id) is None:
            raise Problem(404, "Saga not found", f"no saga with id {saga_id!r}")

    def cancel(self, saga_id: str, caller: Principal) -> dict[str, Any]:
        """Ask a saga to stop and compensate, for its owner or an admin; the event names the
        key that asked."""
        row = self.log.get(saga_id)
        if row is None:
            raise Problem(404, "Saga not found", f"no saga with id {saga_id!r}")
        _check_may_change(row, caller, "cancel")
        if row.status not in (SagaStatus.PENDING, SagaStatus.RUNNING):
            raise Problem(409, "Saga not cancellable", f"saga is {row.status}")
        pivot = next(s for s in self.log.steps(saga_id) if s.step == LakehouseIngestionSaga.pivot)
        if pivot.status == "succeeded":
            raise Problem(409, "Saga not cancellable",
                          "the catalog is already updated (past the point of no return)")
        self.log.request_cancel(saga_id, by=caller.key_id)
        if self.executor is not None:
            self.executor.wake()
        return self.saga(saga_id)

    def retry(self, saga_id: str, caller: Principal) -> dict[str, Any]:
        """Resume the compensation of a failed saga, for its owner or an admin."""
        row = self.log.get(saga_id)
        if row is None:
            raise Problem(404, "Saga not found", f"no saga with id {saga_id!r}")
        _check_may_change(row, caller, "retry")
        if not self.log.retry_failed(saga_id, by=caller.key_id):
            raise Problem(409, "Saga not retryable",
                          f"only a failed saga can be retried; this one is {row.status}")
        if self.executor is not None:
            self.executor.wake()
        return self.saga(saga_id)

    def dataset_list(self) -> list[dict[str, Any]]:
        return [spec.summary() for spec in self.datasets.values()]

    def partition(self, name: str, partition_date: date) -> dict[str, Any]:
        spec = self.spec(name)
        entries = current_entries(self.db, spec.name, partition_date)
        if not entries:
            raise Problem(404, "Partition not found",
                          f"no catalog entry for {spec.name} partition {partition_date}")
        return {"dataset": spec.name, "partition_date": partition_date.isoformat(),
                "layers": {e["layer"]: {k: v for k, v in e.items() if k != "layer"}
                           for e in entries}}

    def add_consumer(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec(body["dataset"])
        try:
            check_webhook_url(body["url"], self.settings.webhook_allow_hosts)
        except UnsafeUrl as exc:
            raise Problem(422, "Unsafe webhook URL", str(exc)) from exc
        secret = body.get("secret") or new_secret()
        try:
            check_supplied(secret)
        except InvalidSecret as exc:
            raise Problem(422, "Invalid webhook secret", str(exc)) from exc
        row = ConsumerRow(id=str(uuid.uuid4()), name=body["name"], dataset=spec.name,
                          url=body["url"], secret=secret, created_at=utcnow())
        try:
            with self.db.transaction() as s:
                s.add(row)
        except IntegrityError as exc:
            raise Problem(409, "Consumer exists",
                          f"dataset {spec.name} already has a consumer named {body['name']!r}",
                          ) from exc
        return {**consumer_view(row), "secret": standard_form(secret)}

    def consumers(self, dataset: str | None, *, full_urls: bool) -> list[dict[str, Any]]:
        """Registered consumers; their URLs in full only with ``full_urls`` (admin callers),
        else without path and query (which may carry a capability token)."""
        query = select(ConsumerRow).order_by(ConsumerRow.dataset, ConsumerRow.name)
        if dataset:
            query = query.where(ConsumerRow.dataset == dataset)
        with self.db.read_sessions() as s:
            views = [consumer_view(r) for r in s.scalars(query)]
        if not full_urls:
            views = [{**view, "url": redact_url(view["url"])} for view in views]
        return views

    def remove_consumer(self, consumer_id: str) -> None:
        with self.db.transaction() as s:
            result = s.execute(delete(ConsumerRow).where(ConsumerRow.id == consumer_id))
        if rowcount(result) == 0:
            raise Problem(404, "Consumer not found", f"no consumer with id {consumer_id!r}")

    @property
    def attached_lake(self) -> Any:
        """The lake if this process attached it (``start_workers``), else None."""
        return self._lake


def _check_may_change(row: SagaRow, caller: Principal, action: str) -> None:
    """Only a saga's owner (the key that submitted it) or an admin key may cancel or retry it.
    403 rather than 404: every reader may see the saga, so its existence is no secret."""
    if row.owner != caller.key_id and not caller.allows("admin"):
        raise Problem(403, "Forbidden", f"only the API key that submitted this saga, or an "
                      f"admin key, may {action} it")


def _too_many_active(exc: ActiveLimitReached) -> Problem:
    return Problem(429, "Too many active sagas",
                   f"{exc}; wait for some to finish (a failed saga counts until an operator "
                   "retries it)", headers={"Retry-After": "5"})


_IDEMPOTENT_QUERY = select(SagaRow.id, SagaRow.request_fingerprint).where(
    SagaRow.owner == bindparam("owner"), SagaRow.idempotency_key == bindparam("key"))


_VERSIONS = select(
    SagaRow.id, SagaRow.updated_at, SagaRow.event_seq,
    select(func.coalesce(func.sum(OutboxRow.attempts + 1), 0))
    .where(OutboxRow.saga_id == SagaRow.id).scalar_subquery(),
).where(SagaRow.id.in_(bindparam("ids", expanding=True)))
