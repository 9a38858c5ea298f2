"""`DualWrite`: the calls a running `dualwrite` offers to the server, the CLI and libraries.

Each method checks its input and hands over to the module that holds the rule: `send` (the
write rule), `history` (the read rule), `recovery` (by hand), `retrier` and `reconciler` (in
the background). Get one from `dualwrite.open_dualwrite`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from dualwrite import history
from dualwrite._calls import bounded
from dualwrite.clock import Clock
from dualwrite.errors import BackendError, BackendUnavailable, DualWriteError, InvalidInput
from dualwrite.logs import one_line
from dualwrite.model import (
    ChannelHistory,
    ChannelRef,
    RealtimeMessage,
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
            remind_every_s=settings.outage_reminder_s,
        )
        self.reconciler = Reconciler(
            realtime,
            store,
            queue,
            clock,
            timeout_s=settings.permanent_timeout_s,
            grace_ms=int(settings.reconcile_grace_s * 1000),
        )
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
        channel = _channel_if_given(workspace_id, channel_id)
        try:
            return await self._recovery.retry(message_id, channel)
        except DualWriteError:
            raise
        except Exception as error:
            raise BackendUnavailable(f"retry could not finish: {one_line(error)}") from error

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

    def subscribe(
        self, workspace_id: str, channel_id: str, after_id: str | None = None
    ) -> AsyncIterator[RealtimeMessage]:
        """Live messages of a channel; with ``after_id``, what came after it first."""
        return self._realtime.subscribe(check_channel(workspace_id, channel_id), after_id)

    async def replay(
        self, workspace_id: str, channel_id: str, after_id: str | None, limit: int
    ) -> list[RealtimeMessage]:
        """Unexpired realtime entries after ``after_id`` (all if None), in id order."""
        channel = check_channel(workspace_id, channel_id)
        return await self._realtime.read_since(channel, after_id, limit)

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
        except DualWriteError:
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
        return await self.reconciler.run_once()

    async def sweep(self) -> int:
        """Delete expired realtime entries now; returns how many."""
        return await self._realtime.sweep_expired(self._clock.now_ms())

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
