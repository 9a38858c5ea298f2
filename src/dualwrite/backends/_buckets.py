"""Token buckets in one process's memory: the `memory://` tier's `take_tokens`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dualwrite.ports import TokenRequest


class TokenBuckets:
    """Buckets by key; at most ``max_keys`` kept (full buckets carry no information)."""

    def __init__(self, now_s: Callable[[], float], max_keys: int) -> None:
        self._now_s = now_s
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float, float]] = {}  # tokens, stamp, full at

    def take(self, requests: Sequence[TokenRequest]) -> float:
        """All or nothing: 0.0 if every bucket had its cost (now taken), else the longest wait."""
        now = self._now_s()
        levels = [self._level(r, now) for r in requests]
        wait = max(
            ((r.cost - level) / r.rate_per_s for r, level in zip(requests, levels, strict=True)),
            default=0.0,
        )
        if wait > 0:
            return wait
        for request, level in zip(requests, levels, strict=True):
            tokens = level - request.cost
            full_at = now + (request.burst - tokens) / request.rate_per_s
            self._buckets[request.key] = (tokens, now, full_at)
        self._bound(now)
        return 0.0

    def _level(self, request: TokenRequest, now: float) -> float:
        tokens, stamp, _ = self._buckets.get(request.key, (request.burst, now, now))
        return min(request.burst, tokens + max(0.0, now - stamp) * request.rate_per_s)

    def _bound(self, now: float) -> None:
        if len(self._buckets) > self._max_keys:
            self._buckets = {k: v for k, v in self._buckets.items() if v[2] > now}
        if len(self._buckets) > self._max_keys:
            # Still over (many keys, all busy): keep the half closest to empty, so memory stays
            # bounded; a forgotten bucket starts full again.
            kept = sorted(self._buckets.items(), key=lambda kv: kv[1][2])[self._max_keys // 2 :]
            self._buckets = dict(kept)
