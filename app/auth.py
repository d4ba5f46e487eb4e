"""API keys and per-key rate limits.

A key is ``lsk_<id>_<secret>``: the id is public (it names the key in listings and logs), the
secret is 256 random bits. Only the SHA-256 of the secret is stored, and it is compared with
``hmac.compare_digest``. A slow password hash (bcrypt, argon2) buys nothing for a random
256-bit secret and would cost milliseconds on every request.

Scopes: ``read`` (GET), ``write`` (submit, cancel, retry sagas), ``admin`` (consumers, i.e.
where the service sends data). ``write`` includes ``read``; ``admin`` includes both.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update

from app.db.models import ApiKeyRow
from app.db.rows import rowcount, utcnow
from app.db.session import Database, run_on_driver

SCOPES = ("read", "write", "admin")
_IMPLIED = {"read": {"read"}, "write": {"read", "write"}, "admin": {"read", "write", "admin"}}
_TOKEN = re.compile(r"lsk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_KEY_ID = re.compile(r"lsk_([0-9a-f]{16})_")
#: Compared against when the key id is unknown, so that the answer takes the same time.
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class InvalidKey(ValueError):
    """A key could not be created or changed; the message is safe to show."""


@dataclass(frozen=True)
class Principal:
    """The caller a valid key identifies."""

    key_id: str
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def effective_scopes(scopes: list[str]) -> frozenset[str]:
    granted: set[str] = set()
    for scope in scopes:
        granted |= _IMPLIED.get(scope, set())
    return frozenset(granted)


def create_key(db: Database, name: str, scopes: list[str]) -> tuple[str, dict[str, Any]]:
    """Create a key; returns (token, listing). The token is shown once and never stored."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}", name):
        raise InvalidKey("key name: 1-100 letters, digits, '_', '.', '@' or '-'")
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise InvalidKey(f"scopes must be a non-empty subset of {', '.join(SCOPES)}")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    row = ApiKeyRow(id=key_id, name=name, secret_hash=_hash(secret),
                    scopes=sorted(set(scopes)), created_at=utcnow())
    with db.transaction() as s:
        s.add(row)
    return f"lsk_{key_id}_{secret}", key_view(row)


def list_keys(db: Database) -> list[dict[str, Any]]:
    with db.read_sessions() as s:
        return [key_view(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]


def revoke_key(db: Database, key_id: str) -> bool:
    """Revoke a key at once (the next request with it is refused). False if unknown/revoked."""
    with db.transaction() as s:
        result = s.execute(update(ApiKeyRow)
                           .where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None))
                           .values(revoked_at=utcnow()))
    return rowcount(result) == 1


#: Built once: the only query on the path of every request.
_KEY_BY_ID = select(ApiKeyRow.id, ApiKeyRow.name, ApiKeyRow.secret_hash, ApiKeyRow.scopes,
                    ApiKeyRow.revoked_at).where(ApiKeyRow.id == bindparam("key_id"))


def authenticate(db: Database, token: str) -> Principal | None:
    """The principal of a valid, unrevoked token; None for anything else.

    One primary-key lookup per call, never cached, so that a revocation applies to the next
    request in every process.
    """
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    key_id, secret = match.groups()
    with db.reading() as conn:
        row = run_on_driver(conn, _KEY_BY_ID, {"key_id": key_id}).first()
    stored = row.secret_hash if row is not None else _DUMMY_HASH
    if not hmac.compare_digest(stored, _hash(secret)) or row is None or row.revoked_at:
        return None
    return Principal(key_id=row.id, name=row.name, scopes=effective_scopes(row.scopes))


def key_view(row: ApiKeyRow) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "scopes": row.scopes,
            "created_at": _iso(row.created_at), "revoked_at": _iso(row.revoked_at)}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value else None


def key_id_of(token: str) -> str | None:
    """The key id a token names, if it has the shape of one (whatever its secret)."""
    match = _KEY_ID.match(token)
    return match.group(1) if match else None


class RateLimiter:
    """A token bucket per key, in this process: ``rate`` requests/s, bursts up to ``burst``.

    At most ``max_keys`` buckets are kept (the least recently used is forgotten first), so
    that callers inventing keys (client addresses, key ids) cannot grow it without bound.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, max(1, burst), max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float | None:
        """Spend one token; None if allowed, else the seconds until one is available."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait_s = (1 - tokens) / self.rate if tokens < 1 else None
            self._buckets[key] = (tokens if wait_s is not None else tokens - 1, now)
            self._buckets.move_to_end(key)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait_s
