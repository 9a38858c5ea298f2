"""The two seams every backend plugs into. A backend is one module implementing one of these.

Backends raise whatever their driver raises; the send path puts its own timeouts around every
call and decides what a failure means. Backends do no I/O in their constructors: `connect()`
(called once by `open_dualwrite`) opens connections and creates schema.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from dualwrite.model import (
    ChannelRef,
    HistoryPage,
    LiveEntry,
    LiveEvent,
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


@dataclass(frozen=True)
class TokenRequest:
    """``cost`` tokens from bucket ``key``, which refills at ``rate_per_s`` up to ``burst``
    (and is full when new); ``cost`` is at most ``burst``."""

    key: str
    cost: float
    rate_per_s: float
    burst: float


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

    async def read_before(
        self, channel: ChannelRef, before: tuple[int, str] | None, limit: int
    ) -> list[RealtimeMessage]:
        """The newest ``limit`` unexpired entries whose (`timestamp`, id) is strictly below
        ``before`` (all if None), newest first.

        Served by an index in that order, so the cost is the page, not the channel.
        """
        ...

    async def delete(self, channel: ChannelRef, message_id: str) -> None:
        """Remove the entry (and its place in every index of the channel)."""
        ...

    async def unconfirmed(
        self,
        channel: ChannelRef,
        after: tuple[int, str] | None,
        sent_until_ms: int,
        limit: int,
    ) -> list[RealtimeMessage]:
        """Entries `write` recorded as not yet saved and no `confirm` cleared, sent at or
        before ``sent_until_ms`` and strictly after ``after`` in (`timestamp`, id) order,
        oldest first. Markers whose entry is gone (expired, deleted) are dropped, not returned.

        The reconciler reads this index, so a round costs what is unsaved, not what is held.
        """
        ...

    async def unconfirmed_channels(self, sent_until_ms: int) -> list[ChannelRef]:
        """The channels that may hold marks sent at or before ``sent_until_ms`` (a superset is
        allowed), found in as few round trips as the backend allows: a round visits these,
        not every channel."""
        ...

    async def confirm(self, channel: ChannelRef, message_ids: Sequence[str]) -> None:
        """Clear the "not yet saved" marks of messages the permanent store now holds."""
        ...

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
        """Every channel that may hold unexpired entries (for the reconciler and inspect),
        read from a registry of channels, not by walking the entries."""
        ...

    async def sweep_expired(self, now_ms: int) -> int:
        """Delete entries whose `ttl` has passed, or their index entries where the backend
        expires the records itself (Redis); returns how many were deleted."""
        ...

    async def claim_send(self, key: SendKey, claim: SendClaim, ttl_ms: int) -> SendClaim:
        """Bind ``key`` to ``claim`` unless it is bound already; return the binding that holds.

        Atomic across processes sharing the tier, and kept as long as a realtime entry.
        """
        ...

    async def take_tokens(self, requests: Sequence[TokenRequest]) -> float:
        """Take each request's tokens from its bucket: 0.0 if every bucket had them, else the
        longest wait until they would. A bucket that lacks them is not charged; on `memory://`
        and Redis none is (one atomic step), on Firebase those before it were.

        Shared across processes sharing the tier (rate limits hold per user, not per
        process); a bucket is forgotten once it would be full again.
        """
        ...

    async def publish(self, workspace_id: str, event: LiveEvent) -> None:
        """Hand ``event`` to every `events` iterator of the workspace, in every process.

        A notice, not a record: iterators opened later do not get it (readers that were away
        learn the same from history and the channel list).
        """
        ...

    def events(self, workspace_id: str) -> AsyncIterator[LiveEvent]:
        """The events published to the workspace from now on, across processes."""
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

    async def find(self, message_id: str) -> StoredMessage | None:
        """The record with this id in whichever channel holds it, or None (for `inspect`).

        Ids are made unique, so at most one channel holds one. Slower than `get`: a store
        without an index on the id alone scans, within its call timeout.
        """

    async def get_many(
        self, channel: ChannelRef, message_ids: Sequence[str]
    ) -> dict[str, StoredMessage]:
        """The records of ``channel`` among ``message_ids``, by id, in one round trip (or as
        few as the store allows); ids not saved are absent."""
        ...

    async def history(self, channel: ChannelRef, before: str | None, limit: int) -> HistoryPage:
        """Newest first, ordered by (`timestamp`, `messageId`), strictly before the cursor."""
        ...

    async def add_channel(self, channel: ChannelRef) -> None:
        """Record that the channel exists, though it may hold no message yet (idempotent)."""
        ...

    async def channels(self, workspace_id: str) -> list[str]:
        """The workspace's channel ids, sorted: those added and those holding a message."""
        ...
