"""The two seams every backend plugs into. A backend is one module implementing one of these.

Backends raise whatever their driver raises; the send path puts its own timeouts around every
call and decides what a failure means. Backends do no I/O in their constructors: `connect()`
(called once by `open_dualwrite`) opens connections and creates schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dualwrite.model import (
    ChannelRef,
    HistoryPage,
    LiveEntry,
    PermanentWrite,
    RealtimeMessage,
    ReplayPage,
    StoredMessage,
)


@dataclass(frozen=True, slots=True)
class SendKey:
    """A client's idempotency key for one send (its `clientMessageId`), scoped to its user."""

    workspace_id: str
    user_id: str
    client_message_id: str


@dataclass(frozen=True, slots=True)
class SendClaim:
    """The id and send time a `SendKey` is bound to, and a fingerprint of what was sent."""

    message_id: str
    timestamp: int
    fingerprint: str


class RealtimeTier(Protocol):
    """Instant delivery: entries live one hour and reach every live subscriber of the channel."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, channel: ChannelRef, message: RealtimeMessage) -> None:
        """Set `messages/{ws}/{ch}/{id}`, notify live subscribers; a rewrite replaces it."""
        ...

    async def read(self, channel: ChannelRef, message_id: str) -> RealtimeMessage | None:
        """One unexpired entry, or None."""
        ...

    async def read_since(
        self, channel: ChannelRef, after_id: str | None, limit: int
    ) -> list[RealtimeMessage]:
        """Unexpired entries with ids greater than ``after_id`` (all if None), in id order."""
        ...

    async def delete(self, channel: ChannelRef, message_id: str) -> None: ...

    async def read_after(self, channel: ChannelRef, cursor: str | None, limit: int) -> ReplayPage:
        """Up to ``limit`` unexpired writes of the channel after ``cursor``, in write order.

        None reads from the oldest write kept. Raises `CursorExpired` when writes that followed
        ``cursor`` may be gone (it is older than the tier keeps, or from another incarnation of
        it), and `InvalidInput` (field "cursor") when it is not a cursor of this tier.
        """
        ...

    async def cursor_at(self, channel: ChannelRef, time_ms: int) -> str:
        """A cursor before every write made at or after ``time_ms`` (best effort: clocks)."""
        ...

    def live_feed(self) -> LiveFeed:
        """A new reader of the channels it is told to watch; one serves a whole process."""
        ...

    async def channels(self) -> list[ChannelRef]:
        """Every channel that may hold unexpired entries (for the reconciler and inspect)."""
        ...

    async def sweep_expired(self, now_ms: int) -> int:
        """Delete entries whose `ttl` has passed; returns how many were deleted."""
        ...

    async def claim_send(self, key: SendKey, claim: SendClaim, ttl_ms: int) -> SendClaim:
        """Bind ``key`` to ``claim`` unless it is bound already; return the binding that holds.

        Atomic across processes sharing the tier, and kept as long as a realtime entry.
        """
        ...


class LiveFeed(Protocol):
    """Writes of many channels as they happen, read by one reader (not one per channel)."""

    async def watch(self, channel: ChannelRef) -> None:
        """Follow ``channel``. Returns once the subscription is in place: every write made
        after this returns comes out of `next_entries`, so a backlog read afterwards leaves no
        gap between itself and the live writes."""
        ...

    def unwatch(self, channel: ChannelRef) -> None:
        """Stop following ``channel`` (its writes may still come out of a read in flight)."""
        ...

    async def next_entries(self) -> list[LiveEntry]:
        """Wait for writes of watched channels: each channel's in write order. A failing tier is
        retried from where the feed was, so nothing is skipped."""
        ...

    async def close(self) -> None: ...


class PermanentStore(Protocol):
    """Permanent history, at `workspaces/{ws}/channels/{ch}/messages/{id}`."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def save(self, write: PermanentWrite) -> None:
        """Write the record unless one with this id exists in the channel (idempotent).

        `timestamp` is the store's time, or ``write.sent_at`` when ``write.keep_sent_time``;
        `createdAt` is always the store's time at the write.
        """
        ...

    async def save_many(self, writes: Sequence[PermanentWrite]) -> None:
        """`save` for each write, in as few round trips as the store allows.

        All or nothing where the store can (one transaction or batch); if it raises, the caller
        retries the writes one by one (they are idempotent) to learn each outcome.
        """
        ...

    async def get(self, channel: ChannelRef, message_id: str) -> StoredMessage | None: ...

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        """Newest first, ordered by (`timestamp`, `messageId`), strictly before the cursor."""
        ...
