"""Service settings: the only place environment variables are read (prefix ``LAKESAGA_``).

Every field is documented in README.md; paths are resolved once, here, so that the rest of the
code never sees a relative path whose meaning depends on the current directory.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
#: Headroom a worker keeps outside DuckDB's buffer pool, at the least; and the least budget.
HEADROOM_MIN = 256 * 2**20
MIN_MEMORY_BUDGET = 512 * 2**20


def parse_bytes(text: str) -> int:
    """``4GB``, ``1536 MiB``, ``2e9`` → bytes (decimal and binary units, as DuckDB reads them)."""
    value = text.strip().upper().replace(" ", "")
    number = value.rstrip("KMGTIB")
    unit = value[len(number):]
    if unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: use a number with B, KB, MB, GB, TB, KiB, "
                         "MiB, GiB or TiB")
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size") from None
    if not amount > 0 or amount != amount or amount == float("inf"):
        raise ValueError(f"{text!r} must be a positive size")
    return int(amount * _UNITS[unit])


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAKESAGA_", extra="ignore")

    #: SQLAlchemy URL of the saga log (and catalog, outbox). SQLite is the embedded default.
    database_url: str = "sqlite:///./var/lakesaga.db"
    #: Directory request paths are relative to; nothing outside it can be ingested.
    source_root: Path = Path("./var/raw")
    #: DuckLake data files (and, in embedded mode, the DuckLake SQLite catalog).
    lake_dir: Path = Path("./var/lake")
    #: Optional DuckLake catalog override, e.g. ``postgres:dbname=lake host=...``.
    #: Default: SQLite file under lake_dir, or the saga database when it is PostgreSQL.
    lake_catalog: str | None = None
    #: PostgreSQL schema holding the DuckLake metadata tables when the catalog is PostgreSQL.
    lake_metadata_schema: str = Field(default="ducklake", pattern=r"^[a-z][a-z0-9_]{0,62}$")
    #: Extra dataset spec files (``*.yaml``) beside the built-in ``clickstream``.
    datasets_dir: Path | None = None
    #: Fault points for demos and tests: ``step=raise|kill|sleep:MS[@N],...``.
    faults: str = ""
    #: Append every fault point reached to this file (crash-matrix coverage).
    fault_trace: str | None = None

    #: Sagas executed concurrently by one process.
    worker_concurrency: int = Field(default=2, ge=1, le=64)
    #: A claim is owned for this long without a heartbeat; then another worker may take over.
    lease_ttl_s: float = Field(default=30.0, gt=0.5)
    #: How often an idle worker looks for work.
    poll_interval_s: float = Field(default=0.5, gt=0)
    #: Claims of one saga before it is treated as poison and compensated.
    max_saga_attempts: int = Field(default=5, ge=1)
    #: Tries of one step (or one compensation) on transient errors.
    step_max_attempts: int = Field(default=4, ge=1)
    #: First backoff between step retries; doubles each time, with jitter.
    step_backoff_s: float = Field(default=0.2, ge=0)
    #: A step running longer than this is taken as stuck: its lease is no longer renewed, so
    #: another worker takes the saga over (0 = no limit).
    step_timeout_s: float = Field(default=3600.0, ge=0)

    #: Largest number of files and bytes one saga may ingest.
    max_source_files: int = Field(default=10_000, ge=1)
    max_source_bytes: int = Field(default=50 * 1024**3, ge=1)
    #: Files up to this total size are hashed when the saga is accepted (after the request
    #: passed every limit); larger sources are hashed by bronze on first read and verified on
    #: any re-read, so that no POST spends more than a few milliseconds of CPU hashing.
    hash_at_accept_max_bytes: int = Field(default=8 * 1024**2, ge=0)
    #: Largest number of bytes (gzip files counted decompressed) and rows one saga may ingest:
    #: a small compressed file can hold far more than ``max_source_bytes`` suggests.
    max_ingest_bytes: int = Field(default=50 * 1024**3, ge=1)
    max_ingest_rows: int = Field(default=1_000_000_000, ge=1)

    #: Memory budget of a worker process (e.g. ``4GB``, ``1536MiB``; empty = DuckDB's default,
    #: 80 % of RAM, for DuckDB alone). DuckDB's own ``memory_limit`` bounds only its buffer
    #: pool, so it gets the budget minus headroom for the interpreter, the service and
    #: DuckDB's allocations outside the pool (``duckdb_memory_limit_bytes``).
    duckdb_memory_limit: str = ""
    duckdb_threads: int = Field(default=0, ge=0)

    #: Webhook delivery: hosts allowed even though they resolve to private/loopback addresses.
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    #: Wall-clock limit of one delivery attempt until the answer's headers are in (the
    #: timeout above bounds each read only), and deliveries in flight at once per process (at
    #: most one per consumer).
    webhook_deadline_s: float = Field(default=15.0, gt=0)
    webhook_concurrency: int = Field(default=4, ge=1, le=64)
    webhook_max_attempts: int = Field(default=8, ge=1)

    #: API limits: request body size (413), requests per second and burst per API key in each
    #: process (429 with Retry-After; 0 = no limit), and unfinished sagas per key (429).
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)
    rate_limit_per_s: float = Field(default=100.0, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1)
    max_active_sagas_per_key: int = Field(default=100, ge=0)
    #: Failed authentications (a wrong, unknown, revoked or malformed key) allowed per client
    #: address and per key id in each process: a burst, then this many per second (0 = no
    #: limit); beyond, 429 with Retry-After.
    auth_failure_rate_per_s: float = Field(default=1.0, ge=0)
    auth_failure_burst: int = Field(default=20, ge=1)
    #: Long polls (``GET /sagas/{id}?wait=``) waiting at once in each process, and per API key
    #: in each process (429 with Retry-After beyond; 0 = no limit).
    max_waits: int = Field(default=1000, ge=0)
    max_waits_per_key: int = Field(default=100, ge=0)

    #: ``lakesaga serve``: API processes sharing the port, and whether each also runs the saga
    #: executor and webhook dispatcher (``--processes``, ``--workers/--no-workers``).
    serve_processes: int = Field(default=1, ge=1, le=64)
    serve_workers: bool = True

    #: Run ``alembic upgrade head`` when the service starts.
    auto_migrate: bool = True
    log_level: str = "INFO"

    @field_validator("source_root", "lake_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("duckdb_memory_limit")
    @classmethod
    def _memory_budget(cls, value: str) -> str:
        if value.strip():
            budget = parse_bytes(value)
            if budget < MIN_MEMORY_BUDGET:
                raise ValueError(f"must be at least {MIN_MEMORY_BUDGET // 2**20} MiB "
                                 "(the process itself needs about 200 MiB)")
        return value.strip()

    @property
    def duckdb_memory_limit_bytes(self) -> int | None:
        """DuckDB's ``memory_limit``: the budget less a quarter of it, and at least 256 MiB
        (measured: at a 2 GB limit DuckDB's process peaked 355 MiB above it, 180 MiB of which
        the idle service holds)."""
        if not self.duckdb_memory_limit:
            return None
        budget = parse_bytes(self.duckdb_memory_limit)
        return budget - max(budget // 4, HEADROOM_MIN)

    @field_validator("webhook_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")


@lru_cache
def get_settings() -> Settings:
    return Settings()
