"""Token buckets in one process's memory: the `memory://` tier's `take_tokens`."""

from __future__ import annotations

from collections.abc import Callable


def refill(tokens: float, elapsed_s: float, rate_per_s: float, burst: float) -> float:
    return min(burst, tokens + max(0.0, elapsed_s) * rate_per_s)


class TokenBuckets:
    """Buckets by key; at most ``max_keys`` kept (full buckets carry no information)."""

    def __init__(self, now_s: Callable[[], float], max_keys: int) -> None:
        self._now_s = now_s
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float, float]] = {}  # tokens, stamp, full at

    def take(self, key: str, cost: float, rate_per_s: float, burst: float) -> float:
        now = self._now_s()
        tokens, stamp, _ = self._buckets.get(key, (burst, now, now))
        tokens = refill(tokens, now - stamp, rate_per_s, burst)
        wait = 0.0
        if tokens >= cost:
            tokens -= cost
        else:
            wait = (cost - tokens) / rate_per_s
        self._buckets[key] = (tokens, now, now + (burst - tokens) / rate_per_s)
        if len(self._buckets) > self._max_keys:
            self._buckets = {k: v for k, v in self._buckets.items() if v[2] > now}
        if len(self._buckets) > self._max_keys:
            # Still over (many keys, all busy): keep the half closest to empty, so memory stays
            # bounded; a forgotten bucket starts full again.
            kept = sorted(self._buckets.items(), key=lambda kv: kv[1][2])[self._max_keys // 2 :]
            self._buckets = dict(kept)
        return wait
