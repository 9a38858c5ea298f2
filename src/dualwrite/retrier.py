"""The background retrier: drains the retry queue into the permanent store.

An entry leaves the queue only after its write succeeded. Failed attempts are rescheduled with
capped exponential backoff and jitter, so a recovering store is not stampeded.

Retriers of several processes may share one queue file (`serve --workers N`): each round
claims its due entries for a lease (`RetryQueue.claim`), so that they drain different entries.
Correctness does not rest on the lease: a write is keyed by its message id and idempotent, a
removal or reschedule of an entry already gone does nothing, so an entry attempted twice (its
lease ran out mid-round) is still saved once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dualwrite import metrics
from dualwrite._calls import bounded
from dualwrite.clock import Clock
from dualwrite.logs import OutageLog
from dualwrite.model import ChannelRef
from dualwrite.ports import PermanentStore
from dualwrite.retry_queue import QueuedWrite, RetryQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1: uniform in [c/2, c] with c = min(cap, base * 2**n)."""

    base_s: float
    cap_s: float

    def delay_ms(self, attempts: int, rng: random.Random) -> int:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(attempts, 32))
        return int(1000 * rng.uniform(ceiling / 2, ceiling))


@dataclass
class RetryReport:
    saved: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Retrier:
    def __init__(
        self,
        queue: RetryQueue,
        store: PermanentStore,
        clock: Clock,
        *,
        timeout_s: float,
        lease_s: float,
        backoff: Backoff,
        remind_every_s: float,
        on_saved: Callable[[ChannelRef, str], Awaitable[None]],
        batch_size: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        self._queue = queue
        self._store = store
        self._clock = clock
        self._timeout_s = timeout_s
        self._lease_ms = int(lease_s * 1000)
        self._backoff = backoff
        self._on_saved = on_saved
        self._batch_size = batch_size
        self._rng = rng or random.Random()
        # While the store is down every attempt fails: one line, then reminders.
        self._outage = OutageLog(log, "retry of queued writes", remind_every_s)

    async def attempt(self, entry: QueuedWrite) -> bool:
        """Try one queued write now; True if it is saved (and gone from the queue)."""
        try:
            await bounded(self._store.save(entry.write), self._timeout_s, "permanent store")
        except Exception as exc:
            delay = self._backoff.delay_ms(entry.attempts + 1, self._rng)
            await self._queue.reschedule(entry, self._clock.now_ms() + delay, repr(exc))
            metrics.RETRIES.labels("failed").inc()
            self._outage.failed(exc)
            log.debug(
                "retry failed: message_id=%s attempts=%d next_in_ms=%d error=%r",
                entry.message_id,
                entry.attempts + 1,
                delay,
                exc,
            )
            return False
        await self._queue.remove(entry.write.channel, entry.message_id)
        metrics.RETRIES.labels("saved").inc()
        self._outage.succeeded()
        log.info("retry saved: message_id=%s attempts=%d", entry.message_id, entry.attempts + 1)
        await self._on_saved(entry.write.channel, entry.message_id)
        return True

    async def retry_all(self) -> RetryReport:
        """Manual retry of every waiting write, due or not, oldest first."""
        return await self._drain(await self._queue.entries(limit=1_000_000), stop_on_failure=False)

    async def retry_due(self) -> RetryReport:
        """One background round: the due entries, stopping at the first failure.

        Stopping early keeps a dead store from costing one timeout per queued entry; the failed
        entry moves back in the queue, so one bad record cannot starve the others. The round's
        entries are claimed for ``lease_s`` (other processes sharing the queue skip them); those
        left unattempted by a stop are given back at once.
        """
        now = self._clock.now_ms()
        lease_until = now + self._lease_ms
        due = await self._queue.claim(now, self._batch_size, lease_until)
        return await self._drain(due, stop_on_failure=True, lease_until=lease_until)

    async def _drain(
        self,
        entries: list[QueuedWrite],
        *,
        stop_on_failure: bool,
        lease_until: int | None = None,
    ) -> RetryReport:
        report = RetryReport()
        for index, entry in enumerate(entries):
            if await self.attempt(entry):
                report.saved.append(entry.message_id)
            else:
                report.failed.append(entry.message_id)
                if stop_on_failure:
                    if lease_until is not None:
                        await self._queue.release(entries[index + 1 :], lease_until)
                    break
        metrics.QUEUE_DEPTH.set(await self._queue.count())
        return report

    async def run(self, poll_interval_s: float = 1.0) -> None:
        """Retry due entries forever; cancel the task to stop."""
        while True:
            try:
                report = await self.retry_due()
            except Exception as error:
                self._outage.failed(error)
                report = RetryReport()
            # A full batch saved means more may be due right away.
            if len(report.saved) < self._batch_size:
                await asyncio.sleep(poll_interval_s)
