"""The reconciler: closes the gap the story leaves open.

If a process dies after the realtime write and before the permanent write or its queue entry,
the message was delivered but would vanish with its TTL. Every realtime write also marks its
message "unconfirmed" in the tier, and a save confirmed by the send clears the mark, so the
marks are what may be unsaved. A round reads only the marks older than a grace period, a batch
at a time; checks each batch in the store with one lookup; clears the marks of what is saved;
and saves, with its original send time, what is neither saved nor queued here. A round thus
costs what is unsaved, not what the tier holds.

Saves are idempotent inserts and a mark is cleared only once the store holds its message, so
every process may run it at once: the worst case is a little repeated work, never a second row
nor a lost message. Every call is bounded; a call that fails costs its batch (counted in
`failed`, retried next round), never the round; a store that hangs ends the round early (it
would hang on every batch), and the next round tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dualwrite._calls import bounded, guarded
from dualwrite.clock import Clock
from dualwrite.errors import BackendTimeout
from dualwrite.model import ChannelRef, PermanentWrite, RealtimeMessage
from dualwrite.ports import PermanentStore, RealtimeTier
from dualwrite.retry_queue import RetryQueue

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    """What one round did: channels holding old marks, marks read (`scanned`), messages
    saved, and failures."""

    channels: int = 0
    scanned: int = 0
    persisted: int = 0
    failed: int = 0


class Reconciler:
    """Saves delivered messages that no send saved or queued."""

    def __init__(
        self,
        realtime: RealtimeTier,
        store: PermanentStore,
        queue: RetryQueue,
        clock: Clock,
        *,
        realtime_timeout_s: float,
        permanent_timeout_s: float,
        grace_ms: int,
        on_saved: Callable[[ChannelRef, str], Awaitable[None]],
        batch: int,
    ) -> None:
        self._realtime = realtime
        self._store = store
        self._queue = queue
        self._clock = clock
        self._realtime_timeout_s = realtime_timeout_s
        self._permanent_timeout_s = permanent_timeout_s
        self.grace_ms = grace_ms
        self._on_saved = on_saved
        self._batch = batch

    async def run_once(self) -> ReconcileReport:
        """One round over every channel; raises only if the channel list cannot be read."""
        report = ReconcileReport()
        cutoff = self._clock.now_ms() - self.grace_ms
        channels = await guarded(
            self._realtime.unconfirmed_channels(cutoff), self._realtime_timeout_s, "realtime tier"
        )
        for channel in channels:
            report.channels += 1
            after: tuple[int, str] | None = None
            while True:
                try:
                    marks = await bounded(
                        self._realtime.unconfirmed(channel, after, cutoff, self._batch),
                        self._realtime_timeout_s,
                        "realtime tier",
                    )
                except Exception as error:
                    report.failed += 1
                    log.warning("reconcile could not read %s: %r", channel, error)
                    break
                if not marks:
                    break
                report.scanned += len(marks)
                try:
                    await self._check(channel, marks, report)
                except BackendTimeout as hung:
                    # A store that hangs would hang on every batch: end the round, and let
                    # the next one try again, rather than wait out each batch in turn.
                    log.info("reconcile round ended early: %s", hung)
                    return report
                if len(marks) < self._batch:
                    break
                after = (marks[-1].timestamp, marks[-1].message_id)
        return report

    async def _check(
        self, channel: ChannelRef, marks: list[RealtimeMessage], report: ReconcileReport
    ) -> None:
        """Clear the marks of saved messages; save the others unless this process queued them."""
        try:
            saved = await bounded(
                self._store.get_many(channel, [m.message_id for m in marks]),
                self._permanent_timeout_s,
                "permanent store",
            )
        except BackendTimeout:
            report.failed += len(marks)
            raise
        except Exception as error:
            report.failed += len(marks)
            log.info("reconcile lookup failed: channel=%s error=%r", channel, error)
            return
        confirmed = [m.message_id for m in marks if m.message_id in saved]
        orphans = [
            m
            for m in marks
            if m.message_id not in saved and await self._queue.find(m.message_id) is None
        ]  # a message queued here belongs to the retrier
        confirmed += await self._save_all(channel, orphans, report)
        if confirmed:
            try:
                await bounded(
                    self._realtime.confirm(channel, confirmed),
                    self._realtime_timeout_s,
                    "realtime tier",
                )
            except Exception as error:  # the marks stay: the next round clears them
                log.warning("reconcile could not clear marks: %r", error)

    async def _save_all(
        self, channel: ChannelRef, orphans: list[RealtimeMessage], report: ReconcileReport
    ) -> list[str]:
        """Save ``orphans`` with their send times in one round trip (one by one if that
        fails, to learn which); returns the ids saved."""
        if not orphans:
            return []
        writes = [PermanentWrite.from_realtime(channel, m) for m in orphans]
        try:
            await bounded(
                self._store.save_many(writes), self._permanent_timeout_s, "permanent store"
            )
            done = writes
        except BackendTimeout:
            report.failed += len(writes)
            raise
        except Exception:
            done = [w for w in writes if await self._save_one(w, report)]
        for write in done:
            log.warning(
                "reconciled a delivered but unsaved message: message_id=%s "
                "workspace_id=%s channel_id=%s",
                write.message_id,
                channel.workspace_id,
                channel.channel_id,
            )
            await self._on_saved(channel, write.message_id)
        report.persisted += len(done)
        return [w.message_id for w in done]

    async def _save_one(self, write: PermanentWrite, report: ReconcileReport) -> bool:
        try:
            await bounded(self._store.save(write), self._permanent_timeout_s, "permanent store")
        except Exception as error:
            report.failed += 1
            log.warning("reconcile failed: message_id=%s error=%r", write.message_id, error)
            return False
        return True
