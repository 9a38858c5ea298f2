"""In-process realtime tier: the embedded default, and the fake the unit tests run on.

It reaches subscribers of this process only; use Redis or Firebase to share a tier. What it
holds is capped (`Settings.memory_max_bytes`, `memory_max_claims`): past a cap a write fails
(the send answers "Message failed to send. Retry?") rather than evict anything, since an entry
may not be saved yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from dualwrite.backends import BackendContext
from dualwrite.backends._buckets import TokenBuckets
from dualwrite.backends._recent import RecentIds
from dualwrite.clock import Clock
from dualwrite.errors import BackendError
from dualwrite.model import ChannelRef, LiveEvent, RealtimeMessage
from dualwrite.ports import RealtimeTier, SendClaim, SendKey, TokenRequest


class MemoryRealtimeTier:
    def __init__(self, clock: Clock, max_bytes: int, max_claims: int, max_buckets: int) -> None:
        self._clock = clock
        self._max_bytes = max_bytes
        self._max_claims = max_claims
        self._bytes = 0
        self._channels: dict[ChannelRef, dict[str, RealtimeMessage]] = {}
        self._subscribers: dict[ChannelRef, set[asyncio.Queue[RealtimeMessage]]] = {}
        self._claims: dict[SendKey, tuple[SendClaim, int]] = {}
        self._buckets = TokenBuckets(lambda: clock.now_ms() / 1000, max_keys=max_buckets)
        self._listeners: dict[str, set[asyncio.Queue[LiveEvent]]] = {}

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def write(self, channel: ChannelRef, message: RealtimeMessage) -> None:
        entries = self._channels.get(channel, {})
        replaced = entries.get(message.message_id)
        held = self._bytes - (_size(replaced) if replaced else 0) + _size(message)
        if held > self._max_bytes:
            self.sweep_now()
            held = self._bytes - (_size(replaced) if replaced else 0) + _size(message)
        if held > self._max_bytes:
            raise BackendError(f"the memory realtime tier is full ({self._max_bytes} bytes)")
        self._bytes = held
        self._channels.setdefault(channel, {})[message.message_id] = message
        for queue in self._subscribers.get(channel, ()):
            queue.put_nowait(message)

    async def read(self, channel: ChannelRef, message_id: str) -> RealtimeMessage | None:
        message = self._channels.get(channel, {}).get(message_id)
        if message is None or message.expired(self._clock.now_ms()):
            return None
        return message

    async def read_since(
        self, channel: ChannelRef, after_id: str | None, limit: int
    ) -> list[RealtimeMessage]:
        entries = self._channels.get(channel, {})
        now = self._clock.now_ms()
        ids = sorted(i for i in entries if after_id is None or i > after_id)
        live = (entries[i] for i in ids if not entries[i].expired(now))
        return [m for _, m in zip(range(limit), live, strict=False)]

    async def delete(self, channel: ChannelRef, message_id: str) -> None:
        removed = self._channels.get(channel, {}).pop(message_id, None)
        if removed is not None:
            self._bytes -= _size(removed)

    async def subscribe(
        self, channel: ChannelRef, after_id: str | None = None
    ) -> AsyncIterator[RealtimeMessage]:
        queue: asyncio.Queue[RealtimeMessage] = asyncio.Queue()
        subscribers = self._subscribers.setdefault(channel, set())
        subscribers.add(queue)
        seen = RecentIds()
        try:
            # Registered before reading the backlog, so nothing written in between is missed.
            if after_id is not None:
                for message in await self.read_since(channel, after_id, limit=1_000_000):
                    seen.first_time(message.message_id)
                    yield message
            while True:
                message = await queue.get()
                if not message.expired(self._clock.now_ms()) and seen.first_time(
                    message.message_id
                ):
                    yield message
        finally:
            subscribers.discard(queue)
            if not subscribers:
                self._subscribers.pop(channel, None)

    async def channels(self) -> list[ChannelRef]:
        return sorted(self._channels)

    def sweep_now(self) -> int:
        """Drop what has expired by the clock now (a full tier tries this before refusing)."""
        return self._sweep(self._clock.now_ms())

    async def sweep_expired(self, now_ms: int) -> int:
        return self._sweep(now_ms)

    def _sweep(self, now_ms: int) -> int:
        self._claims = {k: v for k, v in self._claims.items() if v[1] > now_ms}
        deleted = 0
        for channel, entries in list(self._channels.items()):
            expired = [i for i, m in entries.items() if m.expired(now_ms)]
            for message_id in expired:
                self._bytes -= _size(entries.pop(message_id))
            deleted += len(expired)
            if not entries:
                del self._channels[channel]
        return deleted

    async def claim_send(self, key: SendKey, claim: SendClaim, ttl_ms: int) -> SendClaim:
        now = self._clock.now_ms()
        held = self._claims.get(key)
        if held is not None and held[1] > now:
            return held[0]
        if held is None and len(self._claims) >= self._max_claims:
            self._claims = {k: v for k, v in self._claims.items() if v[1] > now}
            if len(self._claims) >= self._max_claims:
                raise BackendError(f"the memory realtime tier holds {self._max_claims} claims")
        self._claims[key] = (claim, now + ttl_ms)
        return claim

    async def take_tokens(self, requests: Sequence[TokenRequest]) -> float:
        return self._buckets.take(requests)

    async def publish(self, workspace_id: str, event: LiveEvent) -> None:
        for queue in self._listeners.get(workspace_id, ()):
            queue.put_nowait(event)

    async def events(self, workspace_id: str) -> AsyncIterator[LiveEvent]:
        queue: asyncio.Queue[LiveEvent] = asyncio.Queue()
        listeners = self._listeners.setdefault(workspace_id, set())
        listeners.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            listeners.discard(queue)
            if not listeners:
                self._listeners.pop(workspace_id, None)


def _size(message: RealtimeMessage) -> int:
    """What an entry costs: its strings in UTF-8 plus a fixed overhead for the record."""
    return (
        len(message.text.encode("utf-8", "surrogatepass"))
        + len(message.user_name.encode("utf-8", "surrogatepass"))
        + len(message.user_id)
        + len(message.message_id)
        + 200
    )


def create(url: str, context: BackendContext) -> RealtimeTier:
    return MemoryRealtimeTier(
        context.clock,
        context.memory_max_bytes,
        context.memory_max_claims,
        context.memory_max_buckets,
    )
