"""By hand: retry one message's permanent write, and see where a message is.

"A user can retry it by hand with the same id": `retry` saves the message from this process's
retry queue if it waits there, else (given its channel) from its realtime entry, since the send
may have been answered by another process. `inspect` shows each place a message can be.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from dualwrite._calls import guarded
from dualwrite.errors import MessageNotFound, NotQueued
from dualwrite.model import ChannelRef, PermanentWrite, RealtimeMessage, SendStatus, StoredMessage
from dualwrite.ports import PermanentStore, RealtimeTier
from dualwrite.retrier import Retrier
from dualwrite.retry_queue import QueuedWrite, RetryQueue
from dualwrite.send import MessageSender

_T = TypeVar("_T")


@dataclass(frozen=True)
class Inspection:
    """One message in each place it can be."""

    message_id: str
    channel: ChannelRef | None
    realtime: RealtimeMessage | None
    permanent: StoredMessage | None
    queued: QueuedWrite | None


class ManualRecovery:
    def __init__(
        self,
        realtime: RealtimeTier,
        store: PermanentStore,
        queue: RetryQueue,
        retrier: Retrier,
        sender: MessageSender,
    ) -> None:
        self._realtime = realtime
        self._store = store
        self._queue = queue
        self._retrier = retrier
        self._sender = sender

    async def retry(self, message_id: str, channel: ChannelRef | None) -> SendStatus:
        """Save one message now: "saved", or "pending" if the store still fails (queued here).

        Without ``channel`` the message must wait in this process's queue (else `NotQueued`);
        with it, a message in neither the queue nor the store is rebuilt from its realtime
        entry (else `MessageNotFound`).
        """
        queued = await self._queue.find(message_id)
        if queued is not None and channel in (None, queued.write.channel):
            return "saved" if await self._retrier.attempt(queued) else "pending"
        if channel is None:
            raise NotQueued(f"message {message_id} is not waiting in the retry queue")
        if await self._stored(channel, message_id) is not None:
            return "saved"
        live = await self._live(channel, message_id)
        if live is None:
            raise MessageNotFound(f"message {message_id} is in neither tier")
        # Delivered long ago: if even the queue fails, the message stays where it is.
        return await self._sender.save_or_queue(
            PermanentWrite.from_realtime(channel, live), delivered_earlier=True
        )

    async def _stored(self, channel: ChannelRef, message_id: str) -> StoredMessage | None:
        return await self._bounded(
            self._store.get(channel, message_id),
            self._sender.limits.permanent_timeout_s,
            "permanent store",
        )

    async def _live(self, channel: ChannelRef, message_id: str) -> RealtimeMessage | None:
        return await self._bounded(
            self._realtime.read(channel, message_id),
            self._sender.limits.realtime_timeout_s,
            "realtime tier",
        )

    async def _bounded(self, call: Awaitable[_T], timeout_s: float, what: str) -> _T:
        return await guarded(call, timeout_s, what)

    async def inspect(self, message_id: str, channel: ChannelRef | None) -> Inspection:
        """Without ``channel``, it is found from the retry queue or by looking through the
        realtime tier's channels."""
        queued = await self._queue.find(message_id)
        if channel is not None:
            candidates = [channel]
        elif queued is not None:
            candidates = [queued.write.channel]
        else:
            candidates = await self._bounded(
                self._realtime.channels(), self._sender.limits.realtime_timeout_s, "realtime tier"
            )
        for candidate in candidates:
            live = await self._live(candidate, message_id)
            stored = await self._stored(candidate, message_id)
            if live or stored or queued or len(candidates) == 1:
                return Inspection(message_id, candidate, live, stored, queued)
        return Inspection(message_id, None, None, None, queued)
