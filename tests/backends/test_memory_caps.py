"""The `memory://` realtime tier's caps: what it holds is bounded, and nothing is evicted."""

from __future__ import annotations

import pytest

from dualwrite.backends.realtime.memory import MemoryRealtimeTier
from dualwrite.clock import ManualClock
from dualwrite.errors import BackendError
from dualwrite.model import REALTIME_TTL_MS, ChannelRef, RealtimeMessage
from dualwrite.ports import SendClaim, SendKey, TokenRequest

CHANNEL = ChannelRef("acme", "general")


def message(clock: ManualClock, message_id: str, text: str) -> RealtimeMessage:
    now = clock.now_ms()
    return RealtimeMessage(message_id, "u1", "Ada", text, now, now + REALTIME_TTL_MS)


async def test_a_full_tier_refuses_writes_keeps_what_it_holds_and_takes_again_after_expiry() -> (
    None
):
    clock = ManualClock()
    tier = MemoryRealtimeTier(clock, max_bytes=3000, max_claims=10, max_buckets=10)
    first = message(clock, "-a", "x" * 1000)
    await tier.write(CHANNEL, first)
    await tier.write(CHANNEL, message(clock, "-b", "y" * 1000))
    with pytest.raises(BackendError, match="full"):
        await tier.write(CHANNEL, message(clock, "-c", "z" * 1000))
    assert [m.message_id for m in await tier.read_since(CHANNEL, None, 10)] == ["-a", "-b"]
    await tier.write(CHANNEL, first)  # rewriting an entry it holds costs nothing more
    clock.advance(REALTIME_TTL_MS)
    await tier.write(CHANNEL, message(clock, "-d", "z" * 1000))  # the expired made room
    assert [m.message_id for m in await tier.read_since(CHANNEL, None, 10)] == ["-d"]


async def test_idempotency_keys_are_capped() -> None:
    clock = ManualClock()
    tier = MemoryRealtimeTier(clock, max_bytes=10_000, max_claims=2, max_buckets=10)
    for i in range(2):
        await tier.claim_send(SendKey("acme", "u1", f"c{i}"), SendClaim(f"-{i}", 1, "f"), 1000)
    with pytest.raises(BackendError):
        await tier.claim_send(SendKey("acme", "u1", "c9"), SendClaim("-9", 1, "f"), 1000)
    clock.advance(1001)
    claim = SendClaim("-9", 1, "f")
    assert await tier.claim_send(SendKey("acme", "u1", "c9"), claim, 1000) == claim


async def test_rate_limit_buckets_are_bounded() -> None:
    clock = ManualClock()
    tier = MemoryRealtimeTier(clock, max_bytes=10_000, max_claims=10, max_buckets=100)
    for i in range(10_000):
        await tier.take_tokens([TokenRequest(f"made-up-channel-{i}", 1, 1 / 3600, 2)])
    assert len(tier._buckets._buckets) <= 100
