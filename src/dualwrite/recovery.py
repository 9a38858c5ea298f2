"""By hand: retry one message's permanent write, and see where a message is.

"A user can retry it by hand with the same id": `retry` saves the message from this process's
retry queue if it waits there, else (given its channel) from its realtime entry, since the send
may have been answered by another process. `inspect` shows each place a message can be.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
        on_saved: Callable[[ChannelRef, str], Awaitable[None]],
    ) -> None:
        self._realtime = realtime
        self._store = store
        self._queue = queue
        self._retrier = retrier
        self._sender = sender
        self._on_saved = on_saved

    async def retry(self, message_id: str, channel: ChannelRef | None) -> SendStatus:
        """Save one message now: "saved", or "pending" if the store still fails (queued here).

        Without ``channel`` the message must wait in this process's queue or be saved already
        (else `NotQueued`); with it, a message in neither the queue nor the store is rebuilt
        from its realtime entry (else `MessageNotFound`).
        """
        queued = await self._queue.find(message_id)
        if queued is not None and channel in (None, queued.write.channel):
            return "saved" if await self._retrier.attempt(queued) else "pending"
        if channel is None:
            found = await self._bounded(
                self._store.find(message_id),
                self._sender.limits.permanent_timeout_s,
                "permanent store",
            )
            if found is None:
                raise NotQueued(
                    f"message {message_id} is neither waiting in the retry queue nor saved; "
                    "give its workspace and channel to save it from its realtime entry"
                )
            channel = found.channel
        # Saved already (by another process, say): say so again, for sockets that missed it.
        if await self._stored(channel, message_id) is not None:
            await self._on_saved(channel, message_id)
            return "saved"
        live = await self._live(channel, message_id)
        if live is None:
            raise MessageNotFound(f"message {message_id} is in neither tier")
        # Delivered long ago: if even the queue fails, the message stays where it is.
        status = await self._sender.save_or_queue(
            PermanentWrite.from_realtime(channel, live), delivered_earlier=True
        )
        if status == "saved":
            await self._on_saved(channel, message_id)
        return status

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
        """Without ``channel``, the message's channel is found from the retry queue, else by
        its id alone in the permanent store, else by reading each of the realtime tier's
        channels. A store that cannot answer raises: a saved message is never shown absent."""
        queued = await self._queue.find(message_id)
        stored = None
        if channel is None and queued is not None:
            channel = queued.write.channel
        if channel is None:
            stored = await self._bounded(
                self._store.find(message_id),
                self._sender.limits.permanent_timeout_s,
                "permanent store",
            )
            channel = stored.channel if stored is not None else None
        if channel is None:
            # Not saved: only the realtime tier can still hold it.
            candidates = await self._bounded(
                self._realtime.channels(), self._sender.limits.realtime_timeout_s, "realtime tier"
            )
            for candidate in candidates:
                live = await self._live(candidate, message_id)
                if live is not None:
                    return Inspection(message_id, candidate, live, None, queued)
            return Inspection(message_id, None, None, None, queued)
        live = await self._live(channel, message_id)
        if stored is None:
            stored = await self._stored(channel, message_id)
        return Inspection(message_id, channel, live, stored, queued)
