"""The reconciler: closes the gap the story leaves open.

If a process dies after the realtime write and before the permanent write or its queue entry,
the message was delivered but would vanish with its TTL. The reconciler scans the realtime tier
for messages older than a grace period that are neither saved nor queued here, and saves them
with their original send time. Saves are idempotent inserts, so every process may run it at
once: the worst case is a little repeated work, never a second row.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dualwrite._calls import bounded
from dualwrite.clock import Clock
from dualwrite.model import ChannelRef, PermanentWrite
from dualwrite.ports import PermanentStore, RealtimeTier
from dualwrite.retry_queue import RetryQueue

log = logging.getLogger(__name__)

_SCAN_LIMIT = 100_000


@dataclass
class ReconcileReport:
    channels: int = 0
    scanned: int = 0
    persisted: int = 0
    failed: int = 0


class Reconciler:
    def __init__(
        self,
        realtime: RealtimeTier,
        store: PermanentStore,
        queue: RetryQueue,
        clock: Clock,
        *,
        timeout_s: float,
        grace_ms: int,
        on_saved: Callable[[ChannelRef, str], Awaitable[None]],
    ) -> None:
        self._realtime = realtime
        self._store = store
        self._queue = queue
        self._clock = clock
        self._timeout_s = timeout_s
        self.grace_ms = grace_ms
        self._on_saved = on_saved

    async def run_once(self) -> ReconcileReport:
        report = ReconcileReport()
        cutoff = self._clock.now_ms() - self.grace_ms
        for channel in await self._realtime.channels():
            report.channels += 1
            for message in await self._realtime.read_since(channel, None, _SCAN_LIMIT):
                if message.timestamp > cutoff:
                    continue  # young: its own send may still be on its way
                report.scanned += 1
                if await self._queue.find(message.message_id) is not None:
                    continue  # the retrier owns it
                if await self._store.get(channel, message.message_id) is not None:
                    continue
                write = PermanentWrite.from_realtime(channel, message)
                try:
                    await bounded(self._store.save(write), self._timeout_s, "permanent store")
                except Exception as error:
                    report.failed += 1
                    log.warning(
                        "reconcile failed: message_id=%s error=%r", message.message_id, error
                    )
                    continue
                report.persisted += 1
                await self._on_saved(channel, message.message_id)
                log.warning(
                    "reconciled a delivered but unsaved message: message_id=%s "
                    "workspace_id=%s channel_id=%s",
                    message.message_id,
                    channel.workspace_id,
                    channel.channel_id,
                )
        return report
