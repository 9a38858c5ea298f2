"""`DualWrite`: the calls a running `dualwrite` offers to the server, the CLI and libraries.

Each method checks its input and hands over to the module that holds the rule: `send` (the
write rule), `history` (the read rule), `recovery` (by hand), `retrier` and `reconciler` (in
the background). Get one from `dualwrite.open_dualwrite`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from dualwrite import history
from dualwrite._calls import bounded
from dualwrite.clock import Clock
from dualwrite.errors import BackendError, InvalidInput
from dualwrite.live import LiveHub, LiveLimits
from dualwrite.model import ChannelHistory, LiveEntry, SendResult, SendStatus, User
from dualwrite.ports import PermanentStore, RealtimeTier
from dualwrite.reconciler import Reconciler, ReconcileReport
from dualwrite.recovery import Inspection, ManualRecovery
from dualwrite.retrier import Backoff, Retrier, RetryReport
from dualwrite.retry_queue import QueuedWrite, RetryQueue
from dualwrite.send import MessageSender, SendLimits
from dualwrite.settings import Settings
from dualwrite.validation import check_channel, check_id


class DualWrite:
    """A running `dualwrite`: send, read, retry, inspect."""

    def __init__(
        self,
        settings: Settings,
        realtime: RealtimeTier,
        store: PermanentStore,
        queue: RetryQueue,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self._realtime = realtime
        self._store = store
        self._queue = queue
        self._clock = clock
        self.sender = MessageSender(
            realtime,
            store,
            queue,
            clock,
            SendLimits.from_settings(settings),
        )
        self.retrier = Retrier(
            queue,
            store,
            clock,
            timeout_s=settings.permanent_timeout_s,
            backoff=Backoff(settings.retry_base_s, settings.retry_cap_s),
        )
        self.reconciler = Reconciler(
            realtime,
            store,
            queue,
            clock,
            timeout_s=settings.permanent_timeout_s,
            grace_ms=int(settings.reconcile_grace_s * 1000),
        )
        self.live = LiveHub(realtime, LiveLimits.from_settings(settings))
        """Live delivery: one feed for the process, shared by every subscriber."""
        self._recovery = ManualRecovery(realtime, store, queue, self.retrier, self.sender)

    async def send_message(
        self,
        workspace_id: str,
        channel_id: str,
        text: str,
        user: User,
        *,
        client_message_id: str | None = None,
    ) -> SendResult:
        """Send a message: see `dualwrite.send`. Returns its id and "saved" or "pending".

        Raises `InvalidInput` (nothing written) or `SendFailed` ("Message failed to send.
        Retry?": the realtime write failed, nothing written).
        """
        return await self.sender.send_message(
            workspace_id, channel_id, text, user, client_message_id=client_message_id
        )

    async def retry(
        self, message_id: str, workspace_id: str | None = None, channel_id: str | None = None
    ) -> SendStatus:
        """Manual retry of one message's permanent write, with the same id: "saved", or
        "pending" if the store still fails (the write is then queued in this process).

        Without its channel the message must wait in this process's retry queue (else
        `NotQueued`). With its channel it works from any process: a message neither queued
        here nor saved is rebuilt from its realtime entry (else `MessageNotFound`).
        """
        check_id("messageId", message_id)
        channel = None
        if workspace_id is not None or channel_id is not None:
            channel = check_channel(workspace_id, channel_id)
        return await self._recovery.retry(message_id, channel)

    async def retry_all(self) -> RetryReport:
        """Manual retry of every queued permanent write."""
        return await self.retrier.retry_all()

    async def pending(self, user_id: str | None = None, limit: int = 1000) -> list[QueuedWrite]:
        """Writes waiting in this process's retry queue, optionally one user's only."""
        return await self._queue.entries(limit=limit, user_id=user_id)

    async def queue_depth(self) -> int:
        """How many writes wait in this process's retry queue."""
        return await self._queue.count()

    async def history(
        self, workspace_id: str, channel_id: str, before: str | None = None, limit: int = 50
    ) -> ChannelHistory:
        """A page of the channel, newest first: see `dualwrite.history`.

        Raises `BackendError` if a tier does not answer (within its timeout).
        """
        channel = check_channel(workspace_id, channel_id)
        try:
            return await bounded(
                history.read_page(self._realtime, self._store, channel, before, limit),
                self.settings.permanent_timeout_s + self.settings.realtime_timeout_s,
                "history",
            )
        except (InvalidInput, BackendError):
            raise
        except Exception as error:
            raise BackendError(f"history is unavailable: {error!r}") from error

    async def subscribe(
        self,
        workspace_id: str,
        channel_id: str,
        *,
        cursor: str | None = None,
        after_id: str | None = None,
    ) -> AsyncIterator[LiveEntry]:
        """Live writes of a channel, each with the cursor to resume after it (`dualwrite.live`).

        With ``cursor`` (or, best effort, ``after_id``) what came after it comes first. Raises
        `CursorExpired` (reload history), `InvalidInput` or `Overflowed` (resume after the last
        cursor) from the iteration.
        """
        channel = check_channel(workspace_id, channel_id)
        if after_id is not None:
            check_id("after", after_id)
        async with self.live.listen(channel, cursor=cursor, after_id=after_id) as entries:
            try:
                async for entry in entries:
                    yield entry
            finally:
                await entries.aclose()

    async def inspect(
        self, message_id: str, workspace_id: str | None = None, channel_id: str | None = None
    ) -> Inspection:
        """One message as each place holds it (the realtime tier, the store, the queue)."""
        check_id("messageId", message_id)
        channel = None
        if workspace_id is not None and channel_id is not None:
            channel = check_channel(workspace_id, channel_id)
        return await self._recovery.inspect(message_id, channel)

    async def reconcile(self) -> ReconcileReport:
        """Save delivered messages older than the grace period that are neither saved nor
        queued (a process died between the two writes)."""
        return await self.reconciler.run_once()

    async def sweep(self) -> int:
        """Delete expired realtime entries now; returns how many."""
        return await self._realtime.sweep_expired(self._clock.now_ms())
