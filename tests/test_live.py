"""Live delivery (`dualwrite.live`) over every realtime tier that streams: write order,
resume by cursor, overflow, long backlogs, and a watch that is slow to take hold."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from dualwrite.backends import BackendContext, create_realtime_tier
from dualwrite.clock import ManualClock, SystemClock
from dualwrite.errors import CursorExpired, InvalidInput
from dualwrite.ids import PushIdGenerator
from dualwrite.live import Overflowed
from dualwrite.model import REALTIME_TTL_MS, ChannelRef, LiveEntry, RealtimeMessage
from dualwrite.ports import LiveFeed, RealtimeTier
from dualwrite.runtime import open_dualwrite
from dualwrite.service import DualWrite
from dualwrite.settings import Settings
from tests.conftest import realtime_url, unique

ADA = ("u1", "Ada")
KINDS = [
    pytest.param("memory", id="rt-memory"),
    pytest.param("redis", id="rt-redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", id="rt-redis-cluster", marks=pytest.mark.redis_cluster),
    pytest.param("firebase-rest", id="rt-firebase-rest", marks=pytest.mark.firebase),
]


def now_clock() -> ManualClock:
    """A manual clock that starts at the real time (Redis stamps stream ids by its own)."""
    return ManualClock(SystemClock().now_ms())


class SlowWatchTier:
    """A realtime tier whose live feed takes ``delay_s`` to take hold of a channel, as a
    Firebase `listen()` on a slow network does."""

    def __init__(self, inner: RealtimeTier, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.watching = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def live_feed(self) -> LiveFeed:
        feed = self.inner.live_feed()
        outer = self

        class Slow:
            async def watch(self, channel: ChannelRef) -> None:
                outer.watching.set()
                await asyncio.sleep(outer.delay_s)
                await feed.watch(channel)

            def unwatch(self, channel: ChannelRef) -> None:
                feed.unwatch(channel)

            async def next_entries(self) -> list[LiveEntry]:
                return await feed.next_entries()

            async def close(self) -> None:
                await feed.close()

        return Slow()


@contextlib.asynccontextmanager
async def running(
    kind: str,
    tmp_path: Path,
    clock: ManualClock | None = None,
    slow_watch_s: float = 0.0,
    **kw: int,
) -> AsyncIterator[DualWrite]:
    tier: RealtimeTier = create_realtime_tier(
        realtime_url(kind, tmp_path), BackendContext(clock or now_clock())
    )
    if slow_watch_s:
        tier = SlowWatchTier(tier, slow_watch_s)  # type: ignore[assignment]
    settings = Settings(store_url="memory://", queue_path=str(tmp_path / "q.db"), **kw)  # type: ignore[arg-type]
    async with open_dualwrite(settings, realtime=tier, clock=clock, background=False) as dw:
        yield dw


async def take(
    stream: AsyncIterator[LiveEntry], count: int, timeout_s: float = 20
) -> list[LiveEntry]:
    return [await asyncio.wait_for(anext(stream), timeout_s) for _ in range(count)]


async def send(dw: DualWrite, channel: ChannelRef, text: str, client_id: str | None = None) -> str:
    from dualwrite.model import User

    result = await dw.send_message(
        channel.workspace_id, channel.channel_id, text, User(*ADA), client_message_id=client_id
    )
    return result.message_id


def unique_ids(entries: list[LiveEntry]) -> list[str]:
    """Message ids in the order first received, each once: what the page shows."""
    return list(dict.fromkeys(e.message.message_id for e in entries))


@pytest.fixture
def channel() -> ChannelRef:
    return ChannelRef(unique("ws"), "general")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_retry_that_rewrites_an_older_id_reaches_live_and_resuming_sockets(
    kind: str, tmp_path: Path, channel: ChannelRef
) -> None:
    """Case 3: ids follow creation order, not write order."""
    clock = now_clock()
    async with running(kind, tmp_path, clock) as dw:
        live = dw.subscribe(channel.workspace_id, channel.channel_id)
        first = asyncio.ensure_future(anext(live))
        await asyncio.sleep(0.3)  # the first socket of the channel
        a = await send(dw, channel, "A", client_id="retry-me")
        clock.advance(5)
        b = await send(dw, channel, "B")
        clock.advance(5)
        c = await send(dw, channel, "C")
        got = [await asyncio.wait_for(first, 10), *await take(live, 2)]
        assert [e.message.message_id for e in got] == [a, b, c]
        # "Retry?" with the same clientMessageId rewrites A, whose id is older than B and C.
        clock.advance(5)
        assert await send(dw, channel, "A", client_id="retry-me") == a
        assert [e.message.message_id for e in await take(live, 1)] == [a]
        await live.aclose()  # type: ignore[attr-defined]
        # A socket that resumes after C (its newest id, last cursor) still gets the rewrite.
        resumed = dw.subscribe(channel.workspace_id, channel.channel_id, cursor=got[-1].cursor)
        assert [e.message.message_id for e in await take(resumed, 1)] == [a]
        await resumed.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
async def test_pushed_writes_the_callback_refuses_wait_in_write_order_until_taken(
    kind: str, tmp_path: Path, channel: ChannelRef
) -> None:
    """A pushed listener (a live socket): a write the callback cannot take at once waits, with
    those after it, in write order; the callback gets the next write once none waits."""
    async with running(kind, tmp_path) as dw, dw.live.listen(channel) as subscription:
        assert [entry async for entry in subscription.backlog()] == []
        pushed: list[str] = []
        accepting = True

        def sink(entry: LiveEntry) -> bool:
            if accepting:
                pushed.append(entry.message.message_id)
            return accepting

        subscription.push(sink)
        await asyncio.sleep(0.3)  # the channel's watch takes hold
        a = await send(dw, channel, "a")
        await until(lambda: len(pushed) == 1)
        accepting = False
        b, c = await send(dw, channel, "b"), await send(dw, channel, "c")
        waited: list[str] = []

        def took_two() -> bool:
            waited.extend(e.message.message_id for e in subscription.take_waiting())
            return len(waited) == 2

        await until(took_two)
        accepting = True
        d = await send(dw, channel, "d")
        await until(lambda: len(pushed) == 2)
        assert (pushed, waited) == ([a, d], [b, c])


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_slow_listener_is_closed_without_losing_anything_and_resumes(
    kind: str, tmp_path: Path, channel: ChannelRef
) -> None:
    """Case 2: an overflow drops nothing before the listener's resume point."""
    async with running(kind, tmp_path, live_buffer=5) as dw:
        fast = dw.subscribe(channel.workspace_id, channel.channel_id)
        slow = dw.subscribe(channel.workspace_id, channel.channel_id)
        fast_first = asyncio.ensure_future(anext(fast))
        slow_first = asyncio.ensure_future(anext(slow))
        await asyncio.sleep(0.3)
        sent = [await send(dw, channel, "m0")]
        received = [await asyncio.wait_for(slow_first, 10)]
        fast_got = [await asyncio.wait_for(fast_first, 10)]
        for i in range(1, 30):
            sent.append(await send(dw, channel, f"m{i}"))
            fast_got += await take(fast, 1)
        assert [e.message.message_id for e in fast_got] == sent
        with pytest.raises(Overflowed):
            received += await take(slow, 30)
        resumed = dw.subscribe(channel.workspace_id, channel.channel_id, cursor=received[-1].cursor)
        # Firebase resumes with a window before the cursor: the client drops ids it has.
        while len(unique_ids(received)) < len(sent):
            received += await take(resumed, 1)
        assert unique_ids(received) == sent
        for stream in (fast, resumed):
            await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
