"""The values that cross the seams: what is written where, and what a send returns."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from dualwrite.errors import NOT_SAVED_WARNING

REALTIME_TTL_MS = 3_600_000
"""Realtime entries expire one hour after they were sent (docs/story.md's `ttl`)."""


@dataclass(frozen=True, slots=True)
class User:
    """The sender, as the story's signed-in user: an id and a display name."""

    id: str
    name: str


@dataclass(frozen=True, slots=True, order=True)
class ChannelRef:
    workspace_id: str
    channel_id: str

    @property
    def realtime_path(self) -> str:
        return f"messages/{self.workspace_id}/{self.channel_id}"

    @property
    def permanent_path(self) -> str:
        return f"workspaces/{self.workspace_id}/channels/{self.channel_id}/messages"


@dataclass(frozen=True, slots=True)
class RealtimeMessage:
    """One entry of the realtime tier, at `messages/{workspaceId}/{channelId}/{messageId}`."""

    message_id: str
    user_id: str
    user_name: str
    text: str
    timestamp: int
    ttl: int

    def to_wire(self) -> dict[str, Any]:
        """The record exactly as docs/story.md lays it out (without the id, its key)."""
        return {
            "userId": self.user_id,
            "userName": self.user_name,
            "text": self.text,
            "timestamp": self.timestamp,
            "ttl": self.ttl,
        }

    @classmethod
    def from_wire(cls, message_id: str, data: dict[str, Any]) -> RealtimeMessage:
        return cls(
            message_id=message_id,
            user_id=str(data["userId"]),
            user_name=str(data["userName"]),
            text=str(data["text"]),
            timestamp=int(data["timestamp"]),
            ttl=int(data["ttl"]),
        )

    def expired(self, now_ms: int) -> bool:
        return self.ttl <= now_ms


@dataclass(frozen=True, slots=True)
class LiveEntry:
    """One write of a realtime entry, at its place in the channel's write order.

    ``cursor`` is opaque and names that place: reading after it continues with the next write.
    A rewrite of an id (a repeated send) is a new write with a new cursor.
    """

    channel: ChannelRef
    message: RealtimeMessage
    cursor: str


@dataclass(frozen=True, slots=True)
class ReplayPage:
    """Writes after a cursor, in write order; ``next_cursor`` continues, ``caught_up`` ends."""

    entries: list[LiveEntry]
    next_cursor: str
    caught_up: bool


@dataclass(frozen=True, slots=True)
class PermanentWrite:
    """Everything needed to write (or rewrite) one permanent record.

    ``sent_at`` is the millisecond time of the realtime write. A first attempt stores the
    store's own time as `timestamp` (as Firestore's `serverTimestamp()`); a retry
    (``keep_sent_time``) stores ``sent_at`` instead, so a late write keeps its place in history.
    """

    channel: ChannelRef
    message_id: str
    user_id: str
    user_name: str
    text: str
    sent_at: int
    keep_sent_time: bool = False

    def as_retry(self) -> PermanentWrite:
        return replace(self, keep_sent_time=True)

    @classmethod
    def of(cls, channel: ChannelRef, message: RealtimeMessage) -> PermanentWrite:
        """The first attempt to save a message just delivered: the store stamps its time."""
        return cls(
            channel,
            message.message_id,
            message.user_id,
            message.user_name,
            message.text,
            message.timestamp,
        )

    @classmethod
    def from_realtime(cls, channel: ChannelRef, message: RealtimeMessage) -> PermanentWrite:
        """The write that saves a realtime entry late, keeping its send time."""
        return cls.of(channel, message).as_retry()

    def as_row(self) -> tuple[str, str, str, str, str, str, int | None]:
        """The values a SQL store inserts, in its column order; the last is `timestamp`,
        None on a first attempt (the store's own clock decides)."""
        return (
            self.channel.workspace_id,
            self.channel.channel_id,
            self.message_id,
            self.user_id,
            self.user_name,
            self.text,
            self.sent_at if self.keep_sent_time else None,
        )


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One permanent record, at `workspaces/{ws}/channels/{ch}/messages/{messageId}`.

    Times are milliseconds since the epoch, whatever the store keeps natively.
    """

    channel: ChannelRef
    message_id: str
    user_id: str
    user_name: str
    text: str
    timestamp: int
    created_at: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "messageId": self.message_id,
            "channelId": self.channel.channel_id,
            "workspaceId": self.channel.workspace_id,
            "userId": self.user_id,
            "userName": self.user_name,
            "text": self.text,
            "timestamp": self.timestamp,
            "createdAt": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Messages newest first; pass ``next_before`` as ``before`` to get the page after it."""

    messages: list[StoredMessage]
    next_before: str | None

    @classmethod
    def from_candidates(cls, newest_first: list[StoredMessage], limit: int) -> HistoryPage:
        """A page of ``limit`` from up to ``limit + 1`` candidates (the extra one means more)."""
        page = newest_first[:limit]
        more = len(newest_first) > limit and bool(page)
        return cls(page, history_cursor(page[-1].timestamp, page[-1].message_id) if more else None)


SendStatus = Literal["saved", "pending"]


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a successful send returns: the message id and whether it is saved yet.

    ``status`` is "saved" when both writes succeeded, "pending" when the message was delivered
    but its permanent write is waiting in the retry queue; then ``warning`` holds the banner text.
    """

    message_id: str
    status: SendStatus
    timestamp: int

    @property
    def warning(self) -> str | None:
        return NOT_SAVED_WARNING if self.status == "pending" else None

    def __str__(self) -> str:
        return self.message_id


_CURSOR_TIME = re.compile(r"[0-9]{1,16}")
_MAX_CURSOR_CHARS = 1024


def history_cursor(timestamp: int, message_id: str) -> str:
    """The ``before`` value that continues a history page after the message it names.

    Opaque to clients (URL-safe base64): it holds the (`timestamp`, `messageId`) sort key of the
    last message shown. That one key is all either tier needs to continue exactly: the merged
    page holds every message of both tiers at or above it, so each tier resumes strictly below
    it in its own (timestamp, id) index.
    """
    raw = f"{_CURSOR_VERSION}:{timestamp}:{message_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_CURSOR_VERSION = "c1"
_CURSOR_MAX_CHARS = 128


_MAX_CURSOR_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def parse_history_cursor(before: str) -> tuple[int, str]:
    """The sort key a `history_cursor` holds; `InvalidInput` for anything else."""
    from dualwrite.errors import InvalidInput

    refused = InvalidInput("before", "is not a cursor returned by a history page")
    if len(before) > _CURSOR_MAX_CHARS or not before.isascii():
        raise refused
    try:
        raw = base64.b64decode(before + "=" * (-len(before) % 4), altchars=b"-_", validate=True)
        version, timestamp, message_id = raw.decode().split(":", 2)
    except (ValueError, UnicodeDecodeError) as error:
        raise refused from error
    if version != _CURSOR_VERSION or not (timestamp.isascii() and timestamp.isdigit()):
        raise refused
    # Past year 9999 no store can represent the time (PostgreSQL's interval overflows).
    if len(timestamp) > 16 or int(timestamp) > _MAX_CURSOR_MS:
        raise refused
    if not message_id or not message_id.isascii() or not message_id.isprintable():
        raise refused
    return int(timestamp), message_id


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    """A message as a reader sees it, from either tier; ``saved`` tells which."""

    channel: ChannelRef
    message_id: str
    user_id: str
    user_name: str
    text: str
    timestamp: int
    saved: bool

    @property
    def sort_key(self) -> tuple[int, str]:
        return (self.timestamp, self.message_id)

    @classmethod
    def from_stored(cls, message: StoredMessage) -> ChannelMessage:
        return cls(
            message.channel,
            message.message_id,
            message.user_id,
            message.user_name,
            message.text,
            message.timestamp,
            saved=True,
        )

    @classmethod
    def from_realtime(cls, channel: ChannelRef, message: RealtimeMessage) -> ChannelMessage:
        return cls(
            channel,
            message.message_id,
            message.user_id,
            message.user_name,
            message.text,
            message.timestamp,
            saved=False,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "messageId": self.message_id,
            "workspaceId": self.channel.workspace_id,
            "channelId": self.channel.channel_id,
            "userId": self.user_id,
            "userName": self.user_name,
            "text": self.text,
            "timestamp": self.timestamp,
            "saved": self.saved,
        }


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """A notice for the live sockets of a workspace, carried by the realtime tier so that every
    process hears it: ``saved`` (the permanent write of ``message_id`` landed, late) or
    ``channel`` (``channel_id`` was created)."""

    kind: Literal["saved", "channel"]
    channel_id: str
    message_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "channelId": self.channel_id, "messageId": self.message_id}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LiveEvent:
        kind = data["kind"]
        if kind not in ("saved", "channel"):
            raise ValueError(f"unknown live event kind {kind!r}")
        message_id = data.get("messageId")
        return cls(kind, str(data["channelId"]), None if message_id is None else str(message_id))


@dataclass(frozen=True, slots=True)
class ChannelHistory:
    """A merged history page, newest first; ``next_before`` continues it."""

    messages: list[ChannelMessage]
    next_before: str | None
