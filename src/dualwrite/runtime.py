"""One place that builds a configured `dualwrite`: the server and the CLI both call it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from dualwrite import metrics
from dualwrite._calls import bounded
from dualwrite.backends import BackendContext, create_permanent_store, create_realtime_tier
from dualwrite.clock import Clock, SystemClock
from dualwrite.errors import BackendError, InvalidInput, MessageNotFound
from dualwrite.faults import Faults, FaultyPermanentStore, FaultyRealtimeTier
from dualwrite.group_commit import GroupCommitStore
from dualwrite.ids import time_prefix
from dualwrite.model import (
    ChannelHistory,
    ChannelMessage,
    ChannelRef,
    PermanentWrite,
    RealtimeMessage,
    SendResult,
    SendStatus,
    StoredMessage,
    User,
    history_cursor,
    parse_history_cursor,
)
from dualwrite.ports import PermanentStore, RealtimeTier
from dualwrite.reconciler import Reconciler, ReconcileReport
from dualwrite.reporting import init_sentry
from dualwrite.retrier import Backoff, Retrier, RetryReport
from dualwrite.retry_queue import QueuedWrite, RetryQueue
from dualwrite.send import DualWriter, SendLimits
from dualwrite.settings import Settings
from dualwrite.validation import check_channel, check_id

log = logging.getLogger("dualwrite.runtime")

_REALTIME_SCAN_LIMIT = 10_000


@dataclass(frozen=True)
class Inspection:
    """One message in each place it can be: the specification's "console" check."""

    message_id: str
    channel: ChannelRef | None
    realtime: RealtimeMessage | None
    permanent: StoredMessage | None
    queued: QueuedWrite | None