async def test_the_first_listener_misses_nothing_written_while_its_watch_takes_hold(
    kind: str, tmp_path: Path, channel: ChannelRef
) -> None:
    """Case 4: the subscription is in place before the backlog is read."""
    async with running(kind, tmp_path, slow_watch_s=1.0) as dw:
        seen = await send(dw, channel, "seen")
        cursor = (await dw.live._realtime.read_after(channel, None, 10)).entries[-1].cursor
        stream = dw.subscribe(channel.workspace_id, channel.channel_id, cursor=cursor)
        first = asyncio.ensure_future(anext(stream))
        tier = dw.live._realtime
        assert isinstance(tier, SlowWatchTier)
        await asyncio.wait_for(tier.watching.wait(), 5)
        during = await send(dw, channel, "while the subscription opens")
        got = [await asyncio.wait_for(first, 20)]
        after = await send(dw, channel, "after")
        # (Firebase resumes with a window before the cursor: the client drops ids it has.)
        while after not in unique_ids(got):
            got += await take(stream, 1)
        assert [i for i in unique_ids(got) if i != seen] == [during, after]
        await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS[:2])
async def test_a_resume_replays_a_backlog_past_ten_thousand(
    kind: str, tmp_path: Path, channel: ChannelRef
) -> None:
    """Case 5: replay is paged until caught up, never capped."""
    clock = now_clock()
    async with running(kind, tmp_path, clock) as dw:
        tier = dw.live._realtime
        ids = PushIdGenerator(clock.now_ms)
        now = clock.now_ms()
        messages = [
            RealtimeMessage(ids.new_id(), *ADA, f"m{i}", now, now + REALTIME_TTL_MS)
            for i in range(10_050)
        ]
        await asyncio.gather(*(tier.write(channel, m) for m in messages))
        start = (await tier.read_after(channel, None, 1)).entries[0]
        stream = dw.subscribe(channel.workspace_id, channel.channel_id, cursor=start.cursor)
        got = await take(stream, 10_049)
        assert {e.message.message_id for e in got} == {m.message_id for m in messages[1:]}
        live = await send(dw, channel, "live")
        assert [e.message.message_id for e in await take(stream, 1)] == [live]
        await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cursor_older_than_the_tier_keeps_is_refused(
    kind: str, tmp_path: Path, channel: ChannelRef
) -> None:
    clock = now_clock()
    async with running(kind, tmp_path, clock) as dw:
        await send(dw, channel, "old")
        await send(dw, channel, "gone")
        tier = dw.live._realtime
        cursor = (await tier.read_after(channel, None, 10)).entries[0].cursor
        clock.advance(REALTIME_TTL_MS + 1000)
        await send(dw, channel, "new")
        with pytest.raises(CursorExpired):
            await take(dw.subscribe(channel.workspace_id, channel.channel_id, cursor=cursor), 1)
        with pytest.raises(InvalidInput):
            await take(dw.subscribe(channel.workspace_id, channel.channel_id, cursor="?"), 1)


