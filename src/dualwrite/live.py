"""Live delivery: one feed per process reads every watched channel and fans its writes out.

A listener watches one channel from a start: nothing (from now), a cursor (resume after it, in
write order) or a message id (best effort: from `live_replay_window_ms` before that id's time,
skipping ids up to it). What it gets:

- every write after its start at least once, in write order (a rewrite of an id, as a repeated
  send makes, is a write of its own); a client keeps the cursor of the last entry it received
  and resumes after it, so it can drop repeats by message id;
- the backlog first, paged until caught up (never capped), joined to the live writes without a
  gap: the channel is watched before the backlog is read, and the overlap is dropped;
- `Overflowed` when it lets more than `live_buffer` entries wait: nothing it received is taken
  back, so resuming after its last cursor misses nothing;
- `CursorExpired` when its cursor is older than the realtime tier keeps: reload history.

A channel is watched while it has a listener; its last listener leaving releases it.

Entries reach a listener by iteration (an async iterator), or, once its backlog is read, pushed:
`Subscription.push` hands each new entry to a callback the moment the feed reads it, while
none waits. A live socket mostly waits for its next message, and a task waiting per socket
left a future, a coroutine and an iterator step per socket and message waiting for seconds:
the collector's old generations filled and emptied with them, and its pauses delayed every
socket of the process (`dualwrite bench --target http --subscribers 10000`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field

from dualwrite.errors import DualWriteError, InvalidInput
from dualwrite.ids import ID_LENGTH, PUSH_CHARS, timestamp_of
from dualwrite.model import ChannelRef, LiveEntry
from dualwrite.ports import LiveFeed, RealtimeTier
from dualwrite.settings import Settings

log = logging.getLogger(__name__)


class Overflowed(DualWriteError):
    """The listener fell more than its buffer behind; it resumes after its last cursor."""


@dataclass(frozen=True)
class LiveLimits:
    """The bounds live delivery runs under; `Settings` holds their defaults."""

    buffer: int
    page: int
    replay_window_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> LiveLimits:
        return cls(
            settings.live_buffer,
            settings.live_replay_page,
            int(settings.live_replay_window_s * 1000),
        )


class _Listener:
    """One listener's waiting entries. Small on purpose (one per live socket, thousands per
    process): a list, and a future only while its consumer waits."""

    __slots__ = (
        "_buffer",
        "_entries",
        "_last_replayed",
        "_on_overflow",
        "_overflow",
        "_replayed",
        "_sink",
        "_waiter",
        "overflowed",
        "replaying",
    )

    def __init__(self, buffer: int, *, replaying: bool) -> None:
        self._buffer = buffer
        self._entries: list[LiveEntry] = []
        self._waiter: asyncio.Future[None] | None = None
        self._overflow: asyncio.Event | None = None
        self._on_overflow: list[Callable[[], object]] = []
        self._sink: Callable[[LiveEntry], bool] | None = None
        # No set of its own on a listener that never replayed.
        self._replayed: Collection[str] = ()
        self._last_replayed: str | None = None
        # While a backlog is read, a full buffer is let go (the backlog reaches past it).
        self.replaying = replaying
        self.overflowed = False

    def caught_up(self, replayed: Collection[str], last: str | None) -> None:
        """The backlog is read, up to ``last``; ``replayed`` holds the cursors it gave that may
        still come live. Live writes the backlog already gave come first (it reached past
        them); once ``last`` comes live, all later ones are new. A bounded set: only writes
        that waited in the buffer while the backlog caught up can be in both."""
        self.replaying = False
        if replayed:
            self._replayed, self._last_replayed = replayed, last
            self._entries = [entry for entry in self._entries if self._new(entry)]

    def _new(self, entry: LiveEntry) -> bool:
        if entry.cursor not in self._replayed:
            return True
        if entry.cursor == self._last_replayed:
            self._replayed = ()
        return False

    def offer(self, entry: LiveEntry) -> None:
        if self.overflowed or (self._replayed and not self._new(entry)):
            return
        sink = self._sink
        if sink is not None and not self._entries and not self.replaying and sink(entry):
            return
        if len(self._entries) >= self._buffer:
            if self.replaying:
                # The backlog is still being read and will reach past these: let them go.
                self._entries.clear()
            else:
                # Nothing is dropped from the front: what the client got stays its resume point.
                self.overflowed = True
                if self._overflow is not None:
                    self._overflow.set()
                for callback in self._on_overflow:
                    callback()
                self._wake()
                return
        self._entries.append(entry)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def overflow_event(self) -> asyncio.Event:
        if self._overflow is None:
            self._overflow = asyncio.Event()
            if self.overflowed:
                self._overflow.set()
        return self._overflow

    def when_overflowed(self, callback: Callable[[], object]) -> None:
        if self.overflowed:
            callback()
        else:
            self._on_overflow.append(callback)

    def waiting(self) -> int:
        return len(self._entries)

    async def take(self) -> list[LiveEntry]:
        while not self._entries and not self.overflowed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take_waiting()

    def take_waiting(self) -> list[LiveEntry]:
        if self.overflowed:
            raise Overflowed(f"more than {self._buffer} entries waiting")
        entries, self._entries = self._entries, []
        return entries

    def push(self, sink: Callable[[LiveEntry], bool]) -> None:
        self._sink = sink

    def release(self) -> None:
        # The callbacks are the consumer's bound methods, which hold its subscription, which
        # holds this: a cycle only a full collection would free, and `serve` runs few of those.
        self._sink = None
        self._on_overflow.clear()


class Subscription:
    """One listener's entries (iterate it, or read its backlog and then have them pushed) and
    its overflow, which is known the moment it happens: a consumer stuck sending to a stalled
    client learns of it without iterating (`overflow`, an event, or `when_overflowed`, a
    callback)."""

    def __init__(self, hub: LiveHub, listening: _Listening, listener: _Listener) -> None:
        self._hub = hub
        self._listening = listening
        self._listener = listener
        self._entries: AsyncIterator[LiveEntry] | None = None

    def __aiter__(self) -> AsyncIterator[LiveEntry]:
        """The backlog, then every live write, waiting for each."""
        if self._entries is None:
            self._entries = self._hub._entries(self._listening, self._listener)
        return self._entries

    def backlog(self) -> AsyncIterator[LiveEntry]:
        """The backlog alone (nothing without a cursor or id to start from); once it is
        over, the live writes wait for `take_waiting` or go to `push`'s callback."""
        return self._hub._backlog(self._listening, self._listener)

    def take_waiting(self) -> list[LiveEntry]:
        """The live writes waiting, in write order, without waiting for one; raises
        `Overflowed` once more than the buffer waited."""
        return self._listener.take_waiting()

    def push(self, sink: Callable[[LiveEntry], bool]) -> None:
        """After the backlog: hand each live write to ``sink`` as the feed reads it, while none
        waits. ``sink`` runs on the feed's turn, so it must not block: it returns False when it
        cannot take the write at once, which then waits, in order, for `take_waiting` (the
        sink's owner sees to it that someone takes it)."""
        self._listener.push(sink)

    @property
    def overflow(self) -> asyncio.Event:
        return self._listener.overflow_event()

    def when_overflowed(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (at once if it has happened already) when the listener overflows."""
        self._listener.when_overflowed(callback)

    async def aclose(self) -> None:
        if self._entries is not None:
            await self._entries.aclose()  # type: ignore[attr-defined]


@dataclass(eq=False)
class _Channel:
    watching: asyncio.Task[None]
    listeners: set[_Listener] = field(default_factory=set)


class LiveHub:
    """Fans the writes of watched channels out to their listeners; one per process."""

    def __init__(self, realtime: RealtimeTier, limits: LiveLimits) -> None:
        self._realtime = realtime
        self.limits = limits
        self._channels: dict[ChannelRef, _Channel] = {}
        self._feed: LiveFeed | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    def _started(self) -> LiveFeed:
        if self._feed is None:
            self._feed = self._realtime.live_feed()
            self._dispatcher = asyncio.create_task(self._dispatch(self._feed))
        return self._feed

    async def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for entry in self._channels.values():
            entry.watching.cancel()
        if self._feed is not None:
            await self._feed.close()
        self._feed = self._dispatcher = None
        self._channels.clear()

    @property
    def watched(self) -> int:
        """How many channels are watched now."""
        return len(self._channels)

    async def _dispatch(self, feed: LiveFeed) -> None:
        while True:
            try:
                entries = await feed.next_entries()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("live feed failed")
                await asyncio.sleep(1)
                continue
            for entry in entries:
                channel = self._channels.get(entry.channel)
                if channel is not None:
                    for listener in list(channel.listeners):
                        try:
                            listener.offer(entry)
                        except Exception:  # one consumer's fault stops no other's delivery
                            log.exception("live delivery to a listener failed")

    def listen(
        self, channel: ChannelRef, *, cursor: str | None = None, after_id: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[Subscription]:
        """Entries of ``channel`` from the given start (see the module docstring), as an async
        context manager giving a `Subscription`.

        Raises `CursorExpired`, `InvalidInput` (a cursor of no tier) and `Overflowed` from the
        iteration; a failure to watch the channel from entering.
        """
        return _Listening(self, channel, cursor, after_id)

    def _release(self, channel: ChannelRef, entry: _Channel) -> None:
        """Stop watching a channel nobody listens to, once its watch has settled."""
        if not entry.watching.done():
            entry.watching.add_done_callback(lambda _: self._release(channel, entry))
            return
        if entry.listeners or self._channels.get(channel) is not entry:
            return
        del self._channels[channel]
        watched = not entry.watching.cancelled() and entry.watching.exception() is None
        if self._feed is not None and watched:
            self._feed.unwatch(channel)

    async def _backlog(
        self, listening: _Listening, listener: _Listener
    ) -> AsyncIterator[LiveEntry]:
        # The channel is watched already: every write from here on reaches the listener, so the
        # backlog only has to be read until it is caught up once.
        channel, cursor, after_id = listening.channel, listening.cursor, listening.after_id
        if cursor is None and after_id is None:
            listener.caught_up((), None)
            return
        tail: deque[str] = deque(maxlen=self.limits.buffer)
        if cursor is None:
            assert after_id is not None
            if len(after_id) != ID_LENGTH or any(c not in PUSH_CHARS for c in after_id):
                raise InvalidInput("after", "is not a message id")
            since = timestamp_of(after_id) - self.limits.replay_window_ms
            cursor = await self._realtime.cursor_at(channel, since)
        while True:
            page = await self._realtime.read_after(channel, cursor, self.limits.page)
            listener.replaying = not page.caught_up
            for entry in page.entries:
                tail.append(entry.cursor)
                if after_id is None or entry.message.message_id > after_id:
                    yield entry
            cursor = page.next_cursor
            if page.caught_up:
                break
        listener.caught_up(set(tail), tail[-1] if tail else None)

    async def _entries(
        self, listening: _Listening, listener: _Listener
    ) -> AsyncIterator[LiveEntry]:
        async for entry in self._backlog(listening, listener):
            yield entry
        while True:
            for entry in await listener.take():
                yield entry


class _Listening:
    """`LiveHub.listen`. A class rather than a generator-based context manager: every live
    socket holds one while it is open, and this is one small object where that is a suspended
    generator frame and its wrapper."""

    __slots__ = ("_entry", "_hub", "_listener", "after_id", "channel", "cursor")

    def __init__(
        self, hub: LiveHub, channel: ChannelRef, cursor: str | None, after_id: str | None
    ) -> None:
        self._hub = hub
        self.channel = channel
        self.cursor = cursor
        self.after_id = after_id
        self._entry: _Channel | None = None
        self._listener: _Listener | None = None

    async def __aenter__(self) -> Subscription:
        hub, channel = self._hub, self.channel
        feed = hub._started()
        replaying = self.cursor is not None or self.after_id is not None
        listener = self._listener = _Listener(hub.limits.buffer, replaying=replaying)
        entry = hub._channels.get(channel)
        if entry is None:
            entry = _Channel(asyncio.create_task(feed.watch(channel)))
            hub._channels[channel] = entry
        self._entry = entry
        entry.listeners.add(listener)
        try:
            await asyncio.shield(entry.watching)
        except BaseException:
            self._leave()
            raise
        return Subscription(hub, self, listener)

    async def __aexit__(self, *exc_info: object) -> None:
        self._leave()

    def _leave(self) -> None:
        entry, listener = self._entry, self._listener
        if entry is None or listener is None:
            return
        self._entry = self._listener = None
        entry.listeners.discard(listener)
        listener.release()
        if not entry.listeners:
            self._hub._release(self.channel, entry)
