"""The dual-write rule (docs/story.md): realtime tier first, permanent store second.

0. Admit: check the input and, with a `clientMessageId`, claim it (a repeat gets the first
   attempt's id and time). Refused input raises `InvalidInput`: nothing is written.
1. Write `messages/{ws}/{ch}/{id}` to the realtime tier. If that fails or times out, raise
   `SendFailed` ("Message failed to send. Retry?"): nothing else is written, nothing queued.
2. Write `workspaces/{ws}/channels/{ch}/messages/{id}` to the permanent store under the same
   id. If that fails or times out, the message is still delivered: report the error, put the
   write in the durable retry queue, and only then answer "pending" with the warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import sentry_sdk

from dualwrite import metrics
from dualwrite._calls import bounded
from dualwrite.clock import Clock
from dualwrite.errors import BackendError, ClientMessageIdReused, InvalidInput, SendFailed
from dualwrite.ids import PushIdGenerator
from dualwrite.model import (
    REALTIME_TTL_MS,
    ChannelRef,
    PermanentWrite,
    RealtimeMessage,
    SendResult,
    SendStatus,
    User,
)
from dualwrite.ports import PermanentStore, RealtimeTier, SendClaim, SendKey
from dualwrite.reporting import report_permanent_failure
from dualwrite.retry_queue import RetryQueue
from dualwrite.settings import Settings
from dualwrite.validation import check_channel, check_id, check_text, check_user

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# How long a saved send's mark waits to be cleared with others (the reconciler's grace period
# is tens of seconds; this only gathers concurrent saves into one call).
_CONFIRM_DELAY_S = 0.05


@functools.lru_cache(maxsize=8)
def _sends(outcome: str) -> Any:
    """The sends counter of an outcome (prometheus_client looks a label up under a lock)."""
    return metrics.SENDS.labels(outcome)


@dataclass(frozen=True)
class SendLimits:
    """The bounds a send runs under; `Settings` holds their defaults."""

    realtime_timeout_s: float
    permanent_timeout_s: float
    max_text_chars: int

    @classmethod
    def from_settings(cls, settings: Settings) -> SendLimits:
        return cls(
            settings.realtime_timeout_s, settings.permanent_timeout_s, settings.max_text_chars
        )


class Confirmations:
    """Saved messages whose "unconfirmed" marks are still to be cleared.

    Cleared a moment later in batches, off the send's path: a send answers as soon as it is
    saved, and concurrent saves share one call per channel. A mark left behind (the process
    died first, or the call failed) costs the reconciler one batched lookup, never a wrong
    answer; the reconciler flushes these before each round.
    """

    def __init__(self, realtime: RealtimeTier, timeout_s: float) -> None:
        self._realtime = realtime
        self._timeout_s = timeout_s
        self._pending: dict[ChannelRef, list[str]] = {}
        self._flush_task: asyncio.Task[None] | None = None

    def add(self, channel: ChannelRef, message_id: str) -> None:
        self._pending.setdefault(channel, []).append(message_id)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(_CONFIRM_DELAY_S)
        await self.flush()

    async def flush(self) -> None:
        """Clear every pending mark now (best effort)."""
        pending, self._pending = self._pending, {}
        await asyncio.gather(*(self._clear(c, ids) for c, ids in pending.items()))

    async def _clear(self, channel: ChannelRef, message_ids: list[str]) -> None:
        try:
            await bounded(
                self._realtime.confirm(channel, message_ids), self._timeout_s, "realtime tier"
            )
        except Exception as error:
            log.info("could not clear %d unconfirmed marks: %r", len(message_ids), error)

    async def close(self) -> None:
        """Flush what is pending and stop."""
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
        await self.flush()


class MessageSender:
    """Sends messages. Share one per process: its id generator keeps ids in creation order."""

    def __init__(
        self,
        realtime: RealtimeTier,
        store: PermanentStore,
        queue: RetryQueue,
        clock: Clock,
        limits: SendLimits,
        ids: PushIdGenerator | None = None,
    ) -> None:
        self._realtime = realtime
        self._store = store
        self._queue = queue
        self._clock = clock
        self.limits = limits
        self._ids = ids or PushIdGenerator(clock.now_ms)
        self.confirmations = Confirmations(realtime, limits.realtime_timeout_s)

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
        outcome = "failed"
        try:
            channel, message, repeat = await self._admit(
                workspace_id, channel_id, text, user, client_message_id
            )
            await self._write_realtime(channel, message)
            write = PermanentWrite.of(channel, message)
            # A repeat keeps the first attempt's time everywhere: the store must not stamp
            # the time of the repeat (it may come minutes later).
            status = await self.save_or_queue(write.as_retry() if repeat else write)
            if status == "saved" and repeat:
                # A repeated send may find its first attempt still queued; it is saved now.
                await self._queue.remove(channel, message.message_id)
            outcome = status
            return SendResult(message.message_id, status, message.timestamp)
        except InvalidInput:
            outcome = "invalid"
            raise
        finally:
            _sends(outcome).inc()

    async def _admit(
        self,
        workspace_id: str,
        channel_id: str,
        text: str,
        user: User,
        client_message_id: str | None,
    ) -> tuple[ChannelRef, RealtimeMessage, bool]:
        """Step 0: the checked channel, the message to write, and whether it repeats a send."""
        channel = check_channel(workspace_id, channel_id)
        check_text(text, self.limits.max_text_chars)
        check_user(user)
        claim = SendClaim(self._ids.new_id(), self._clock.now_ms(), "")
        repeat = False
        if client_message_id is not None:
            held = await self._claim(channel, text, user, client_message_id, claim)
            repeat, claim = held.message_id != claim.message_id, held
        message = RealtimeMessage(
            message_id=claim.message_id,
            user_id=user.id,
            user_name=user.name,
            text=text,
            timestamp=claim.timestamp,
            ttl=claim.timestamp + REALTIME_TTL_MS,
        )
        return channel, message, repeat

    async def _write_realtime(self, channel: ChannelRef, message: RealtimeMessage) -> None:
        """Step 1: deliver, or raise `SendFailed` with nothing else written."""
        started = time.perf_counter()
        try:
            await bounded(
                self._realtime.write(channel, message),
                self.limits.realtime_timeout_s,
                "realtime tier",
                coarse=True,
            )
        except Exception as exc:
            raise SendFailed() from exc
        metrics.REALTIME_WRITE_SECONDS.observe(time.perf_counter() - started)

    async def save_or_queue(
        self, write: PermanentWrite, *, delivered_earlier: bool = False
    ) -> SendStatus:
        """Step 2: the permanent write, or (on failure) report it and queue it durably.

        ``delivered_earlier``: a manual retry of a message acknowledged long ago. If even the
        queue fails then, the message stays in the realtime tier and `BackendError` is raised.
        """
        started = time.perf_counter()
        try:
            await bounded(
                self._store.save(write),
                self.limits.permanent_timeout_s,
                "permanent store",
                coarse=True,
            )
        except Exception as exc:
            report_permanent_failure(write, exc)
            await self._queue_or_unsend(write, exc, delivered_earlier)
            metrics.QUEUE_DEPTH.inc()
            return "pending"
        metrics.PERMANENT_WRITE_SECONDS.observe(time.perf_counter() - started)
        self.confirmations.add(write.channel, write.message_id)
        return "saved"

    async def _queue_or_unsend(
        self, write: PermanentWrite, error: Exception, delivered_earlier: bool
    ) -> None:
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
            if delivered_earlier:
                # Its sender was told long ago; taking it back now would only lose it sooner.
                raise BackendError("the retry queue is unavailable") from queue_error
            with contextlib.suppress(Exception):
                await self._bounded_realtime(self._realtime.delete(write.channel, write.message_id))
            raise SendFailed() from queue_error

    async def _claim(
        self,
        channel: ChannelRef,
        text: str,
        user: User,
        client_message_id: str,
        fresh: SendClaim,
    ) -> SendClaim:
        check_id("clientMessageId", client_message_id)
        fingerprint = hashlib.sha256(
            "\x00".join((channel.workspace_id, channel.channel_id, text)).encode()
        ).hexdigest()
        key = SendKey(channel.workspace_id, user.id, client_message_id)
        try:
            held = await self._bounded_realtime(
                self._realtime.claim_send(
                    key, SendClaim(fresh.message_id, fresh.timestamp, fingerprint), REALTIME_TTL_MS
                )
            )
        except Exception as exc:
            raise SendFailed() from exc
        if held.fingerprint != fingerprint:
            raise ClientMessageIdReused(
                "clientMessageId", "was already used for a different message"
            )
        return held

    async def _bounded_realtime(self, call: Awaitable[_T]) -> _T:
        return await bounded(call, self.limits.realtime_timeout_s, "realtime tier")