@pytest.mark.parametrize("kind", KINDS[:2])
async def test_the_last_listener_leaving_releases_the_channel(
    kind: str, tmp_path: Path, channel: ChannelRef
) -> None:
    async with running(kind, tmp_path) as dw:
        streams = [dw.subscribe(channel.workspace_id, channel.channel_id) for _ in range(3)]
        firsts = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.sleep(0.3)
        assert dw.live.watched == 1
        message_id = await send(dw, channel, "hi")
        assert [(await asyncio.wait_for(f, 10)).message.message_id for f in firsts] == [
            message_id
        ] * 3
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        assert dw.live.watched == 0


@pytest.mark.firebase
async def test_a_slow_firebase_listen_misses_nothing_written_while_it_opens(
    tmp_path: Path, channel: ChannelRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case 4 on Firebase itself: `Reference.listen()` slowed, as on a slow network."""
    from firebase_admin import db

    listening = threading.Event()
    original = db.Reference.listen

    def slow_listen(self: db.Reference, callback: Any) -> Any:
        listening.set()
        time.sleep(1.0)
        return original(self, callback)

    monkeypatch.setattr(db.Reference, "listen", slow_listen)
    async with running("firebase-rest", tmp_path) as dw:
        seen = await send(dw, channel, "seen")
        stream = dw.subscribe(channel.workspace_id, channel.channel_id, after_id=seen)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(listening.wait, 5)
        during = await send(dw, channel, "while listen() opens")
        got = [await asyncio.wait_for(first, 20)]
        after = await send(dw, channel, "after")
        while after not in unique_ids(got):
            got += await take(stream, 1)
        assert unique_ids(got) == [during, after]
        await stream.aclose()  # type: ignore[attr-defined]
