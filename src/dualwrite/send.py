"""The dual-write rule (story 4.4): realtime tier first, permanent store second.

1. Write `messages/{ws}/{ch}/{id}` to the realtime tier. If that fails or times out, raise
   `SendFailed` ("Message failed to send. Retry?"): nothing else is written, nothing queued.
2. Write `workspaces/{ws}/channels/{ch}/messages/{id}` to the permanent store under the same
   id. If that fails or times out, the message is still delivered: report the error, put the
   write in the durable retry queue, and only then answer "pending" with the warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass

import sentry_sdk

from dualwrite import metrics
from dualwrite._calls import bounded
from dualwrite.clock import Clock
from dualwrite.errors import InvalidInput, SendFailed
from dualwrite.ids import PushIdGenerator
from dualwrite.model import (
    REALTIME_TTL_MS,
    PermanentWrite,
    RealtimeMessage,
    SendResult,
    SendStatus,
    User,
)
from dualwrite.ports import PermanentStore, RealtimeTier, SendClaim, SendKey
from dualwrite.reporting import report_permanent_failure
from dualwrite.retry_queue import RetryQueue
from dualwrite.validation import (
    DEFAULT_MAX_TEXT_CHARS,
    check_channel,
    check_id,
    check_text,
    check_user,
)

log = logging.getLogger("dualwrite.send")


@dataclass(frozen=True)
class SendLimits:
    realtime_timeout_s: float = 2.0
    permanent_timeout_s: float = 5.0
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS


class ClientMessageIdReused(InvalidInput):
    """A `clientMessageId` was sent again with another channel or text."""


class DualWriter:
    """Sends messages. Share one per process: its id generator keeps ids in creation order."""

    def __init__(
        self,
        realtime: RealtimeTier,
        store: PermanentStore,
        queue: RetryQueue,
        clock: Clock,
        limits: SendLimits | None = None,
        ids: PushIdGenerator | None = None,
    ) -> None:
        self._realtime = realtime
        self._store = store
        self._queue = queue
        self._clock = clock
        self.limits = limits or SendLimits()
        self._ids = ids or PushIdGenerator(clock.now_ms)

    async def send_message(
        self,
        workspace_id: str,
        channel_id: str,
        text: str,
        user: User,
        *,
        client_message_id: str | None = None,
    ) -> SendResult:
        """Send one message; see the module docstring for what happens when.

        With ``client_message_id``, repeating a send (after a lost answer, or a "Retry?")
        reuses the first send's message id and time, so it can never create a second message.

        Raises `InvalidInput` (nothing written) or `SendFailed` (realtime write failed).
        """
        try:
            channel = check_channel(workspace_id, channel_id)
            check_text(text, self.limits.max_text_chars)
            check_user(user)
        except InvalidInput:
            metrics.SENDS.labels("invalid").inc()
            raise
        fresh_id = self._ids.new_id()
        claim = SendClaim(fresh_id, self._clock.now_ms(), "")
        try:
            if client_message_id is not None:
                claim = await self._claim(
                    channel.workspace_id, channel.channel_id, text, user, client_message_id, claim
                )
            message = RealtimeMessage(
                message_id=claim.message_id,
                user_id=user.id,
                user_name=user.name,
                text=text,
                timestamp=claim.timestamp,
                ttl=claim.timestamp + REALTIME_TTL_MS,
            )
            started = time.perf_counter()
            await bounded(
                self._realtime.write(channel, message),
                self.limits.realtime_timeout_s,
                "realtime tier",
            )
            metrics.REALTIME_WRITE_SECONDS.observe(time.perf_counter() - started)
        except InvalidInput:
            metrics.SENDS.labels("invalid").inc()
            raise
        except Exception as exc:
            metrics.SENDS.labels("failed").inc()
            raise SendFailed() from exc

        write = PermanentWrite(
            channel=channel,
            message_id=message.message_id,
            user_id=user.id,
            user_name=user.name,
            text=text,
            sent_at=message.timestamp,
        )
        status = await self.save_or_queue(write)
        if status == "saved" and claim.message_id != fresh_id:
            # A repeated send may find its first attempt still queued; it is saved now.
            await self._queue.remove(channel, claim.message_id)
        metrics.SENDS.labels(status).inc()
        return SendResult(message.message_id, status, message.timestamp)

    async def save_or_queue(self, write: PermanentWrite) -> SendStatus:
        """Step 2: the permanent write, or (on failure) report it and queue it durably."""
        started = time.perf_counter()
        try:
            await bounded(
                self._store.save(write), self.limits.permanent_timeout_s, "permanent store"
            )
        except Exception as exc:
            report_permanent_failure(write, exc)
            await self._queue_or_unsend(write, exc)
            metrics.QUEUE_DEPTH.inc()
            return "pending"
        metrics.PERMANENT_WRITE_SECONDS.observe(time.perf_counter() - started)
        return "saved"

    async def _queue_or_unsend(self, write: PermanentWrite, error: Exception) -> None:
        """Queue the write durably before the sender hears "pending".

        If even the local queue cannot take it, the message would be delivered yet doomed to
        vanish with its TTL; take it back from the realtime tier and fail the send instead, so
        the sender knows to retry.
        """
        try:
            await self._queue.put(write, repr(error), self._clock.now_ms())
        except Exception as queue_error:
            log.critical(
                "retry queue write failed, unsending: message_id=%s error=%r",
                write.message_id,
                queue_error,
            )
            sentry_sdk.capture_exception(queue_error)
            with contextlib.suppress(Exception):
                await bounded(
                    self._realtime.delete(write.channel, write.message_id),
                    self.limits.realtime_timeout_s,
                    "realtime tier",
                )
            metrics.SENDS.labels("failed").inc()
            raise SendFailed() from queue_error

    async def _claim(
        self,
        workspace_id: str,
        channel_id: str,
        text: str,
        user: User,
        client_message_id: str,
        fresh: SendClaim,
    ) -> SendClaim:
        check_id("clientMessageId", client_message_id)
        fingerprint = hashlib.sha256(
            "\x00".join((workspace_id, channel_id, text)).encode()
        ).hexdigest()
        key = SendKey(workspace_id, user.id, client_message_id)
        held = await bounded(
            self._realtime.claim_send(
                key, SendClaim(fresh.message_id, fresh.timestamp, fingerprint), REALTIME_TTL_MS
            ),
            self.limits.realtime_timeout_s,
            "realtime tier",
        )
        if held.fingerprint != fingerprint:
            raise ClientMessageIdReused(
                "clientMessageId", "was already used for a different message"
            )
        return held
