"""The in-process limiters behind 429: token buckets per key, bounded in memory."""

from __future__ import annotations

from app.auth import RateLimiter, key_id_of


def test_rate_limiter__refuses_beyond_the_burst_until_it_refills() -> None:
    limiter = RateLimiter(rate=0.001, burst=2)
    assert limiter.take("client:a") is None and limiter.take("client:a") is None
    wait = limiter.take("client:a")
    assert wait is not None and wait > 100
    assert limiter.take("client:b") is None  # buckets are per key


def test_rate_limiter__forgets_the_least_recently_used_beyond_max_keys() -> None:
    limiter = RateLimiter(rate=0.001, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        assert limiter.take(key) is None
    assert limiter.take("a") is not None  # a is now the most recently used
    assert limiter.take("d") is None  # evicts b, the least recently used
    assert list(limiter._buckets) == ["c", "a", "d"]


def test_key_id_of__any_token_shaped_like_a_key() -> None:
    assert key_id_of("lsk_0123456789abcdef_whatever") == "0123456789abcdef"
    assert key_id_of("lsk_0123456789ABCDEF_x") is None
    assert key_id_of("Basic dXNlcg==") is None
