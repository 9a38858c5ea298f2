"""Live notices of a workspace ("saved", "channel") for its sockets, in every process.

One `events` subscription of the realtime tier per workspace per process, open while any
socket of the workspace is; each notice becomes one frame, handed to the sockets it concerns:
- `{"type": "saved", "messageId", "workspaceId", "channelId"}` to the sockets of that channel,
  when a queued permanent write lands (retrier, manual retry or reconciler, in any process);
- `{"type": "channels", "workspaceId", "added": [channelId]}` to every socket of the workspace,
  when a channel is created.
Notices are best effort: a socket that was away learns the same from history and the list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dualwrite.logs import OutageLog
from dualwrite.model import LiveEvent
from dualwrite.service import DualWrite

log = logging.getLogger(__name__)


def encode_notice(workspace_id: str, event: LiveEvent) -> str:
    """The socket frame of a notice."""
    frame: dict[str, Any]
    if event.kind == "saved":
        frame = {
            "type": "saved",
            "messageId": event.message_id,
            "workspaceId": workspace_id,
            "channelId": event.channel_id,
        }
    else:
        frame = {"type": "channels", "workspaceId": workspace_id, "added": [event.channel_id]}
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


NoticeSink = Callable[[str], None]
"""Takes one notice frame for one socket (without waiting: notices are best effort)."""


@dataclass(eq=False)
class _Watch:
    sockets: dict[NoticeSink, str] = field(default_factory=dict)
    """Each socket's sink, and the channel it watches."""
    by_channel: dict[str, dict[NoticeSink, None]] = field(default_factory=dict)
    """The same sinks by channel: a "saved" notice goes to its channel's sockets without a
    pass over every socket of the workspace."""
    task: asyncio.Task[None] | None = None

    def add(self, sink: NoticeSink, channel_id: str) -> None:
        self.sockets[sink] = channel_id
        self.by_channel.setdefault(channel_id, {})[sink] = None

    def remove(self, sink: NoticeSink) -> None:
        channel_id = self.sockets.pop(sink, None)
        if channel_id is None:
            return
        sinks = self.by_channel.get(channel_id)
        if sinks is not None:
            sinks.pop(sink, None)
            if not sinks:
                del self.by_channel[channel_id]


@dataclass(eq=False)
class NoticeRelay:
    """Subscribes to a workspace's notices while a socket of it is open; hands each notice to
    the sockets it concerns."""

    dw: DualWrite
    _watches: dict[str, _Watch] = field(default_factory=dict)

    def watching(
        self, workspace_id: str, channel_id: str, sink: NoticeSink
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Hand ``sink`` the notices its socket should get while the block runs."""
        return _Watching(self, workspace_id, channel_id, sink)

    def _add(self, workspace_id: str, channel_id: str, sink: NoticeSink) -> None:
        watch = self._watches.setdefault(workspace_id, _Watch())
        watch.add(sink, channel_id)
        if watch.task is None:
            watch.task = asyncio.create_task(self._pump(workspace_id))

    def _remove(self, workspace_id: str, sink: NoticeSink) -> None:
        watch = self._watches.get(workspace_id)
        if watch is None:
            return
        watch.remove(sink)
        if not watch.sockets and watch.task is not None:
            watch.task.cancel()
            self._watches.pop(workspace_id, None)

    def _deliver(self, workspace_id: str, event: LiveEvent) -> None:
        """A "saved" notice to the sockets of its channel, a "channel" one to the workspace's."""
        watch = self._watches.get(workspace_id)
        if watch is None:
            return
        frame = encode_notice(workspace_id, event)
        if event.kind == "saved":
            sinks = list(watch.by_channel.get(event.channel_id, ()))
        else:
            sinks = list(watch.sockets)
        for sink in sinks:
            sink(frame)

    async def _pump(self, workspace_id: str) -> None:
        # While the tier is down this fails every second or so: a line when it starts, a
        # reminder now and then, a line when it is back; not a traceback a second.
        outage = OutageLog(
            log, f"notices of workspace {workspace_id}", self.dw.settings.outage_reminder_s
        )
        while True:
            try:
                async for event in self.dw.events(workspace_id):
                    outage.succeeded()
                    self._deliver(workspace_id, event)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                outage.failed(error)
                await asyncio.sleep(1)


class _Watching:
    """`NoticeRelay.watching`: a small object per socket, not a suspended generator."""

    __slots__ = ("_channel_id", "_relay", "_sink", "_workspace_id")

    def __init__(
        self, relay: NoticeRelay, workspace_id: str, channel_id: str, sink: NoticeSink
    ) -> None:
        self._relay = relay
        self._workspace_id = workspace_id
        self._channel_id = channel_id
        self._sink = sink

    async def __aenter__(self) -> None:
        self._relay._add(self._workspace_id, self._channel_id, self._sink)

    async def __aexit__(self, *exc_info: object) -> None:
        self._relay._remove(self._workspace_id, self._sink)
