"""In-process permanent store: the fake the unit tests run on. Nothing survives the process."""

from __future__ import annotations

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

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def save(self, write: PermanentWrite) -> None:
        records = self._channels.setdefault(write.channel, {})
        if write.message_id in records:
            return
        now = self._clock.now_ms()
        records[write.message_id] = StoredMessage(
            channel=write.channel,
            message_id=write.message_id,
            user_id=write.user_id,
            user_name=write.user_name,
            text=write.text,
            timestamp=write.sent_at if write.keep_sent_time else now,
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

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        ordered = sorted(
            self._channels.get(channel, {}).values(),
            key=lambda m: (m.timestamp, m.message_id),
            reverse=True,
        )
        if before is not None:
            bound = parse_history_cursor(before)
            ordered = [m for m in ordered if (m.timestamp, m.message_id) < bound]
        return HistoryPage.from_candidates(ordered[: limit + 1], limit)

    async def add_channel(self, channel: ChannelRef) -> None:
        self._added.add(channel)

    async def channels(self, workspace_id: str) -> list[str]:
        held = {c for c, records in self._channels.items() if records}
        return sorted(c.channel_id for c in held | self._added if c.workspace_id == workspace_id)


def create(url: str, context: BackendContext) -> PermanentStore:
    return MemoryPermanentStore(context.clock)
