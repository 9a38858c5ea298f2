"""In-process realtime tier: the embedded default, and the fake the unit tests run on.

It reaches subscribers of this process only; use Redis or Firebase to share a tier. What it
holds is capped (`Settings.memory_max_bytes`, `memory_max_claims`): past a cap a write fails
(the send answers "Message failed to send. Retry?") rather than evict anything, since an entry
may not be saved yet.
It reaches subscribers of this process only; use Redis or Firebase to share a tier. Each
channel keeps a log of its writes for an hour, numbered in write order: a live cursor is
`{incarnation}.{number}`, so a cursor from before a restart is recognised as gone.
"""

from __future__ import annotations

import asyncio
import bisect
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from dualwrite.backends import BackendContext
from dualwrite.backends._buckets import TokenBuckets
from dualwrite.clock import Clock
from dualwrite.errors import BackendError, CursorExpired, InvalidInput
from dualwrite.model import ChannelRef, LiveEntry, LiveEvent, RealtimeMessage, ReplayPage
from dualwrite.ports import LiveFeed, RealtimeTier, SendClaim, SendKey, TokenRequest


@dataclass
class _Log:
    """A channel's writes in order: ``writes[i]`` is write number ``first + i``."""

    first: int = 1
    writes: list[tuple[RealtimeMessage, int]] = field(default_factory=list)
    """(message, time of the write)"""

    @property
    def last(self) -> int:
        return self.first + len(self.writes) - 1

    def trim(self, now_ms: int) -> None:
        """Forget the oldest writes once expired (later expired ones are skipped on read)."""
        expired = 0
        while expired < len(self.writes) and self.writes[expired][0].expired(now_ms):
            expired += 1
        if expired:
            del self.writes[:expired]
            self.first += expired


class _MemoryFeed:
    def __init__(self, tier: MemoryRealtimeTier) -> None:
        self._tier = tier
        self.watched: set[ChannelRef] = set()
        self._entries: asyncio.Queue[LiveEntry] = asyncio.Queue()

    def offer(self, entry: LiveEntry) -> None:
        if entry.channel in self.watched:
            self._entries.put_nowait(entry)

    async def watch(self, channel: ChannelRef) -> None:
        self.watched.add(channel)  # in place at once: writes are offered synchronously

    def unwatch(self, channel: ChannelRef) -> None:
        self.watched.discard(channel)

    async def next_entries(self) -> list[LiveEntry]:
        entries = [await self._entries.get()]
        while not self._entries.empty():
            entries.append(self._entries.get_nowait())
        return entries

    async def close(self) -> None:
        self._tier.feeds.discard(self)


