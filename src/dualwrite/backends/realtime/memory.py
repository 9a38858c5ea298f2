"""In-process realtime tier: the embedded default, and the fake the unit tests run on.

It reaches subscribers of this process only; use Redis or Firebase to share a tier.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from dualwrite.backends import BackendContext
from dualwrite.backends._recent import RecentIds
from dualwrite.clock import Clock
from dualwrite.model import ChannelRef, LiveEvent, RealtimeMessage
from dualwrite.ports import RealtimeTier, SendClaim, SendKey


class MemoryRealtimeTier:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._channels: dict[ChannelRef, dict[str, RealtimeMessage]] = {}
        self._subscribers: dict[ChannelRef, set[asyncio.Queue[RealtimeMessage]]] = {}
        self._claims: dict[SendKey, tuple[SendClaim, int]] = {}
        self._listeners: dict[str, set[asyncio.Queue[LiveEvent]]] = {}

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def write(self, channel: ChannelRef, message: RealtimeMessage) -> None:
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
        self._channels.get(channel, {}).pop(message_id, None)

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

    async def sweep_expired(self, now_ms: int) -> int:
        deleted = 0
        for channel, entries in list(self._channels.items()):
            expired = [i for i, m in entries.items() if m.expired(now_ms)]
            for message_id in expired:
                del entries[message_id]
            deleted += len(expired)
            if not entries:
                del self._channels[channel]
        self._claims = {k: v for k, v in self._claims.items() if v[1] > now_ms}
        return deleted

    async def claim_send(self, key: SendKey, claim: SendClaim, ttl_ms: int) -> SendClaim:
        now = self._clock.now_ms()
        held = self._claims.get(key)
        if held is not None and held[1] > now:
            return held[0]
        self._claims[key] = (claim, now + ttl_ms)
        return claim

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


def create(url: str, context: BackendContext) -> RealtimeTier:
    return MemoryRealtimeTier(context.clock)
