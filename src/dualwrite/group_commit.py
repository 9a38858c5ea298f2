"""Group commit for permanent stores: concurrent saves share one round trip.

`GroupCommitStore` wraps any `PermanentStore`: each `save` still returns (or raises) its own
outcome, but concurrent ones are written by one `save_many` (a multi-row statement or a batch).
"""

from __future__ import annotations

from collections.abc import Sequence

from dualwrite._coalesce import Coalescer
from dualwrite.model import ChannelRef, HistoryPage, PermanentWrite, StoredMessage
from dualwrite.ports import PermanentStore


class GroupCommitStore:
    def __init__(
        self,
        inner: PermanentStore,
        *,
        max_batch: int,
        max_in_flight: int,
        max_wait_s: float,
    ) -> None:
        self.inner = inner
        self._coalescer: Coalescer[PermanentWrite] = Coalescer(
            inner.save_many,
            inner.save,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
            max_wait_s=max_wait_s,
        )

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def save(self, write: PermanentWrite) -> None:
        await self._coalescer.submit(write)

    async def save_many(self, writes: Sequence[PermanentWrite]) -> None:
        await self.inner.save_many(writes)

    async def get(self, channel: ChannelRef, message_id: str) -> StoredMessage | None:
        return await self.inner.get(channel, message_id)

    async def find(self, message_id: str) -> StoredMessage | None:
        return await self.inner.find(message_id)

    async def get_many(
        self, channel: ChannelRef, message_ids: Sequence[str]
    ) -> dict[str, StoredMessage]:
        return await self.inner.get_many(channel, message_ids)

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        return await self.inner.history(channel, before, limit)

    async def add_channel(self, channel: ChannelRef) -> None:
        await self.inner.add_channel(channel)

    async def channels(self, workspace_id: str) -> list[str]:
        return await self.inner.channels(workspace_id)
