"""Live fan-out: one realtime subscription per channel per process, however many sockets watch.

Each message is encoded once and offered to every socket's bounded queue. A socket whose queue
is full is dropped rather than allowed to slow the others; its client reconnects with the last
id it saw and is replayed what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dualwrite.logs import OutageLog
from dualwrite.model import ChannelRef, LiveEvent, RealtimeMessage
from dualwrite.server.notices import NoticeRelay, encode_notice
from dualwrite.service import DualWrite

log = logging.getLogger(__name__)

SOCKET_BUFFER = 1000


def encode(channel: ChannelRef, message: RealtimeMessage) -> str:
    return json.dumps(
        {
            "type": "message",
            "messageId": message.message_id,
            "workspaceId": channel.workspace_id,
            "channelId": channel.channel_id,
            **message.to_wire(),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


class Overflowed(Exception):
    """The listener fell too far behind and was dropped."""


@dataclass(eq=False)
class Listener:
    frames: asyncio.Queue[tuple[str, str] | None] = field(
        default_factory=lambda: asyncio.Queue(SOCKET_BUFFER)
    )

    def offer(self, message_id: str, frame: str) -> None:
        try:
            self.frames.put_nowait((message_id, frame))
        except asyncio.QueueFull:
            # Make room for the end marker: the reader stops at it (Overflowed).
            with contextlib.suppress(asyncio.QueueFull):
                self.frames.get_nowait()
                self.frames.put_nowait(None)


@dataclass(eq=False)
class _Channel:
    listeners: set[Listener] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class LiveHub:
    def __init__(self, dw: DualWrite) -> None:
        self._dw = dw
        self._channels: dict[ChannelRef, _Channel] = {}
        # Shared by every channel's subscription: a realtime tier down is one outage.
        self._outage = OutageLog(
            log, "live subscription (resubscribing every second)", dw.settings.outage_reminder_s
        )
        self._notices = NoticeRelay(dw, self._offer_notice)

    def _offer_notice(self, workspace_id: str, event: LiveEvent) -> None:
        """A "saved" notice to the sockets of its channel, a "channel" one to the workspace's."""
        frame = encode_notice(workspace_id, event)
        for channel, entry in list(self._channels.items()):
            if channel.workspace_id != workspace_id:
                continue
            if event.kind == "saved" and channel.channel_id != event.channel_id:
                continue
            for listener in list(entry.listeners):
                listener.offer("", frame)  # "": no message id, never taken for a replayed one

    @contextlib.asynccontextmanager
    async def listen(
        self, channel: ChannelRef, after_id: str | None
    ) -> AsyncIterator[AsyncIterator[str]]:
        """Frames of the channel: first what came after ``after_id``, then live ones, once each."""
        listener = Listener()
        entry = self._channels.setdefault(channel, _Channel())
        entry.listeners.add(listener)
        if entry.task is None:
            entry.task = asyncio.create_task(self._pump(channel, entry))
        try:
            async with self._notices.watching(channel.workspace_id):
                yield self._frames(channel, listener, after_id)
        finally:
            entry.listeners.discard(listener)
            if not entry.listeners and entry.task is not None:
                entry.task.cancel()
                self._channels.pop(channel, None)

    async def _frames(
        self, channel: ChannelRef, listener: Listener, after_id: str | None
    ) -> AsyncIterator[str]:
        replayed: set[str] = set()
        if after_id is not None:
            # Joined the hub before reading the backlog: nothing falls between the two.
            for message in await self._dw.replay(
                channel.workspace_id, channel.channel_id, after_id, 10_000
            ):
                replayed.add(message.message_id)
                yield encode(channel, message)
        while True:
            item = await listener.frames.get()
            if item is None:
                raise Overflowed()
            message_id, frame = item
            if message_id not in replayed:
                yield frame

    async def _pump(self, channel: ChannelRef, entry: _Channel) -> None:
        last_id: str | None = None
        while True:
            try:
                # After a failure, resume from the last id so that nothing is skipped.
                async for message in self._dw.subscribe(
                    channel.workspace_id, channel.channel_id, last_id
                ):
                    last_id = message.message_id
                    self._outage.succeeded()
                    frame = encode(channel, message)
                    for listener in list(entry.listeners):
                        listener.offer(message.message_id, frame)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._outage.failed(error)
                await asyncio.sleep(1)
