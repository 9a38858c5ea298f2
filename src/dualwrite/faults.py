"""Fault injection: wrappers that make a backend's calls fail or hang on demand.

Tests use them to walk both failure paths against real backends; `dualwrite serve --fault`
uses them so a person can see both banners. Never enable them in production.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Sequence

from dualwrite.model import (
    ChannelRef,
    HistoryPage,
    LiveEvent,
    PermanentWrite,
    RealtimeMessage,
    ReplayPage,
    StoredMessage,
)
from dualwrite.ports import LiveFeed, PermanentStore, RealtimeTier, SendClaim, SendKey, TokenRequest


class InjectedFault(ConnectionError):
    """The error an injected failure raises."""


class Faults:
    """A failure plan: healthy, failing, hanging, or failing at random.

    ``operations`` limits the plan to those method names (all calls when empty).
    """

    def __init__(
        self,
        *,
        probability: float = 0.0,
        operations: Collection[str] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.probability = probability
        self.operations = frozenset(operations)
        self.calls: Counter[str] = Counter()
        self._rng = rng or random.Random()
        self._mode = "ok"
        self._remaining: int | None = None

    def fail(self, times: int | None = None) -> None:
        """Fail the next ``times`` calls (every call when None) with `InjectedFault`."""
        self._mode, self._remaining = "fail", times

    def hang(self) -> None:
        """Make every call wait forever (until the caller's timeout cancels it)."""
        self._mode, self._remaining = "hang", None

    def heal(self) -> None:
        self._mode, self._remaining, self.probability = "ok", None, 0.0

    async def check(self, operation: str) -> None:
        if self.operations and operation not in self.operations:
            return
        self.calls[operation] += 1
        if self._mode == "hang":
            await asyncio.Event().wait()
        if self._mode == "fail":
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._mode, self._remaining = "ok", None
            raise InjectedFault(f"injected failure of {operation}")
        if self.probability and self._rng.random() < self.probability:
            raise InjectedFault(f"injected random failure of {operation}")


class FaultyRealtimeTier:
    """A `RealtimeTier` that consults ``faults`` before every call to ``inner``."""

    def __init__(self, inner: RealtimeTier, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def write(self, channel: ChannelRef, message: RealtimeMessage) -> None:
        await self.faults.check("write")
        await self.inner.write(channel, message)

    async def read(self, channel: ChannelRef, message_id: str) -> RealtimeMessage | None:
        await self.faults.check("read")
        return await self.inner.read(channel, message_id)

    async def read_since(
        self, channel: ChannelRef, after_id: str | None, limit: int
    ) -> list[RealtimeMessage]:
        await self.faults.check("read_since")
        return await self.inner.read_since(channel, after_id, limit)

    async def read_before(
        self, channel: ChannelRef, before: tuple[int, str] | None, limit: int
    ) -> list[RealtimeMessage]:
        await self.faults.check("read_before")
        return await self.inner.read_before(channel, before, limit)

    async def delete(self, channel: ChannelRef, message_id: str) -> None:
        await self.faults.check("delete")
        await self.inner.delete(channel, message_id)

    async def unconfirmed(
        self,
        channel: ChannelRef,
        after: tuple[int, str] | None,
        sent_until_ms: int,
        limit: int,
    ) -> list[RealtimeMessage]:
        await self.faults.check("unconfirmed")
        return await self.inner.unconfirmed(channel, after, sent_until_ms, limit)

    async def unconfirmed_channels(self, sent_until_ms: int) -> list[ChannelRef]:
        await self.faults.check("unconfirmed_channels")
        return await self.inner.unconfirmed_channels(sent_until_ms)

    async def confirm(self, channel: ChannelRef, message_ids: Sequence[str]) -> None:
        await self.faults.check("confirm")
        await self.inner.confirm(channel, message_ids)

    async def read_after(self, channel: ChannelRef, cursor: str | None, limit: int) -> ReplayPage:
        await self.faults.check("read_after")
        return await self.inner.read_after(channel, cursor, limit)

    async def cursor_at(self, channel: ChannelRef, time_ms: int) -> str:
        await self.faults.check("cursor_at")
        return await self.inner.cursor_at(channel, time_ms)

    def live_feed(self) -> LiveFeed:
        return self.inner.live_feed()

    async def channels(self) -> list[ChannelRef]:
        await self.faults.check("channels")
        return await self.inner.channels()

    async def sweep_expired(self, now_ms: int) -> int:
        await self.faults.check("sweep_expired")
        return await self.inner.sweep_expired(now_ms)

    async def claim_send(self, key: SendKey, claim: SendClaim, ttl_ms: int) -> SendClaim:
        await self.faults.check("claim_send")
        return await self.inner.claim_send(key, claim, ttl_ms)

    async def take_tokens(self, requests: Sequence[TokenRequest]) -> float:
        # Not a fault point: injected faults target the message path (`fail(times=1)` means
        # "the next write"), and a rate limit whose tier fails is skipped anyway.
        return await self.inner.take_tokens(requests)

    async def publish(self, workspace_id: str, event: LiveEvent) -> None:
        await self.faults.check("publish")
        await self.inner.publish(workspace_id, event)

    async def events(self, workspace_id: str) -> AsyncIterator[LiveEvent]:
        await self.faults.check("events")
        async for event in self.inner.events(workspace_id):
            yield event


class FaultyPermanentStore:
    """A `PermanentStore` that consults ``faults`` before every call to ``inner``.

    Writes for which ``poisoned`` is true always fail (alone, or failing their batch).
    """

    def __init__(self, inner: PermanentStore, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.poisoned: Callable[[PermanentWrite], bool] = lambda write: False

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def save(self, write: PermanentWrite) -> None:
        await self.faults.check("save")
        if self.poisoned(write):
            raise InjectedFault(f"injected failure of message {write.message_id}")
        await self.inner.save(write)

    async def save_many(self, writes: Sequence[PermanentWrite]) -> None:
        await self.faults.check("save_many")
        if any(self.poisoned(w) for w in writes):
            raise InjectedFault("injected failure of a batch holding a poisoned message")
        await self.inner.save_many(writes)

    async def get(self, channel: ChannelRef, message_id: str) -> StoredMessage | None:
        await self.faults.check("get")
        return await self.inner.get(channel, message_id)

    async def find(self, message_id: str) -> StoredMessage | None:
        await self.faults.check("find")
        return await self.inner.find(message_id)

    async def get_many(
        self, channel: ChannelRef, message_ids: Sequence[str]
    ) -> dict[str, StoredMessage]:
        await self.faults.check("get_many")
        return await self.inner.get_many(channel, message_ids)

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        await self.faults.check("history")
        return await self.inner.history(channel, before, limit)

    async def add_channel(self, channel: ChannelRef) -> None:
        await self.faults.check("add_channel")
        await self.inner.add_channel(channel)

    async def channels(self, workspace_id: str) -> list[str]:
        await self.faults.check("channels")
        return await self.inner.channels(workspace_id)
