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


def test_past_its_key_limit_it_forgets_refilled_buckets_and_keeps_limiting() -> None:
    now = [0.0]
    limiter = RateLimiter(1.0, burst=1, now=lambda: now[0], max_keys=100)
    for i in range(100):
        limiter.acquire(("ws", f"old{i}"))
    now[0] += 5  # every old bucket has refilled
    for i in range(300):  # all busy: kept, however many (forgetting one would forgive it)
        assert limiter.acquire(("ws", f"busy{i}")) == 0.0
    assert len(limiter) == 300
    assert limiter.acquire(("ws", "busy0")) > 0, "still limited"
    now[0] += 5
    limiter.acquire(("ws", "new"))
    assert len(limiter) == 100
