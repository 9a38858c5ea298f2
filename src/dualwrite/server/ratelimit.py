"""The server's rate limits, each a token bucket kept in the realtime tier.

On a shared tier (Redis, Firebase) every process takes from the same buckets, so a user's
limit holds however many processes serve them; on `memory://` (one process) they live in it.
Users are keyed by workspace and user id, sign-ins by client address.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from enum import Enum

from dualwrite.errors import BackendError
from dualwrite.ports import TokenRequest
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings

log = logging.getLogger(__name__)


class Limit(Enum):
    """A kind of request: the `ServerSettings` field of its rate, and its burst in seconds of
    that rate (and in requests at the least)."""

    # The first element names the bucket (and keeps members with one rate distinct).
    SEND = ("send", "send_rate_per_s", 2)
    SEND_BYTES = ("send_bytes", "send_bytes_per_s", 8)
    CHANNEL_BYTES = ("channel_bytes", "channel_bytes_per_s", 8)
    HISTORY = ("history", "read_rate_per_s", 2)
    PERSIST = ("persist", "read_rate_per_s", 2)
    CONNECT = ("connect", "read_rate_per_s", 2)
    SIGN_IN = ("sign_in", "sign_in_rate_per_s", 10)


Charge = tuple[Limit, str, float]
"""A limit, the subject it counts (a user, a channel, an address), and the request's cost."""


class RateLimits:
    def __init__(self, settings: ServerSettings, now: Callable[[], float]) -> None:
        self._settings = settings
        self._now = now
        self._skip_until = 0.0

    async def wait_s(self, dw: DualWrite, *charges: Charge) -> float:
        """0.0 if every charge fits its limit (and is taken, in one call to the tier), else
        the seconds to wait.

        If the tier does not answer, the request goes on (logged), and so do the requests of
        the next `rate_limit_skip_s` without asking it: the call a limit guards needs that tier
        or the store and answers for itself, and an outage should not cost every request a
        timeout more.
        """
        requests = [r for r in (self._request(*c) for c in charges) if r is not None]
        if not requests or self._now() < self._skip_until:
            return 0.0
        try:
            return await dw.take_tokens(requests)
        except BackendError as error:
            self._skip_until = self._now() + self._settings.rate_limit_skip_s
            log.warning(
                "rate limits unavailable, skipped for %gs: error=%s",
                self._settings.rate_limit_skip_s,
                error,
            )
            return 0.0

    def _request(self, limit: Limit, subject: str, cost: float) -> TokenRequest | None:
        bucket, field, burst_factor = limit.value
        rate = float(getattr(self._settings, field))
        if rate <= 0:
            return None
        # At least `burst_factor` requests, however low the rate.
        burst = max(float(burst_factor), rate * burst_factor)
        return TokenRequest(f"{bucket}:{subject}", min(cost, burst), rate, burst)


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
