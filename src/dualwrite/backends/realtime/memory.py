"""In-process realtime tier: the embedded default, and the fake the unit tests run on.

It reaches subscribers of this process only; use Redis or Firebase to share a tier. Each
channel keeps a log of its writes for an hour, numbered in write order: a live cursor is
`{incarnation}.{number}`, so a cursor from before a restart is recognised as gone.
"""

from __future__ import annotations

import asyncio
import bisect
import secrets
from dataclasses import dataclass, field

from dualwrite.backends import BackendContext
from dualwrite.clock import Clock
from dualwrite.errors import CursorExpired, InvalidInput
from dualwrite.model import ChannelRef, LiveEntry, RealtimeMessage, ReplayPage
from dualwrite.ports import LiveFeed, RealtimeTier, SendClaim, SendKey


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
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._channels: dict[ChannelRef, dict[str, RealtimeMessage]] = {}
        self._logs: dict[ChannelRef, _Log] = {}
        self._incarnation = secrets.token_hex(4)
        self.feeds: set[_MemoryFeed] = set()
        self._claims: dict[SendKey, tuple[SendClaim, int]] = {}

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def write(self, channel: ChannelRef, message: RealtimeMessage) -> None:
        self._channels.setdefault(channel, {})[message.message_id] = message
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
        now = self._clock.now_ms()
        ids = sorted(i for i in entries if after_id is None or i > after_id)
        live = (entries[i] for i in ids if not entries[i].expired(now))
        return [m for _, m in zip(range(limit), live, strict=False)]

    async def delete(self, channel: ChannelRef, message_id: str) -> None:
        self._channels.get(channel, {}).pop(message_id, None)

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

    async def sweep_expired(self, now_ms: int) -> int:
        deleted = 0
        for channel, entries in list(self._channels.items()):
            expired = [i for i, m in entries.items() if m.expired(now_ms)]
            for message_id in expired:
                del entries[message_id]
            deleted += len(expired)
            if not entries:
                del self._channels[channel]
        for log in self._logs.values():
            log.trim(now_ms)
        self._claims = {k: v for k, v in self._claims.items() if v[1] > now_ms}
        return deleted

    async def claim_send(self, key: SendKey, claim: SendClaim, ttl_ms: int) -> SendClaim:
        now = self._clock.now_ms()
        held = self._claims.get(key)
        if held is not None and held[1] > now:
            return held[0]
        self._claims[key] = (claim, now + ttl_ms)
        return claim


def create(url: str, context: BackendContext) -> RealtimeTier:
    return MemoryRealtimeTier(context.clock)
