"""Webhook secrets in the Standard Webhooks form, checked with the ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from app.notify.signing import InvalidSecret, check_supplied, new_secret, sign, signing_key, standard_form


@pytest.mark.parametrize("stored", ["plain-secret-0123456789", new_secret()])
def test_signing__a_stock_verifier_accepts_the_standard_form_of_any_stored_secret(
        stored: str) -> None:
    body, timestamp = b'{"rows": 3}', int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(stored, "msg_1", timestamp, body)}
    assert Webhook(standard_form(stored)).verify(body, headers) == {"rows": 3}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_signing__plain_secrets_keep_their_key_and_whsec_ones_are_decoded() -> None:
    assert signing_key("plain") == b"plain"
    assert standard_form("plain") == "whsec_" + base64.b64encode(b"plain").decode()
    key = b"k" * 32
    assert signing_key("whsec_" + base64.b64encode(key).decode()) == key
    assert signing_key("whsec_not base64!") == b"whsec_not base64!"  # a plain secret after all
    check_supplied("whsec_" + base64.b64encode(b"x" * 16).decode())
    for bad in ("whsec_" + base64.b64encode(b"x" * 15).decode(), "whsec_not base64!"):
        with pytest.raises(InvalidSecret, match="at least 16 bytes"):
            check_supplied(bad)