class DualWrite:
    """A running `dualwrite`: send, read, retry. Get one from `open_dualwrite`."""

    def __init__(
        self,
        settings: Settings,
        realtime: RealtimeTier,
        store: PermanentStore,
        queue: RetryQueue,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.realtime = realtime
        self.store = store
        self.queue = queue
        self.clock = clock
        self.sender = DualWriter(
            realtime,
            store,
            queue,
            clock,
            SendLimits(
                realtime_timeout_s=settings.realtime_timeout_s,
                permanent_timeout_s=settings.permanent_timeout_s,
                max_text_chars=settings.max_text_chars,
            ),
        )
        self.reconciler = Reconciler(
            realtime,
            store,
            queue,
            clock,
            timeout_s=settings.permanent_timeout_s,
            grace_ms=int(settings.reconcile_grace_s * 1000),
        )
        self.retrier = Retrier(
            queue,
            store,
            clock,
            timeout_s=settings.permanent_timeout_s,
            backoff=Backoff(settings.retry_base_s, settings.retry_cap_s),
        )

    async def send_message(
        self,
        workspace_id: str,
        channel_id: str,
        text: str,
        user: User,
        *,
        client_message_id: str | None = None,
    ) -> SendResult:
        """Send a message: see `dualwrite.send`. Returns its id and "saved" or "pending"."""
        return await self.sender.send_message(
            workspace_id, channel_id, text, user, client_message_id=client_message_id
        )

    async def retry(self, message_id: str) -> bool:
        """Manual retry of one queued permanent write (same id); True once it is saved."""
        check_id("messageId", message_id)
        return await self.retrier.retry_message(message_id)

    async def persist(self, workspace_id: str, channel_id: str, message_id: str) -> SendStatus:
        """Manual retry, from any process: make sure the message is in the permanent store.

        Uses this process's queue entry if it has one; otherwise rebuilds the write from the
        realtime record (the send may have been answered by another process). Returns "saved",
        or "pending" if the store still fails (the write is then queued here). Raises
        `MessageNotFound` if neither tier nor the queue holds the message.
        """
        channel = check_channel(workspace_id, channel_id)
        check_id("messageId", message_id)
        queued = await self.queue.find(message_id)
        if queued is not None and queued.write.channel == channel:
            return "saved" if await self.retrier.attempt(queued) else "pending"
        if await self.store.get(channel, message_id) is not None:
            return "saved"
        live = await self.realtime.read(channel, message_id)
        if live is None:
            raise MessageNotFound(f"message {message_id} is in neither tier")
        return await self.sender.save_or_queue(PermanentWrite.from_realtime(channel, live))

    async def retry_all(self) -> RetryReport:
        """Manual retry of every queued permanent write."""
        return await self.retrier.retry_all()

    async def pending(self, user_id: str | None = None, limit: int = 1000) -> list[QueuedWrite]:
        """Writes waiting in the retry queue, optionally one user's only."""
        return await self.queue.entries(limit=limit, user_id=user_id)

    async def history(
        self, workspace_id: str, channel_id: str, before: str | None = None, limit: int = 50
    ) -> ChannelHistory:
        """A page of the channel, newest first: the permanent store merged with realtime
        entries not saved yet, each message once.

        Raises `BackendError` if a tier does not answer (within its timeout).
        """
        channel = check_channel(workspace_id, channel_id)
        try:
            return await bounded(
                self._merged_history(channel, before, limit),
                self.settings.permanent_timeout_s + self.settings.realtime_timeout_s,
                "history",
            )
        except (InvalidInput, BackendError):
            raise
        except Exception as error:
            raise BackendError(f"history is unavailable: {error!r}") from error

    async def _merged_history(
        self, channel: ChannelRef, before: str | None, limit: int
    ) -> ChannelHistory:
        bound = parse_history_cursor(before) if before is not None else None
        page = await self.store.history(channel, before, limit)
        merged = [ChannelMessage.from_stored(m) for m in page.messages]
        shown = {m.message_id for m in merged}
        # Below a full page's oldest entry lies the next page's business.
        floor = merged[-1].sort_key if page.next_before and merged else None
        # Ids begin with their send time: start the realtime scan a minute (for clock skew
        # between tiers) below the page's floor instead of reading the channel's whole hour.
        scan_from = time_prefix(max(0, floor[0] - 60_000)) if floor else None
        for entry in await self.realtime.read_since(channel, scan_from, _REALTIME_SCAN_LIMIT):
            candidate = ChannelMessage.from_realtime(channel, entry)
            if candidate.message_id in shown:
                continue
            if (bound and candidate.sort_key >= bound) or (floor and candidate.sort_key < floor):
                continue
            if await self.store.get(channel, candidate.message_id) is None:
                merged.append(candidate)
        merged.sort(key=lambda m: m.sort_key, reverse=True)
        more = page.next_before is not None or len(merged) > limit
        merged = merged[:limit]
        next_before = history_cursor(*merged[-1].sort_key) if more and merged else None
        return ChannelHistory(merged, next_before)

    def subscribe(
        self, workspace_id: str, channel_id: str, after_id: str | None = None
    ) -> AsyncIterator[RealtimeMessage]:
        """Live messages of a channel; with ``after_id``, what came after it first."""
        return self.realtime.subscribe(check_channel(workspace_id, channel_id), after_id)

    async def inspect(
        self, message_id: str, workspace_id: str | None = None, channel_id: str | None = None
    ) -> Inspection:
        """One message as each place holds it. Without its channel, the channel is found
        from the retry queue or by looking through the realtime tier's channels."""
        check_id("messageId", message_id)
        queued = await self.queue.find(message_id)
        if workspace_id is not None and channel_id is not None:
            candidates = [check_channel(workspace_id, channel_id)]
        elif queued is not None:
            candidates = [queued.write.channel]
        else:
            candidates = await self.realtime.channels()
        for channel in candidates:
            live = await self.realtime.read(channel, message_id)
            stored = await self.store.get(channel, message_id)
            if live or stored or queued or len(candidates) == 1:
                return Inspection(message_id, channel, live, stored, queued)
        return Inspection(message_id, None, None, None, queued)

    async def reconcile(self) -> ReconcileReport:
        """Save delivered messages older than the grace period that are neither saved nor
        queued (a process died between the two writes)."""
        return await self.reconciler.run_once()

    async def sweep(self) -> int:
        """Delete expired realtime entries now; returns how many."""
        return await self.realtime.sweep_expired(self.clock.now_ms())

    async def _reconcile_round(self) -> None:
        report = await self.reconcile()
        if report.persisted or report.failed:
            log.warning("reconcile: %s", report)

    async def _sweep_round(self) -> None:
        deleted = await self.sweep()
        if deleted:
            log.info("swept expired realtime entries: count=%d", deleted)


async def _every(interval_s: float, job: Callable[[], Awaitable[None]], name: str) -> None:
    """Run ``job`` every ``interval_s`` until cancelled; a failed round is logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception:
            log.exception("%s round failed", name)


@contextlib.asynccontextmanager
async def open_dualwrite(
    settings: Settings | None = None,
    *,
    realtime: RealtimeTier | None = None,
    store: PermanentStore | None = None,
    clock: Clock | None = None,
    background: bool = True,
) -> AsyncIterator[DualWrite]:
    """Connect the configured backends (or the ones given) and yield a `DualWrite`.

    With ``background`` the retrier and the TTL sweeper run until the block exits. Backends
    passed in are connected and closed here too.
    """
    settings = settings or Settings.from_env()
    clock = clock or SystemClock()
    init_sentry(settings.sentry_dsn)
    context = BackendContext(
        clock=clock,
        call_timeout_s=max(settings.realtime_timeout_s, settings.permanent_timeout_s),
        migrate_on_start=settings.migrate_on_start,
    )
    realtime = realtime or create_realtime_tier(settings.realtime_url, context)
    store = store or create_permanent_store(settings.store_url, context)
    if settings.group_commit:
        store = GroupCommitStore(
            store,
            max_batch=settings.group_max_batch,
            max_in_flight=settings.group_max_in_flight,
            max_wait_s=settings.group_max_wait_ms / 1000,
        )
    if settings.fault_realtime:
        log.warning("injecting realtime faults: probability=%s", settings.fault_realtime)
        realtime = FaultyRealtimeTier(realtime, Faults(probability=settings.fault_realtime))
    if settings.fault_permanent:
        log.warning("injecting permanent-store faults: probability=%s", settings.fault_permanent)
        store = FaultyPermanentStore(store, Faults(probability=settings.fault_permanent))
    queue = RetryQueue(settings.queue_path)
    async with contextlib.AsyncExitStack() as stack:
        # Each close is registered before its connect: a connect that fails halfway (a pool
        # opened, a schema missing) still releases what it opened.
        stack.push_async_callback(realtime.close)
        await realtime.connect()
        stack.push_async_callback(store.close)
        await store.connect()
        stack.push_async_callback(queue.close)
        await queue.open()
        app = DualWrite(settings, realtime, store, queue, clock)
        metrics.QUEUE_DEPTH.set(await queue.count())
        tasks: list[asyncio.Task[None]] = []
        if background:
            tasks.append(asyncio.create_task(app.retrier.run(settings.retry_poll_s)))
            tasks.append(
                asyncio.create_task(_every(settings.sweep_interval_s, app._sweep_round, "sweep"))
            )
            tasks.append(
                asyncio.create_task(
                    _every(settings.reconcile_interval_s, app._reconcile_round, "reconcile")
                )
            )
        try:
            yield app
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
