"""The server's rate limits when the realtime tier that keeps them does not answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from dualwrite.errors import BackendTimeout
from dualwrite.ports import TokenRequest
from dualwrite.server.ratelimit import Limit, RateLimits
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings


class HungTier:
    """Answers `take_tokens` as `DualWrite` does when the tier hangs: after its timeout."""

    def __init__(self) -> None:
        self.calls = 0

    async def take_tokens(self, requests: Sequence[TokenRequest]) -> float:
        self.calls += 1
        raise BackendTimeout("rate limit did not answer within 2s")


async def test_an_unanswered_limit_is_skipped_then_not_asked_for_a_while() -> None:
    now = [100.0]
    limits = RateLimits(ServerSettings(rate_limit_skip_s=10), lambda: now[0])
    tier = HungTier()
    dw = cast(DualWrite, cast(Any, tier))
    assert await limits.wait_s(dw, (Limit.HISTORY, "acme/u1", 1)) == 0.0
    assert await limits.wait_s(dw, (Limit.HISTORY, "acme/u1", 1)) == 0.0
    assert tier.calls == 1, "not asked again while skipping"
    now[0] += 10
    assert await limits.wait_s(dw, (Limit.HISTORY, "acme/u1", 1)) == 0.0
    assert tier.calls == 2, "asked again after rate_limit_skip_s"


async def test_limits_set_to_zero_are_never_asked() -> None:
    limits = RateLimits(ServerSettings(read_rate_per_s=0), lambda: 0.0)
    tier = HungTier()
    assert await limits.wait_s(cast(DualWrite, cast(Any, tier)), (Limit.HISTORY, "u", 1)) == 0.0
    assert tier.calls == 0