class MemoryRealtimeTier:
    def __init__(self, clock: Clock, max_bytes: int, max_claims: int, max_buckets: int) -> None:
        self._clock = clock
        self._max_bytes = max_bytes
        self._max_claims = max_claims
        self._bytes = 0
        self._channels: dict[ChannelRef, dict[str, RealtimeMessage]] = {}
        # Per channel, (timestamp, id) keys kept sorted: history pages and the reconciler's
        # "not yet saved" marks are read by bisection, never by walking the channel.
        self._by_time: dict[ChannelRef, list[tuple[int, str]]] = {}
        self._by_id: dict[ChannelRef, list[str]] = {}  # for read_since, in id order
        self._unconfirmed: dict[ChannelRef, list[tuple[int, str]]] = {}
        self._logs: dict[ChannelRef, _Log] = {}
        self._incarnation = secrets.token_hex(4)
        self.feeds: set[_MemoryFeed] = set()
        self._claims: dict[SendKey, tuple[SendClaim, int]] = {}
        self._buckets = TokenBuckets(lambda: clock.now_ms() / 1000, max_keys=max_buckets)
        self._listeners: dict[str, set[asyncio.Queue[LiveEvent]]] = {}

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def write(self, channel: ChannelRef, message: RealtimeMessage) -> None:
        entries = self._channels.setdefault(channel, {})
        previous = entries.get(message.message_id)
        held = self._bytes - (_size(previous) if previous else 0) + _size(message)
        if held > self._max_bytes:
            self.sweep_now()
            held = self._bytes - (_size(previous) if previous else 0) + _size(message)
        if held > self._max_bytes:
            raise BackendError(f"the memory realtime tier is full ({self._max_bytes} bytes)")
        self._bytes = held
        entries = self._channels.setdefault(channel, {})  # the sweep may have dropped it
        if previous is not None:
            _discard(self._by_time.get(channel), (previous.timestamp, previous.message_id))
        entries[message.message_id] = message
        if previous is None:
            bisect.insort(self._by_id.setdefault(channel, []), message.message_id)
        key = (message.timestamp, message.message_id)
        bisect.insort(self._by_time.setdefault(channel, []), key)
        marks = self._unconfirmed.setdefault(channel, [])
        if previous is not None:
            _discard(marks, (previous.timestamp, previous.message_id))
        bisect.insort(marks, key)
        now = self._clock.now_ms()
        log = self._logs.setdefault(channel, _Log())
        log.trim(now)
        log.writes.append((message, now))
        entry = LiveEntry(channel, message, self._cursor(log.last))
        for feed in self.feeds:
            feed.offer(entry)

    def _cursor(self, number: int) -> str:
        return f"{self._incarnation}.{number}"

    async def read(self, channel: ChannelRef, message_id: str) -> RealtimeMessage | None:
        message = self._channels.get(channel, {}).get(message_id)
        if message is None or message.expired(self._clock.now_ms()):
            return None
        return message

    async def read_since(
        self, channel: ChannelRef, after_id: str | None, limit: int
    ) -> list[RealtimeMessage]:
        entries = self._channels.get(channel, {})
        ids = self._by_id.get(channel, [])
        now = self._clock.now_ms()
        position = 0 if after_id is None else bisect.bisect_right(ids, after_id)
        found: list[RealtimeMessage] = []
        while position < len(ids) and len(found) < limit:
            message = entries[ids[position]]
            if not message.expired(now):
                found.append(message)
            position += 1
        return found

    async def read_before(
        self, channel: ChannelRef, before: tuple[int, str] | None, limit: int
    ) -> list[RealtimeMessage]:
        keys = self._by_time.get(channel, [])
        entries = self._channels.get(channel, {})
        now = self._clock.now_ms()
        position = len(keys) if before is None else bisect.bisect_left(keys, before)
        found: list[RealtimeMessage] = []
        while position > 0 and len(found) < limit:
            position -= 1
            message = entries[keys[position][1]]
            if not message.expired(now):
                found.append(message)
        return found

    async def delete(self, channel: ChannelRef, message_id: str) -> None:
        self._remove(channel, message_id)

    def _remove(self, channel: ChannelRef, message_id: str) -> None:
        message = self._channels.get(channel, {}).pop(message_id, None)
        if message is not None:
            self._bytes -= _size(message)
            ids = self._by_id.get(channel, [])
            position = bisect.bisect_left(ids, message_id)
            if position < len(ids) and ids[position] == message_id:
                del ids[position]
            key = (message.timestamp, message_id)
            _discard(self._by_time.get(channel), key)
            _discard(self._unconfirmed.get(channel), key)

    async def unconfirmed(
        self,
        channel: ChannelRef,
        after: tuple[int, str] | None,
        sent_until_ms: int,
        limit: int,
    ) -> list[RealtimeMessage]:
        marks = self._unconfirmed.get(channel, [])
        entries = self._channels.get(channel, {})
        now = self._clock.now_ms()
        position = 0 if after is None else bisect.bisect_right(marks, after)
        found: list[RealtimeMessage] = []
        while position < len(marks) and len(found) < limit:
            timestamp, message_id = marks[position]
            if timestamp > sent_until_ms:
                break
            message = entries.get(message_id)
            if message is None or message.expired(now):
                del marks[position]  # nothing left to save
                continue
            found.append(message)
            position += 1
        return found

    async def unconfirmed_channels(self, sent_until_ms: int) -> list[ChannelRef]:
        return sorted(
            c for c, marks in self._unconfirmed.items() if marks and marks[0][0] <= sent_until_ms
        )

    async def confirm(self, channel: ChannelRef, message_ids: Sequence[str]) -> None:
        entries = self._channels.get(channel, {})
        for message_id in message_ids:
            message = entries.get(message_id)
            if message is not None:
                _discard(self._unconfirmed.get(channel), (message.timestamp, message_id))

    async def read_after(self, channel: ChannelRef, cursor: str | None, limit: int) -> ReplayPage:
        log = self._logs.get(channel, _Log())
        after = 0 if cursor is None else self._parse(cursor)
        if cursor is not None and after < log.first - 1:
            raise CursorExpired(f"cursor {cursor!r} is older than the realtime tier keeps")
        now = self._clock.now_ms()
        live = self._channels.get(channel, {})
        entries: list[LiveEntry] = []
        number = max(after, log.first - 1)
        while number < log.last and len(entries) < limit:
            number += 1
            message = log.writes[number - log.first][0]
            # Skip what expired or was taken back (`delete`) since.
            if not message.expired(now) and live.get(message.message_id) == message:
                entries.append(LiveEntry(channel, message, self._cursor(number)))
        return ReplayPage(entries, self._cursor(number), caught_up=number >= log.last)

    def _parse(self, cursor: str) -> int:
        incarnation, _, number = cursor.partition(".")
        if not number.isdigit() or len(number) > 18:
            raise InvalidInput("cursor", "is not a cursor of this realtime tier")
        if incarnation != self._incarnation:
            raise CursorExpired("the cursor is from before the realtime tier restarted")
        return int(number)

    async def cursor_at(self, channel: ChannelRef, time_ms: int) -> str:
        log = self._logs.get(channel, _Log())
        before = bisect.bisect_left(log.writes, time_ms, key=lambda write: write[1])
        return self._cursor(log.first - 1 + before)

    def live_feed(self) -> LiveFeed:
        feed = _MemoryFeed(self)
        self.feeds.add(feed)
        return feed

    async def channels(self) -> list[ChannelRef]:
        return sorted(self._channels)

    def sweep_now(self) -> int:
        """Drop what has expired by the clock now (a full tier tries this before refusing)."""
        return self._sweep(self._clock.now_ms())

    async def sweep_expired(self, now_ms: int) -> int:
        return self._sweep(now_ms)

    def _sweep(self, now_ms: int) -> int:
        self._claims = {k: v for k, v in self._claims.items() if v[1] > now_ms}
        deleted = 0
        for channel, entries in list(self._channels.items()):
            expired = [i for i, m in entries.items() if m.expired(now_ms)]
            for message_id in expired:
                self._remove(channel, message_id)
            deleted += len(expired)
            if not entries:
                del self._channels[channel]
                self._by_time.pop(channel, None)
                self._by_id.pop(channel, None)
                self._unconfirmed.pop(channel, None)
        for log in self._logs.values():
            log.trim(now_ms)
        return deleted

    async def claim_send(self, key: SendKey, claim: SendClaim, ttl_ms: int) -> SendClaim:
        now = self._clock.now_ms()
        held = self._claims.get(key)
        if held is not None and held[1] > now:
            return held[0]
        if held is None and len(self._claims) >= self._max_claims:
            self._claims = {k: v for k, v in self._claims.items() if v[1] > now}
            if len(self._claims) >= self._max_claims:
                raise BackendError(f"the memory realtime tier holds {self._max_claims} claims")
        self._claims[key] = (claim, now + ttl_ms)
        return claim

    async def take_tokens(self, requests: Sequence[TokenRequest]) -> float:
        return self._buckets.take(requests)

    async def publish(self, workspace_id: str, event: LiveEvent) -> None:
        for queue in self._listeners.get(workspace_id, ()):
            queue.put_nowait(event)

    async def events(self, workspace_id: str) -> AsyncIterator[LiveEvent]:
        queue: asyncio.Queue[LiveEvent] = asyncio.Queue()
        listeners = self._listeners.setdefault(workspace_id, set())
        listeners.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            listeners.discard(queue)
            if not listeners:
                self._listeners.pop(workspace_id, None)


def _size(message: RealtimeMessage) -> int:
    """What an entry costs: its strings in UTF-8 plus a fixed overhead for the record."""
    return (
        len(message.text.encode("utf-8", "surrogatepass"))
        + len(message.user_name.encode("utf-8", "surrogatepass"))
        + len(message.user_id)
        + len(message.message_id)
        + 200
    )


def _discard(keys: list[tuple[int, str]] | None, key: tuple[int, str]) -> None:
    """Remove ``key`` from a sorted list, if it is there."""
    if keys is None:
        return
    position = bisect.bisect_left(keys, key)
    if position < len(keys) and keys[position] == key:
        del keys[position]


def create(url: str, context: BackendContext) -> RealtimeTier:
    return MemoryRealtimeTier(
        context.clock,
        context.memory_max_bytes,
        context.memory_max_claims,
        context.memory_max_buckets,
    )
