from __future__ import annotations

from dualwrite.server.ratelimit import RateLimiter


def test_bucket_refills_at_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, burst=2, now=lambda: now[0])
    key = ("ws", "u1")
    assert limiter.acquire(key) == 0.0
    assert limiter.acquire(key) == 0.0
    assert limiter.acquire(key) == 0.5
    now[0] += 0.5
    assert limiter.acquire(key) == 0.0
    assert RateLimiter(0, burst=1).acquire(key) == 0.0, "0 turns it off"
