"""Webhook secrets and signatures in the Standard Webhooks form (standardwebhooks.com).

A secret is shown as ``whsec_`` + base64 of the HMAC key's bytes, so stock verifiers
(``standardwebhooks.Webhook(secret).verify(body, headers)``) accept the signatures. A stored
secret in that form signs with its decoded bytes; one stored in any other form (consumers
registered with a plain secret) signs, as before, with its UTF-8 bytes, and its Standard
Webhooks form is ``whsec_`` + base64 of those bytes: signatures do not change.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

PREFIX = "whsec_"
#: Bytes of a generated key (Standard Webhooks asks for 24 to 64).
KEY_BYTES = 32
MIN_KEY_BYTES = 16


class InvalidSecret(ValueError):
    """A supplied secret cannot be used; the message is safe to show (it names no secret)."""


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def signing_key(secret: str) -> bytes:
    """The HMAC key of a stored secret."""
    key = _standard_key(secret)
    return key if key is not None else secret.encode()


def standard_form(secret: str) -> str:
    """The ``whsec_`` form of a stored secret, the one consumers verify with."""
    if _standard_key(secret) is not None:
        return secret
    return PREFIX + base64.b64encode(secret.encode()).decode()


def check_supplied(secret: str) -> None:
    """A ``whsec_`` secret given at registration must be base64 of at least 16 bytes."""
    if secret.startswith(PREFIX):
        key = _standard_key(secret)
        if key is None or len(key) < MIN_KEY_BYTES:
            raise InvalidSecret(f"a secret starting with {PREFIX!r} must be {PREFIX} followed "
                                f"by the base64 of at least {MIN_KEY_BYTES} bytes")


def _standard_key(secret: str) -> bytes | None:
    """The key bytes of a secret in the ``whsec_`` form; None for any other secret."""
    if not secret.startswith(PREFIX):
        return None
    try:
        return base64.b64decode(secret[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        return None  # a plain secret that happens to start with the prefix


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` with the stored secret's key."""
    mac = hmac.new(signing_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()
