"""Per-user send rate limit: a token bucket per (workspace, user), in this process."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
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
        # Ordered by last use: the oldest bucket is the first to have refilled, so forgetting
        # refilled buckets pops from the front and never walks the rest.
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def acquire(self, key: tuple[str, str]) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one is free."""
        if self.rate <= 0:
            return 0.0
        now = self._now()
        tokens, stamp = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
        if tokens >= 1:
            self._touch(key, (tokens - 1, now))
            if len(self._buckets) > self._max_keys:
                self._forget_full(now)
            return 0.0
        self._touch(key, (tokens, now))
        return (1 - tokens) / self.rate

    def _touch(self, key: tuple[str, str], bucket: tuple[float, float]) -> None:
        self._buckets[key] = bucket
        self._buckets.move_to_end(key)

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled completely (they hold no information), oldest
        first, stopping at the first that has not: the cost is what is dropped."""
        refill_s = self.burst / self.rate
        while len(self._buckets) > self._max_keys:
            key, (_, stamp) = next(iter(self._buckets.items()))
            if now - stamp < refill_s:
                break  # every bucket is in use: keep them all rather than forgive a sender
            del self._buckets[key]

    def __len__(self) -> int:
        """Buckets held (for tests and metrics)."""
        return len(self._buckets)


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
