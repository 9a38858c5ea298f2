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
from collections.abc import AsyncIterator, Callable
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
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class NoticeRelay:
    """Subscribes to a workspace's notices while a socket of it is open; hands each notice to
    the sockets it concerns."""

    dw: DualWrite
    _watches: dict[str, _Watch] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def watching(
        self, workspace_id: str, channel_id: str, sink: NoticeSink
    ) -> AsyncIterator[None]:
        watch = self._watches.setdefault(workspace_id, _Watch())
        watch.sockets[sink] = channel_id
        if watch.task is None:
            watch.task = asyncio.create_task(self._pump(workspace_id))
        try:
            yield
        finally:
            watch.sockets.pop(sink, None)
            if not watch.sockets and watch.task is not None:
                watch.task.cancel()
                self._watches.pop(workspace_id, None)

    def _deliver(self, workspace_id: str, event: LiveEvent) -> None:
        """A "saved" notice to the sockets of its channel, a "channel" one to the workspace's."""
        watch = self._watches.get(workspace_id)
        if watch is None:
            return
        frame = encode_notice(workspace_id, event)
        for sink, channel_id in list(watch.sockets.items()):
            if event.kind == "saved" and channel_id != event.channel_id:
                continue
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
