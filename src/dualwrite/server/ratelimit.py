"""Per-user send rate limit: a token bucket per (workspace, user), in this process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RateLimiter:
    """``rate_per_s`` sends a second on average, bursts of up to ``burst``; 0 turns it off."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        now: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self._now = now
        self._max_keys = max_keys
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def acquire(self, key: tuple[str, str]) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one is free."""
        if self.rate <= 0:
            return 0.0
        now = self._now()
        tokens, stamp = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > self._max_keys:
                self._forget_full(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        # Buckets that have refilled completely hold no information.
        refill_s = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill_s}


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
