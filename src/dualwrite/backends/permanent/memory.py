"""In-process permanent store: the fake the unit tests run on. Nothing survives the process."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from dualwrite.backends import BackendContext
from dualwrite.clock import Clock
from dualwrite.model import (
    ChannelRef,
    HistoryPage,
    PermanentWrite,
    StoredMessage,
    parse_history_cursor,
)
from dualwrite.ports import PermanentStore


class MemoryPermanentStore:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._channels: dict[ChannelRef, dict[str, StoredMessage]] = {}
        self._added: set[ChannelRef] = set()
        # Per channel, (timestamp, id) kept sorted: a page is found by bisection, as an index.
        self._order: dict[ChannelRef, list[tuple[int, str]]] = {}

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def save(self, write: PermanentWrite) -> None:
        records = self._channels.setdefault(write.channel, {})
        if write.message_id in records:
            return
        now = self._clock.now_ms()
        timestamp = write.sent_at if write.keep_sent_time else now
        bisect.insort(self._order.setdefault(write.channel, []), (timestamp, write.message_id))
        records[write.message_id] = StoredMessage(
            channel=write.channel,
            message_id=write.message_id,
            user_id=write.user_id,
            user_name=write.user_name,
            text=write.text,
            timestamp=timestamp,
            created_at=now,
        )

    async def save_many(self, writes: Sequence[PermanentWrite]) -> None:
        for write in writes:
            await self.save(write)

    async def get(self, channel: ChannelRef, message_id: str) -> StoredMessage | None:
        return self._channels.get(channel, {}).get(message_id)

    async def find(self, message_id: str) -> StoredMessage | None:
        for records in self._channels.values():
            if message_id in records:
                return records[message_id]
        return None

    async def get_many(
        self, channel: ChannelRef, message_ids: Sequence[str]
    ) -> dict[str, StoredMessage]:
        records = self._channels.get(channel, {})
        return {i: records[i] for i in message_ids if i in records}

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        keys = self._order.get(channel, [])
        end = (
            len(keys) if before is None else bisect.bisect_left(keys, parse_history_cursor(before))
        )
        records = self._channels[channel] if keys else {}
        newest_first = [records[i] for _, i in reversed(keys[max(0, end - limit - 1) : end])]
        return HistoryPage.from_candidates(newest_first, limit)

    async def add_channel(self, channel: ChannelRef) -> None:
        self._added.add(channel)

    async def channels(self, workspace_id: str) -> list[str]:
        held = {c for c, records in self._channels.items() if records}
        return sorted(c.channel_id for c in held | self._added if c.workspace_id == workspace_id)


def create(url: str, context: BackendContext) -> PermanentStore:
    return MemoryPermanentStore(context.clock)
