"""`DualWrite`: the calls a running `dualwrite` offers to the server, the CLI and libraries.

Each method checks its input and hands over to the module that holds the rule: `send` (the
write rule), `history` (the read rule), `recovery` (by hand), `retrier` and `reconciler` (in
the background). Get one from `dualwrite.open_dualwrite`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from dualwrite import history
from dualwrite._calls import bounded, guarded
from dualwrite.clock import Clock
from dualwrite.errors import (
    BackendError,
    BackendUnavailable,
    InvalidInput,
    MessageNotFound,
    NotQueued,
)
from dualwrite.live import LiveHub, LiveLimits
from dualwrite.logs import one_line
from dualwrite.model import (
    ChannelHistory,
    ChannelRef,
    LiveEntry,
    LiveEvent,
    SendResult,
    SendStatus,
    User,
)
from dualwrite.ports import PermanentStore, RealtimeTier, TokenRequest
from dualwrite.reconciler import Reconciler, ReconcileReport
from dualwrite.recovery import Inspection, ManualRecovery
from dualwrite.retrier import Backoff, Retrier, RetryReport
from dualwrite.retry_queue import QueuedWrite, RetryQueue
from dualwrite.send import MessageSender, SendLimits
from dualwrite.settings import Settings
from dualwrite.validation import check_channel, check_id

log = logging.getLogger(__name__)

_NOTICE_PAUSE_MS = 30_000


# What manual retry and inspect answer as such; any other failure (a backend that failed or
# did not answer in time) becomes one `BackendUnavailable` saying which call could not finish.
_ANSWERS = (InvalidInput, NotQueued, MessageNotFound, BackendUnavailable)


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
        self._notices_paused_until = 0
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
            # Two attempts' bound: long enough for a round in the usual case; a process that
            # dies mid-round leaves its entries to the others (or its restart) after it.
            lease_s=2 * settings.permanent_timeout_s,
            backoff=Backoff(settings.retry_base_s, settings.retry_cap_s),
            remind_every_s=settings.outage_reminder_s,
            on_saved=self._saved_late,
        )
        self.reconciler = Reconciler(
            realtime,
            store,
            queue,
            clock,
            realtime_timeout_s=settings.realtime_timeout_s,
            permanent_timeout_s=settings.permanent_timeout_s,
            grace_ms=int(settings.reconcile_grace_s * 1000),
            on_saved=self._announce_saved,
            batch=settings.reconcile_batch,
        )
        self.live = LiveHub(realtime, LiveLimits.from_settings(settings))
        """Live delivery: one feed for the process, shared by every subscriber."""
        self._recovery = ManualRecovery(
            realtime, store, queue, self.retrier, self.sender, self._saved_late
        )

    async def _saved_late(self, channel: ChannelRef, message_id: str) -> None:
        """A queued write saved (retrier, manual retry): clear its "unconfirmed" mark as a
        send's save does, so that after an outage the reconciler is not left every mark."""
        self.sender.confirmations.add(channel, message_id)
        await self._announce_saved(channel, message_id)

    async def _announce_saved(self, channel: ChannelRef, message_id: str) -> None:
        """Tell every process's live sockets that a late permanent write landed.

        Best effort: the write is saved whatever happens here, and a reader that misses the
        notice sees "saved" in history. After a failed notice the next ones are skipped for a
        while, so that a hung realtime tier costs the retrier one timeout, not one per write.
        """
        now = self._clock.now_ms()
        if now < self._notices_paused_until:
            return
        try:
            await bounded(
                self._realtime.publish(
                    channel.workspace_id, LiveEvent("saved", channel.channel_id, message_id)
                ),
                self.settings.realtime_timeout_s,
                "realtime tier",
            )
        except Exception as error:
            self._notices_paused_until = now + _NOTICE_PAUSE_MS
            log.warning("saved notice not published: message_id=%s error=%r", message_id, error)

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
        channel = _channel_if_given(workspace_id, channel_id)
        try:
            return await self._recovery.retry(message_id, channel)
        except _ANSWERS:
            raise
        except Exception as error:
            raise BackendUnavailable(f"retry could not finish: {one_line(error)}") from error

    async def retry_all(self) -> RetryReport:
        """Manual retry of every queued permanent write."""
        return await self.retrier.retry_all()

    async def pending(
        self, user_id: str | None = None, limit: int = 1000, workspace_id: str | None = None
    ) -> list[QueuedWrite]:
        """Writes waiting in this process's retry queue, optionally one user's (in one
        workspace) only."""
        return await guarded(
            self._queue.entries(limit=limit, user_id=user_id, workspace_id=workspace_id),
            self.settings.permanent_timeout_s,
            "retry queue",
        )

    async def queue_depth(self) -> int:
        """How many writes wait in this process's retry queue."""
        return await guarded(self._queue.count(), self.settings.permanent_timeout_s, "retry queue")

    async def history(
        self,
        workspace_id: str,
        channel_id: str,
        before: str | None = None,
        limit: int = history.DEFAULT_PAGE_SIZE,
    ) -> ChannelHistory:
        """A page of the channel, newest first: see `dualwrite.history`.

        Raises `BackendError` if a tier does not answer (within its timeout).
        """
        channel = check_channel(workspace_id, channel_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidInput("limit", "must be a whole number of at least 1")
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

    def events(self, workspace_id: str) -> AsyncIterator[LiveEvent]:
        """Live notices of a workspace ("saved", "channel"), from every process."""
        return self._realtime.events(check_id("workspaceId", workspace_id))

    async def channels(self, workspace_id: str) -> list[str]:
        """The workspace's channels: those created and those holding a saved message.

        Raises `BackendError` if the store does not answer (within its timeout).
        """
        check_id("workspaceId", workspace_id)
        try:
            return await bounded(
                self._store.channels(workspace_id), self.settings.permanent_timeout_s, "channels"
            )
        except BackendError:
            raise
        except Exception as error:
            raise BackendError(f"the channel list is unavailable: {error!r}") from error

    async def create_channel(self, workspace_id: str, channel_id: str) -> None:
        """Record a channel in the permanent store and announce it to every process's sockets.

        Raises `BackendError` if the store does not take it; the announcement is best effort.
        """
        channel = check_channel(workspace_id, channel_id)
        try:
            await bounded(
                self._store.add_channel(channel), self.settings.permanent_timeout_s, "channels"
            )
        except Exception as error:
            raise BackendError(f"the channel was not created: {error!r}") from error
        try:
            await bounded(
                self._realtime.publish(workspace_id, LiveEvent("channel", channel_id)),
                self.settings.realtime_timeout_s,
                "realtime tier",
            )
        except Exception as error:
            log.warning("channel notice not published: channel=%s error=%r", channel, error)

    async def inspect(
        self, message_id: str, workspace_id: str | None = None, channel_id: str | None = None
    ) -> Inspection:
        """One message as each place holds it (the realtime tier, the store, the queue).

        Raises `BackendUnavailable` if a place does not answer (never reports it absent).
        """
        check_id("messageId", message_id)
        channel = _channel_if_given(workspace_id, channel_id)
        try:
            return await self._recovery.inspect(message_id, channel)
        except _ANSWERS:
            raise
        except Exception as error:
            # Never a partial answer: a place that did not answer is not a place without it.
            hint = "" if channel else "; with its workspace and channel only one channel is read"
            raise BackendUnavailable(
                f"inspect could not finish: {one_line(error)}{hint}"
            ) from error

    async def reconcile(self) -> ReconcileReport:
        """Save delivered messages older than the grace period that are neither saved nor
        queued (a process died between the two writes)."""
        await self.sender.confirmations.flush()  # marks of saves this process already made
        return await self.reconciler.run_once()

    async def sweep(self) -> int:
        """Delete expired realtime entries now; returns how many."""
        return await guarded(
            self._realtime.sweep_expired(self._clock.now_ms()),
            self.settings.sweep_timeout_s,
            "realtime sweep",
        )

    async def take_tokens(self, requests: Sequence[TokenRequest]) -> float:
        """Rate limits shared by every process on the realtime tier: 0.0 if every bucket had
        its cost (now taken), else the seconds to wait (see `RealtimeTier.take_tokens`).

        Raises `BackendError` if the tier does not answer in time.
        """
        try:
            return await bounded(
                self._realtime.take_tokens(requests),
                self.settings.realtime_timeout_s,
                "rate limit",
            )
        except BackendError:
            raise
        except Exception as error:
            raise BackendError(f"rate limit is unavailable: {error!r}") from error


def _channel_if_given(workspace_id: str | None, channel_id: str | None) -> ChannelRef | None:
    """The channel when either part is given (both must then be valid), else None."""
    if workspace_id is None and channel_id is None:
        return None
    return check_channel(workspace_id, channel_id)
